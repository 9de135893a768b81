"""The same runs on an accelerator: float32 and bfloat16 pruning on the GPU against the CPU,
streamed against in-memory, hidden states kept on the GPU or on the host, memory records,
and `rcpu compare --executor gpus`.

Skipped where CUDA is not available. ``RCPU_TEST_ACCELERATOR=cpu`` runs them with the CPU in
the accelerator's place (the GPU-only compare test still skips), which checks the tests
themselves on a machine without a GPU.
"""

import json
import os

import pytest
import torch
from conftest import make_model, make_text, make_tokenizer, make_windows
from test_streaming import _tensors

from rcpu import compare as cmp
from rcpu import compensate as comp
from rcpu.api import prune
from rcpu.cli import main
from rcpu.compare import parse_method
from rcpu.config import PruneConfig
from rcpu.evaluate.perplexity import perplexity
from rcpu.export import PROVENANCE
from rcpu.loading import load_model
from rcpu.streaming import prune_checkpoint

ACCEL = os.environ.get("RCPU_TEST_ACCELERATOR", "cuda")
ON_GPU = ACCEL.startswith("cuda")
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                reason="needs CUDA (RCPU_TEST_ACCELERATOR=cpu runs these on the CPU)")


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """TF32 would make float32 on the GPU a different computation from float32 on the CPU."""
    if not ON_GPU:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _kept(report) -> list[tuple]:
    return [(r["kept_heads"], r["kept_kv_heads"], r["kept_channels"]) for r in report.layers]


def _checkpoint(root, family="llama", layers=3):
    src = root / "src"
    make_model(family, layers=layers).save_pretrained(src, max_shard_size="50KB")
    make_tokenizer().save_pretrained(src)
    (root / "text.txt").write_text(make_text(20000))
    return src


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu().double() - b.detach().cpu().double()).norm().item()


@pytest.mark.parametrize("family,method", [("llama", "rcpu"), ("qwen2", "ridge-auto"), ("llama", "flap"), ("mistral", "wanda-sp"),
                                           ("llama", "flap-ridge"), ("qwen2", "rcpu-scaled"),
                                           ("phi3", "ridge-auto"), ("gemma3", "flap"), ("olmo2", "rcpu")])
def test_float32_on_accelerator_matches_cpu(family, method):
    """Same units kept, and float32 on the accelerator as close to the exact (float64) result
    as float32 on the CPU is.

    The compensated matrices cannot be compared element by element: the least-squares and
    Procrustes solves amplify float32 rounding along directions the calibration data barely
    excites. On an H100, o_proj differed from the CPU's by up to 0.6 % of its largest entry; on
    the CPU, float32 differs from float64 by 0.06-5 % there while the logits agree to 1e-4 of
    their scale. So each weight and the logits are measured against a float64 run on the CPU.
    """
    cfg = PruneConfig(**parse_method(method), pruning_ratio=0.5)
    windows = make_windows()
    heldout = make_windows(8, 32, seed=7) if cfg.needs_heldout else None
    runs = {}
    for name, device, dtype in (("exact", "cpu", torch.float64), ("cpu", "cpu", torch.float32),
                                ("acc", ACCEL, torch.float32)):
        model = make_model(family, layers=2).to(device=device, dtype=dtype)
        runs[name] = prune(model, cfg, windows=windows, heldout_windows=heldout, device=device, progress=False)
    (exact, exact_report), (cpu, cpu_report), (acc, acc_report) = runs["exact"], runs["cpu"], runs["acc"]
    assert _kept(acc_report) == _kept(cpu_report) == _kept(exact_report)
    assert acc_report.params == cpu_report.params
    assert next(acc.parameters()).device.type == torch.device(ACCEL).type
    cpu_state, acc_state = cpu.state_dict(), acc.state_dict()
    x = make_windows(2, 16, seed=5)
    with torch.no_grad():
        outputs = {name: m(x.to(next(m.parameters()).device)).logits for name, m in (("exact", exact), ("cpu", cpu),
                                                                                   ("acc", acc))}
    pairs = [(name, value, cpu_state[name], acc_state[name]) for name, value in exact.state_dict().items()]
    pairs.append(("logits", outputs["exact"], outputs["cpu"], outputs["acc"]))
    for name, ref, on_cpu, on_acc in pairs:
        bound = 4 * _distance(on_cpu, ref) + 1e-5 * ref.double().norm().item()
        assert _distance(on_acc, ref) <= bound, (
            f"{name}: accelerator {_distance(on_acc, ref):.3g} from float64, CPU float32 {_distance(on_cpu, ref):.3g}")


def test_bfloat16_streamed_on_accelerator(tmp_path, monkeypatch):
    """bfloat16 weights, statistics still in float64, streamed result equal to the in-memory
    one on the same device, perplexity close to float32 on the CPU, memory records."""
    src = _checkpoint(tmp_path)
    grams = []
    ridge_path = comp.ridge_path

    def spy(weight, gram, *a, **k):
        grams.append((weight.dtype, gram.dtype, gram.device.type))
        return ridge_path(weight, gram, *a, **k)

    monkeypatch.setattr(comp, "ridge_path", spy)
    cfg = PruneConfig(**parse_method("flap-ridge"), pruning_ratio=0.3)
    windows, heldout = make_windows(), make_windows(8, 32, seed=7)
    res = prune_checkpoint(src, cfg, tmp_path / "streamed", windows=windows, heldout_windows=heldout,
                           dtype=torch.bfloat16, device=ACCEL, progress=False)
    assert grams and all(g == (torch.bfloat16, torch.float64, torch.device(ACCEL).type) for g in grams)
    streamed = _tensors(res.path)
    assert all(t.dtype == torch.bfloat16 for t in streamed.values())

    loaded = load_model(str(src), dtype=torch.bfloat16)
    model, report = prune(loaded.model, cfg, windows=windows, heldout_windows=heldout, device=ACCEL, progress=False)
    assert _kept(report) == _kept(res.report)
    memory = model.state_dict()
    for name, value in streamed.items():
        torch.testing.assert_close(memory[name].cpu(), value, rtol=1e-2, atol=1e-2, msg=name)

    memory_record = res.report.memory
    assert memory_record["peak_rss_mib"] > 0
    if ON_GPU:
        assert memory_record["peak_cuda_allocated_mib"] > 0
        assert all("cuda_peak_so_far_mib" in layer["memory"] for layer in res.report.layers)

    ids = make_windows(6, 32, seed=11).reshape(-1)
    bf16 = load_model(str(res.path), dtype=torch.bfloat16).model.to(ACCEL)
    fp32 = prune(load_model(str(src)).model, cfg, windows=windows, heldout_windows=heldout, device="cpu",
                 progress=False)[0]
    ppl_bf16 = perplexity(bf16, ids, seqlen=32, device=ACCEL, progress=False).ppl
    ppl_fp32 = perplexity(fp32, ids, seqlen=32, device="cpu", progress=False).ppl
    assert ppl_bf16 == pytest.approx(ppl_fp32, rel=0.05)


def test_hidden_states_on_device_or_host_give_the_same_checkpoint(tmp_path):
    src = _checkpoint(tmp_path)
    args = ["prune", "--model", str(src), "--calib", str(tmp_path / "text.txt"), "--eval", "none", "--device", ACCEL,
            "--dtype", "bfloat16", "--method", "rcpu", "--pruning_ratio", "0.3", "--nsamples", "32", "--seqlen", "64",
            "-q"]
    where = {}
    for placement in ("device", "cpu"):
        assert main([*args, "--hidden_states", placement, "--save_model", str(tmp_path / placement)]) == 0
        prov = json.loads((tmp_path / placement / PROVENANCE).read_text())
        where[placement] = prov["memory"]["hidden_states_on"]
    assert torch.device(where["device"]).type == torch.device(ACCEL).type and where["cpu"] == "cpu"
    a, b = _tensors(tmp_path / "device"), _tensors(tmp_path / "cpu")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a bound below the hidden states' size keeps them on the host
    assert main([*args, "--max_hidden_gib", "0", "--save_model", str(tmp_path / "bounded")]) == 0
    assert json.loads((tmp_path / "bounded" / PROVENANCE).read_text())["memory"]["hidden_states_on"] == "cpu"


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("gemma3", torch.bfloat16)])
def test_streamed_perplexity_on_accelerator(tmp_path, family, dtype):
    """Perplexity read layer by layer on the accelerator against the loaded model there: the
    same operations on the same device, with hidden states kept on the device or on the host."""
    from rcpu.evaluate.streamed import perplexity_streamed

    src = _checkpoint(tmp_path, family, layers=4)
    ids = make_windows(1, 9 * 32, seed=11)[0]
    model = load_model(str(src), dtype=dtype, device=ACCEL).model
    mem = perplexity(model, ids, 32, batch_size=4, progress=False)
    del model
    for placement in ("device", "cpu"):
        streamed = perplexity_streamed(src, ids, 32, batch_size=4, dtype=dtype, device=ACCEL, progress=False,
                                       hidden_states=placement)
        assert streamed.dtype == mem.dtype == str(dtype).removeprefix("torch.")
        assert streamed.nll == pytest.approx(mem.nll, rel=1e-6, abs=0), placement


@pytest.mark.skipif(not ON_GPU, reason="one worker process per GPU")
def test_compare_gpus_executor_matches_local(tmp_path):
    src = _checkpoint(tmp_path, layers=2)
    text = str(tmp_path / "text.txt")
    kw = dict(calib=text, eval_source=text, nsamples=[8], seqlen=32, eval_seqlens=[32], progress=False,
              device="cuda")
    local = cmp.run_compare(str(src), ["wanda-sp", "ridge-auto"], [0.5], tmp_path / "local", **kw)
    gpus = cmp.run_compare(str(src), ["wanda-sp", "ridge-auto"], [0.5], tmp_path / "gpus", executor="gpus",
                           gpus=list(range(torch.cuda.device_count())), **kw)
    assert gpus["cells"].keys() == local["cells"].keys()
    for key, cell in gpus["cells"].items():
        assert cell["worker"]["device"].startswith("cuda")
        assert cell["ppl"]["32"]["ppl"] == pytest.approx(local["cells"][key]["ppl"]["32"]["ppl"], rel=1e-4)
