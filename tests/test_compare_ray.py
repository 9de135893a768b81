"""`rcpu compare --executor ray` on a local Ray instance with CPU workers."""

import json
import logging
import os
import time

import pytest
import torch

from rcpu import compare as cmp

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module (starting one takes seconds)."""
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    logging.getLogger(__name__).info("ray.init took %.1f s", time.perf_counter() - t0)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Ray tasks with one CPU run torch on one thread; match that in this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(tiny_checkpoint, out, **kw):
    text = str(tiny_checkpoint / "text.txt")
    return cmp.run_compare(str(tiny_checkpoint / "model"), ["wanda-sp", "ridge-auto"], [0.25, 0.5], out, calib=text,
                           eval_source=text, nsamples=[8], seqlen=32, eval_seqlens=[32], progress=False, **kw)


def test_ray_matches_local_and_resumes(tiny_checkpoint, tmp_path, ray_session, one_thread, monkeypatch):
    local = _run(tiny_checkpoint, tmp_path / "local")["cells"]
    out = tmp_path / "ray"
    res = _run(tiny_checkpoint, out, executor="ray")
    keys = ["dense", "wanda-sp@0.25/n8", "wanda-sp@0.5/n8", "ridge-auto@0.25/n8", "ridge-auto@0.5/n8"]
    assert list(local) == keys and list(res["cells"]) == keys and res["cells_this_run"] == keys
    for key in keys:
        cell = res["cells"][key]
        assert cell["ppl"] == local[key]["ppl"]  # bit for bit: same windows, same weights, same arithmetic
        assert cell.get("params") == local[key].get("params")  # same kept heads and channels
        assert cell.get("ridge_lambdas") == local[key].get("ridge_lambdas")
        assert cell["worker"]["executor"] == "ray" and cell["worker"]["pid"] != os.getpid()
        assert cell["worker"]["ray_node"]
    assert res["cells"]["wanda-sp@0.5/n8"]["params"]["heads_after"] < res["cells"]["wanda-sp@0.25/n8"]["params"][
        "heads_after"]
    on_disk = json.loads((out / "results.json").read_text())
    assert list(on_disk["cells"]) == keys and on_disk["protocol_details"]["executor"] == "ray"
    assert "| ridge-auto |" in (out / "results.md").read_text()

    # an interrupted run: two cells missing from results.json are the only ones computed
    on_disk["cells"] = {k: v for k, v in on_disk["cells"].items() if k not in ("dense", "ridge-auto@0.5/n8")}
    (out / "results.json").write_text(json.dumps(on_disk))
    again = _run(tiny_checkpoint, out, executor="ray")
    assert again["cells_this_run"] == ["dense", "ridge-auto@0.5/n8"]
    assert sorted(again["cells"]) == sorted(keys)
    for key in keys:
        assert again["cells"][key]["ppl"] == local[key]["ppl"]

    def boom(*a, **k):
        raise AssertionError("a finished cell was submitted again")

    monkeypatch.setattr(cmp, "run_cell", boom)
    final = _run(tiny_checkpoint, out, executor="ray")
    assert final["cells_this_run"] == [] and sorted(final["cells"]) == sorted(keys)


def test_failed_cell_does_not_stop_the_others(tiny_checkpoint, tmp_path, ray_session):
    from rcpu import RcpuError, executors

    common = dict(method="dense", config=None, dtype="float32", device="cpu", eval_seqlens=(32,), max_eval_tokens=None,
                  eval_label="test")
    jobs = [cmp.CellJob(key="missing", model_source=str(tmp_path / "no-such-model"), **common),
            cmp.CellJob(key="dense", model_source=str(tiny_checkpoint / "model"), **common)]
    done = {}
    with pytest.raises(RcpuError, match=r"1 of 2 cells failed \(missing\).*does not exist"):
        executors.run_ray(jobs, {"eval": torch.arange(256) % 100}, cmp.run_cell, lambda job, cell: done.update(
            {job.key: cell}), address=None, num_cpus=1, num_gpus=0)
    assert list(done) == ["dense"] and done["dense"]["ppl"]["32"]["n_tokens"] > 0
    assert ray.is_initialized()  # a session this process started is left to its owner


def test_cli_executor_ray(tiny_checkpoint, tmp_path, ray_session, capsys):
    from rcpu.cli import main

    text = str(tiny_checkpoint / "text.txt")
    out = tmp_path / "cli"
    assert main(["compare", "--model", str(tiny_checkpoint / "model"), "--calib", text, "--eval", text,
                 "--methods", "wanda-sp", "--pruning_ratios", "0.5", "--nsamples", "8", "--seqlen", "32",
                 "--eval_seqlens", "32", "--device", "cpu", "--executor", "ray", "--ray_num_cpus", "1",
                 "--output", str(out), "-q"]) == 0
    assert "| wanda-sp |" in capsys.readouterr().out
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert list(cells) == ["dense", "wanda-sp@0.5/n8"]
    assert {c["worker"]["executor"] for c in cells.values()} == {"ray"}


def test_interrupted_ray_run_resumes(tiny_checkpoint, tmp_path, ray_session, monkeypatch):
    """Ctrl-C after the first finished cell: the cells in flight are cancelled, the finished
    one is on disk, and the next run computes exactly the others."""
    write = cmp._atomic_json
    calls = []

    def interrupt_after_first(path, obj):
        write(path, obj)
        calls.append(sorted(obj["cells"]))
        raise KeyboardInterrupt

    monkeypatch.setattr(cmp, "_atomic_json", interrupt_after_first)
    out = tmp_path / "ray"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_checkpoint, out, executor="ray")
    monkeypatch.setattr(cmp, "_atomic_json", write)
    saved = json.loads((out / "results.json").read_text())["cells"]
    assert len(saved) == 1 and list(saved) == calls[0]
    res = _run(tiny_checkpoint, out, executor="ray")
    assert len(res["cells"]) == 5 and sorted(res["cells_this_run"]) == sorted(set(res["cells"]) - set(saved))
