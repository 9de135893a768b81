"""What `rcpu compare` says it wrote, and the calibration-size plot."""

import pytest

from rcpu import compare as cmp
from rcpu.cli import main


def _results(ratios, nsamples):
    cells = {"dense": {"ppl": {"128": {"ppl": 30.0}}}}
    for r in ratios:
        for n in nsamples:
            for m in ("rcpu", "ridge"):
                cells[cmp.cell_key(m, r, n)] = {"method": m, "ratio": r, "nsamples": n,
                                                "ppl": {"128": {"ppl": 40.0 + 100 * r - n / 100}}}
    return {"cells": cells, "protocol": {"eval_seqlens": [128], "model": "tiny"}}


@pytest.mark.parametrize("ratios,nsamples,xlabel", [
    ([0.1, 0.2], [128], "pruning ratio"),
    ([0.2], [16, 32, 128], "calibration windows (nsamples), pruning ratio 0.2"),
])
def test_plot_axis_follows_the_swept_quantity(tmp_path, monkeypatch, ratios, nsamples, xlabel):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    seen = {}
    real_close = plt.close

    def keep(fig):
        ax = fig.axes[0]
        seen["xlabel"] = ax.get_xlabel()
        seen["lines"] = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    cmp.plot(_results(ratios, nsamples), tmp_path / "ppl.png")
    assert (tmp_path / "ppl.png").stat().st_size > 1000
    assert seen["xlabel"] == xlabel
    assert seen["lines"]["rcpu"] == (sorted(nsamples) if len(nsamples) > 1 else ratios)


def test_compare_mentions_the_plot_only_when_written(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    def no_matplotlib(*a, **k):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(cmp, "plot", no_matplotlib)
    text = str(tiny_checkpoint / "text.txt")
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_checkpoint / "model"), "--methods", "wanda-sp", "--pruning_ratios",
                 "0.5", "--nsamples", "8", "--seqlen", "32", "--calib", text, "--eval", text, "--eval_seqlens", "32",
                 "--device", "cpu", "-q", "--output", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "results.json, results.md" in last and "no ppl.png" in last and not (out / "ppl.png").exists()
