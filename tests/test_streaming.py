"""Pruning layer by layer from disk: the same bytes as the in-memory path, resume after a
killed process, and one-line errors for devices and window lengths."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_text, make_tokenizer, make_windows, same_threads_env
from safetensors.torch import load_file

from rcpu import RcpuError
from rcpu.api import prune
from rcpu.cli import main
from rcpu.compare import parse_method
from rcpu.config import PruneConfig
from rcpu.export import PROVENANCE, save_pruned
from rcpu.loading import load_model
from rcpu.streaming import RESUME_FILE, prune_checkpoint, work_dir_for


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    la = json.loads((a / PROVENANCE).read_text())["layers"]
    lb = json.loads((b / PROVENANCE).read_text())["layers"]
    assert len(la) == len(lb)
    for ra, rb in zip(la, lb, strict=True):
        for key in ("index", "kept_heads", "kept_kv_heads", "kept_channels"):
            assert ra[key] == rb[key]
        for part in ("attn", "mlp", "refine"):  # float64 diagnostics; BLAS threading may change the last bits
            fa, fb = _flat(ra[part]), _flat(rb[part])
            assert fa.keys() == fb.keys()
            for k in fa.keys() - {"compensate_s", "products_pass_s", "seconds"}:
                assert fa[k] == (pytest.approx(fb[k], rel=1e-9) if isinstance(fb[k], float) else fb[k]), k


@pytest.mark.parametrize("family,method,dtype", [("llama", "rcpu", torch.float32), ("qwen2", "ridge-auto", torch.float32),
                                                 ("llama", "flap", torch.float32), ("mistral", "wanda-sp", torch.float32),
                                                 ("qwen2", "rcpu-scaled", torch.bfloat16),
                                                 ("mistral", "flap-ridge+allocation=global_mlp", torch.float32),
                                                 ("qwen2", "flap-ridge+allocation=error", torch.float32),
                                                 ("llama", "ridge+refine_epochs=2", torch.bfloat16),
                                                 # output biases on families without bias switches
                                                 ("qwen2", "flap", torch.float32),
                                                 ("mistral", "wanda-sp+compensation=bias", torch.bfloat16),
                                                 ("llama", "rcpu+rotation_products=direct", torch.float32),
                                                 # the other families: fused projections (phi3), norms over
                                                 # heads or whole projections (qwen3, olmo2), mixed sliding /
                                                 # global layers and a scaled embedding (gemma3), tied heads;
                                                 # Gemma 3 270M's 4 heads over 1 KV head cut to 3 (hidden % 3 != 0)
                                                 ("gemma3", "ridge-auto", torch.float32), ("gemma3", "flap", torch.float32),
                                                 ("gemma3-4x1", "rcpu", torch.float32),
                                                 ("phi3", "ridge-auto", torch.float32),
                                                 ("phi3", "flap-ridge+allocation=global_mlp", torch.bfloat16),
                                                 ("olmo2", "rcpu-scaled", torch.float32),
                                                 ("olmo2", "flap-ridge+allocation=error", torch.float32),
                                                 ("qwen3", "wanda-sp", torch.bfloat16), ("smollm3", "flap", torch.float32),
                                                 ("llama3", "ridge+refine_epochs=2", torch.bfloat16)])
def test_streamed_equals_in_memory(tmp_path, family, method, dtype):
    src = tmp_path / "src"
    tied = {"tie_word_embeddings": True} if family in ("llama", "gemma3-4x1") else {}
    if family == "gemma3-4x1":
        family, tied = "gemma3", {**tied, "heads": 4, "kv_heads": 1, "head_dim": 16}
    make_model(family, layers=3, **tied).save_pretrained(src, max_shard_size="50KB")
    make_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    cfg = PruneConfig(**parse_method(method), pruning_ratio=0.5)
    windows = make_windows()
    heldout = make_windows(8, 32, seed=7) if cfg.needs_heldout else None
    loaded = load_model(str(src), dtype=dtype)
    model, report = prune(loaded.model, cfg, windows=windows, heldout_windows=heldout, device="cpu", progress=False)
    save_pruned(model, loaded.tokenizer, tmp_path / "memory", report.to_dict())
    res = prune_checkpoint(src, cfg, tmp_path / "streamed", windows=windows, heldout_windows=heldout, progress=False,
                           dtype=dtype, source_name="org/name")
    _assert_same_checkpoint(tmp_path / "memory", res.path)
    assert res.report.params == report.params
    # the name the user gave (e.g. a built-in), not the resolved path: GGUF export and recovery look it up
    assert json.loads((res.path / "rcpu_provenance.json").read_text())["model"]["source"] == "org/name"
    assert res.report.model["streamed"] and not work_dir_for(res.path).exists()
    assert all(t.dtype == dtype for t in _tensors(res.path).values())
    assert json.loads((res.path / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    reloaded = load_model(str(res.path), trust_remote_code=not report.params["uniform"], dtype=dtype).model
    x = make_windows(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def _checkpoint(root: Path, layers: int, hidden: int = 64, intermediate: int = 96) -> Path:
    src = root / "src"
    make_model("llama", layers=layers, hidden=hidden, intermediate=intermediate, heads=8, kv_heads=2,
               head_dim=hidden // 8).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    (root / "text.txt").write_text(make_text(20000))
    return src


def _cli(src: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(src), "--calib", str(text), "--eval", "none", "--device", "cpu",
            "--method", "rcpu", "--pruning_ratio", "0.3", "--nsamples", "32", "--seqlen", "64",
            "--save_model", str(out), "-q", *extra]


def test_cli_streams_by_default_and_matches_in_memory(tmp_path, capsys):
    src = _checkpoint(tmp_path, layers=2)
    assert main(_cli(src, tmp_path / "text.txt", tmp_path / "streamed")) == 0
    assert "streamed from" in capsys.readouterr().out
    assert main(_cli(src, tmp_path / "text.txt", tmp_path / "memory", "--no-stream")) == 0
    _assert_same_checkpoint(tmp_path / "streamed", tmp_path / "memory")
    assert json.loads((tmp_path / "streamed" / PROVENANCE).read_text())["model"]["streamed"]


def test_resume_after_sigkill_gives_the_uninterrupted_result(tmp_path):
    """A real process is killed with SIGKILL mid-run; --resume finishes it bit for bit."""
    n_layers = 24
    src = _checkpoint(tmp_path, layers=n_layers, hidden=128, intermediate=384)
    text, out = tmp_path / "text.txt", tmp_path / "out"
    cmd = [sys.executable, "-m", "rcpu.cli", *_cli(src, text, out)]
    env = same_threads_env(1)  # the uninterrupted reference below runs with the same thread count
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    state = work_dir_for(out) / RESUME_FILE
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file():
            try:
                done = json.loads(state.read_text())["next_layer"]
            except (ValueError, KeyError):
                done = 0
            if done >= 2:
                break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and work_dir_for(out).exists()
    killed_at = json.loads(state.read_text())["next_layer"]
    assert 2 <= killed_at < n_layers

    # without --resume, and with other settings, the leftover is not silently reused
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "pass --resume" in run.stderr
    other = [c if c != "0.3" else "0.2" for c in cmd] + ["--resume"]
    run = subprocess.run(other, capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "other settings" in run.stderr.strip().splitlines()[-1]

    run = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert f"resuming at layer {killed_at} of {n_layers}" in run.stdout
    assert out.is_dir() and not work_dir_for(out).exists()

    # the reference in a process like the killed and resumed ones: another thread count may change
    # the last bits of a few tensors (BLAS splits its sums differently), interrupted or not
    reference = [sys.executable, "-m", "rcpu.cli", *_cli(src, text, tmp_path / "uninterrupted")]
    run = subprocess.run(reference, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    _assert_same_checkpoint(out, tmp_path / "uninterrupted")


@pytest.mark.parametrize("family,method,where", [("phi3", "ridge-auto", "writing"), ("gemma3", "flap", "computing"),
                                                  ("gemma3", "flap", "planning")])
def test_interrupted_stream_resumes_to_the_uninterrupted_checkpoint(tmp_path, monkeypatch, family, method, where):
    """Ctrl-C (KeyboardInterrupt) while layer 2 of 4 is written (a partial shard is left), in the
    middle of its statistics pass, or during the global allocation's scoring pass before any layer
    is written; resuming reads only the layers not yet written and gives the uninterrupted run's
    checkpoint bit for bit. Fused projections (Phi-3), and mixed sliding / global layers with
    global allocation (Gemma 3)."""
    import rcpu.streaming as streaming

    src = tmp_path / "src"
    make_model(family, layers=4).save_pretrained(src, max_shard_size="50KB")
    make_tokenizer().save_pretrained(src)
    cfg = PruneConfig(**parse_method(method), pruning_ratio=0.5)
    windows = make_windows()
    heldout = make_windows(8, 32, seed=7) if cfg.needs_heldout else None

    def run(out, **kw):
        return prune_checkpoint(src, cfg, out, windows=windows, heldout_windows=heldout, progress=False, **kw)

    reference = run(tmp_path / "reference").path
    out = tmp_path / "out"
    real_save, real_load = streaming._atomic_save, streaming.StreamingStore.load
    stop_at = 0 if where == "planning" else 2  # the first layer that is not written

    def save_then_interrupt(tensors, path):
        if path.name == streaming.shard_name(stop_at, 5):
            path.with_name(path.name + ".partial").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_save(tensors, path)

    def interrupt(*_):
        raise KeyboardInterrupt

    def load_then_interrupt(self, index):
        layer = real_load(self, index)
        if index == 2 and self.state["next_layer"] == stop_at:  # (planning reads every layer once first)
            self.adapter.mlp_out(layer).register_forward_hook(interrupt)
        return layer

    with monkeypatch.context() as patch:
        if where == "writing":
            patch.setattr(streaming, "_atomic_save", save_then_interrupt)
        else:
            patch.setattr(streaming.StreamingStore, "load", load_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run(out)
    work = work_dir_for(out)
    assert not out.exists() and json.loads((work / RESUME_FILE).read_text())["next_layer"] == stop_at
    with pytest.raises(RcpuError, match="pass --resume"):
        run(out)
    loaded, lines = [], []
    monkeypatch.setattr(streaming.StreamingStore, "load", lambda self, i: loaded.append(i) or real_load(self, i))
    res = run(out, resume=True, announce=lines.append)
    assert lines == ([f"resuming at layer {stop_at} of 4"] if stop_at else [])
    assert sorted(set(loaded)) == list(range(stop_at, 4)) and not work.exists()
    _assert_same_checkpoint(reference, res.path)


@pytest.mark.parametrize("extra,message", [
    (["--device", "bogus"], "unknown device 'bogus'"),
    (["--seqlen", "100000"], "--seqlen 100000 is longer than the model's context window (256 positions)"),
])
def test_bad_device_and_seqlen_are_one_line_errors(tiny_checkpoint, tmp_path, capsys, extra, message):
    args = ["prune", "--model", str(tiny_checkpoint / "model"), "--calib", str(tiny_checkpoint / "text.txt"),
            "--eval", "none", "-q", "--save_model", str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rcpu")]
    assert len(err) == 1 and message in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(tiny_checkpoint, capsys):
    assert main(["eval", "--model", str(tiny_checkpoint / "model"), "--device", "cuda", "--ppl", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rcpu: error: --device cuda: CUDA is not available on this machine")


def test_hidden_state_placement():
    from rcpu.layer_io import hidden_state_storage

    cuda = torch.device("cuda")
    where, info = hidden_state_storage("auto", cuda, 128 * 128, 4096, torch.bfloat16, max_gib=0.01)
    assert where.type == "cpu" and info["hidden_states_mib"] == 2 * 128 * 128 * 4096 * 2 / 2**20
    assert hidden_state_storage("auto", cuda, 16, 64, torch.float32, max_gib=1)[0] == cuda
    assert hidden_state_storage("cpu", cuda, 16, 64, torch.float32)[0].type == "cpu"
    assert hidden_state_storage("auto", torch.device("cpu"), 16, 64, torch.float32)[0].type == "cpu"
    # on the CPU both placements are the same computation
    cfg = PruneConfig(method="rcpu", pruning_ratio=0.5)
    a, ra = prune(make_model(), cfg, windows=make_windows(), device="cpu", progress=False, hidden_states="cpu")
    b, rb = prune(make_model(), cfg, windows=make_windows(), device="cpu", progress=False)
    assert ra.memory["hidden_states_on"] == "cpu"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_from_gguf_equals_in_memory(tmp_path, family):
    """A GGUF file is dequantised per layer while streaming, with transformers' own name map and
    tensor processors (Llama's q/k permutation), so the result equals pruning the loaded file."""
    from test_gguf_export import bpe_tokenizer, tiny

    from rcpu.gguf_export import export_gguf

    gguf = tmp_path / "m.gguf"
    export_gguf(tiny(family), bpe_tokenizer(), gguf, quant="f32")
    cfg = PruneConfig(method="rcpu", pruning_ratio=0.5)
    windows = torch.randint(0, len(bpe_tokenizer()), (24, 32), generator=torch.Generator().manual_seed(1))
    loaded = load_model(str(gguf))
    model, report = prune(loaded.model, cfg, windows=windows, device="cpu", progress=False)
    save_pruned(model, loaded.tokenizer, tmp_path / "memory", report.to_dict())
    res = prune_checkpoint(gguf, cfg, tmp_path / "streamed", windows=windows, progress=False)
    _assert_same_checkpoint(tmp_path / "memory", res.path)


def test_the_resume_key_identifies_the_model_by_content_not_path_or_time(tmp_path):
    """A copy elsewhere with a new modification time is the same model; other weights of the same
    shapes (same file size) are not, in safetensors and GGUF files alike."""
    import os

    from rcpu.loading import SafetensorsCheckpoint, content_fingerprint

    src = _checkpoint(tmp_path, layers=2)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(src, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    fp = SafetensorsCheckpoint(src, torch.float32).fingerprint()
    assert SafetensorsCheckpoint(copy, torch.float32).fingerprint() == fp
    assert str(src) not in json.dumps(fp)
    other = tmp_path / "other"
    make_model("llama", layers=2, seed=1).save_pretrained(other)  # the same shapes, other values
    assert (other / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size
    assert SafetensorsCheckpoint(other, torch.float32).fingerprint() != fp
    blob = tmp_path / "model.gguf"  # any other file: size, first block and sampled blocks
    data = bytearray(os.urandom(1 << 20))
    blob.write_bytes(data)
    before = content_fingerprint(blob)
    data[len(data) // 2] ^= 1  # the middle block is sampled
    blob.write_bytes(data)
    assert content_fingerprint(blob) != before
