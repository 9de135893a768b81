"""`rcpu compare` (harness) and `rcpu bench` on tiny checkpoints."""

import json
import os
import sys

import pytest
import torch

from rcpu import RcpuError, executors
from rcpu import compare as cmp
from rcpu.cli import main
from rcpu.config import PruneConfig


def test_parse_method():
    assert cmp.parse_method("rcpu") == {"method": "rcpu"}
    assert cmp.parse_method("rcpu+compensate_attn=false+ridge_lambda=0.1") == {
        "method": "rcpu", "compensate_attn": False, "ridge_lambda": 0.1}
    with pytest.raises(RcpuError, match="unknown method"):
        cmp.parse_method("obs")
    with pytest.raises(RcpuError, match="bad override"):
        cmp.parse_method("rcpu+pruning_ratio=0.5")
    # the same spelling as the flags: a tuple field comma-separated, numbers by the field's type
    kw = cmp.parse_method("ridge-auto+ridge_grid=0.1,1,10+nholdout=16+refine_lr=1e-3")
    assert kw == {"method": "ridge-auto", "ridge_grid": (0.1, 1.0, 10.0), "nholdout": 16, "refine_lr": 1e-3}
    assert PruneConfig(**kw).validate().ridge_grid == (0.1, 1.0, 10.0)
    for bad, what in (("rcpu+nholdout=1.5", "integer"), ("rcpu+compensate_mlp=yes", "true or false"),
                      ("ridge-auto+ridge_grid=a,b", "comma-separated numbers")):
        with pytest.raises(RcpuError, match=what):
            cmp.parse_method(bad)


def test_split_methods_keeps_a_tuple_override_together():
    assert cmp.split_methods("rcpu, ridge-auto+ridge_grid=0.1,1,10,flap+compensation=ridge,wanda-sp") == [
        "rcpu", "ridge-auto+ridge_grid=0.1,1,10", "flap+compensation=ridge", "wanda-sp"]
    assert cmp.split_methods("rcpu,obs") == ["rcpu", "obs"]  # an unknown name stays its own spec (and fails there)


def test_compare_writes_table_plot_and_resumes(tiny_checkpoint, tmp_path, monkeypatch):
    text = str(tiny_checkpoint / "text.txt")
    kw = dict(calib=text, eval_source=text, nsamples=[8, 16], seqlen=32, eval_seqlens=[32], progress=False)
    out = tmp_path / "cmp"
    res = cmp.run_compare(str(tiny_checkpoint / "model"), ["wanda-sp", "ridge-auto", "flap"], [0.25, 0.5], out, **kw)
    cells = res["cells"]
    assert len(cells) == 1 + 3 * 2 * 2 and "dense" in cells
    for key, cell in cells.items():
        if key != "dense":
            assert cell["ppl"]["32"]["seqlen"] == 32 and cell["prune_s"] >= 0 and cell["params"]["ratio_total"] > 0
            assert cell["ppl"]["32"]["n_tokens"] == cells["dense"]["ppl"]["32"]["n_tokens"]  # same eval tokens
    assert cells["ridge-auto@0.5/n16"]["ridge_lambdas"]
    md = (out / "results.md").read_text()
    assert "| dense |" in md and "| flap (n=16) |" in md and "50%" in md
    assert (out / "ppl.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["cells"].keys() == cells.keys()

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(cmp, "prune", boom)
    again = cmp.run_compare(str(tiny_checkpoint / "model"), ["wanda-sp"], [0.25, 0.5], out, **kw)
    assert again["cells"]["wanda-sp@0.5/n8"]["ppl"] == cells["wanda-sp@0.5/n8"]["ppl"]
    with pytest.raises(RcpuError, match="another protocol"):
        cmp.run_compare(str(tiny_checkpoint / "model"), ["wanda-sp"], [0.5], out, **{**kw, "seqlen": 16})


def test_bench_prints_speedup(tiny_checkpoint, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_checkpoint / "model"), "--calib", str(tiny_checkpoint / "text.txt"),
                 "--eval", "none", "--nsamples", "8", "--seqlen", "32", "--pruning_ratio", "0.5",
                 "--save_model", str(pruned), "-q"]) == 0
    assert main(["bench", "--model", str(pruned), "--baseline", str(tiny_checkpoint / "model"), "--device", "cpu",
                 "--prompt_len", "16", "--new_tokens", "4", "--repeats", "2", "--output", str(tmp_path / "b.json"),
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out
    assert json.loads((tmp_path / "b.json").read_text())["speedup"]["prefill"]["median"] > 0


def _small_compare(tiny_checkpoint, out, **kw):
    text = str(tiny_checkpoint / "text.txt")
    return cmp.run_compare(str(tiny_checkpoint / "model"), ["wanda-sp", "ridge-auto"], [0.25, 0.5], out, calib=text,
                           eval_source=text, nsamples=[8], seqlen=32, eval_seqlens=[32], progress=False, **kw)


def test_gpus_executor_without_cuda_is_one_line_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RcpuError, match="--executor gpus needs CUDA"):
        _small_compare(tiny_checkpoint, tmp_path / "a", executor="gpus")
    assert not (tmp_path / "a").exists()  # refused before anything was loaded or written
    assert main(["compare", "--model", str(tiny_checkpoint / "model"), "--output", str(tmp_path / "b"),
                 "--executor", "gpus", "--gpus", "0,1", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs CUDA" in err and len(err.splitlines()) == 1
    with pytest.raises(RcpuError, match="need --executor gpus or ray"):
        _small_compare(tiny_checkpoint, tmp_path / "c", gpus=[0])


def test_ray_missing_is_one_line_error(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RcpuError, match=r"pip install 'rcpu\[ray\]'"):
        _small_compare(tiny_checkpoint, tmp_path / "a", executor="ray")
    assert not (tmp_path / "a").exists()
    with pytest.raises(RcpuError, match="unknown executor"):
        _small_compare(tiny_checkpoint, tmp_path / "b", executor="slurm")


def test_worker_processes_match_local(tiny_checkpoint, tmp_path, monkeypatch):
    """The per-GPU executor's process pool, with CPU slots: same cells as the local run,
    computed in other processes, merged and written by this one."""
    local = _small_compare(tiny_checkpoint, tmp_path / "local")["cells"]
    slots = [None, None]

    def cpu_pool(name, device, **kw):
        return lambda jobs, tensors, cell_fn, on_done: executors.run_processes(jobs, tensors, cell_fn, on_done, slots)

    monkeypatch.setattr(executors, "make", cpu_pool)
    res = _small_compare(tiny_checkpoint, tmp_path / "pool", executor="gpus")
    assert list(res["cells"]) == list(local) and res["cells_this_run"] == list(local)
    for key, cell in res["cells"].items():
        assert cell["ppl"] == local[key]["ppl"] and cell.get("params") == local[key].get("params")
        assert cell["worker"]["pid"] != os.getpid() and local[key]["worker"]["pid"] == os.getpid()
    # which worker takes which cell is up to the scheduler: on a loaded machine the first
    # worker to start can drain the queue before the second is ready
    assert 1 <= len({c["worker"]["pid"] for c in res["cells"].values()}) <= len(slots)
    on_disk = json.loads((tmp_path / "pool" / "results.json").read_text())
    assert on_disk["cells"] == json.loads(json.dumps(res["cells"], default=str))


def test_gpu_slots_follow_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert executors.gpu_slots(None) == ["3", "5"]  # one worker per visible GPU, pinned by its real id
    assert executors.gpu_slots([1]) == ["5"]
    with pytest.raises(RcpuError, match="only 2 CUDA device"):
        executors.gpu_slots([2])
    with pytest.raises(RcpuError, match="twice"):
        executors.gpu_slots([0, 0])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert executors.gpu_slots([1, 0]) == ["1", "0"]
    with pytest.raises(RcpuError, match="runs every cell on a GPU"):
        executors.make("gpus", torch.device("cpu"))
    with pytest.raises(RcpuError, match="--gpus 0,1 rather than --device cuda:N"):
        executors.make("gpus", torch.device("cuda:1"))
    assert callable(executors.make("gpus", torch.device("cuda"), gpus=[0]))



def test_settings_the_architecture_cannot_save_fail_before_any_cell(tiny_checkpoint, tmp_path, monkeypatch):
    """6 of 8 heads with bias compensation: LlamaConfig refuses 64 % 6 and the biases rule out
    the Mistral remap. One error up front, not after the cells before it have run."""
    text = str(tiny_checkpoint / "text.txt")

    def boom(*a, **k):
        raise AssertionError("a cell ran")

    monkeypatch.setattr(cmp, "run_cell", boom)
    with pytest.raises(RcpuError, match="cannot be saved as a stock llama checkpoint"):
        cmp.run_compare(str(tiny_checkpoint / "model"), ["wanda-sp", "wanda-sp+compensation=bias"], [0.25],
                        tmp_path / "out", calib=text, eval_source=text, nsamples=[8], seqlen=32, eval_seqlens=[32],
                        progress=False)
    assert not (tmp_path / "out" / cmp.RESULTS).exists()


def test_a_methods_own_batch_size_overrides_the_runs(tiny_checkpoint, tmp_path):
    """``+batch_size=2`` is a PruneConfig field like any other (with refinement it sets the
    steps per epoch); it used to collide with the run's --batch_size."""
    text = str(tiny_checkpoint / "text.txt")
    res = cmp.run_compare(str(tiny_checkpoint / "model"), ["wanda-sp+batch_size=2"], [0.5], tmp_path / "c",
                          calib=text, eval_source=text, nsamples=[8], seqlen=32, eval_seqlens=[32], progress=False)
    assert res["cells"]["wanda-sp+batch_size=2@0.5/n8"]["config"]["batch_size"] == 2
