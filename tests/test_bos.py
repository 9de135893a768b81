"""BOS first in every window, for tokenizers that add one (Gemma); nothing changes for the others.

Calibration, held-out, evaluation and recovery windows all come from rcpu.data; a window is
BOS + (seqlen - 1) text tokens, and the BOS is an input only, never a predicted token.
"""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_text, make_tokenizer

from rcpu import compare as cmp
from rcpu import data
from rcpu.api import calibration_windows_for
from rcpu.cli import main
from rcpu.config import PruneConfig
from rcpu.evaluate import perplexity
from rcpu.recover.run import eval_windows
from rcpu.recover.windows import TrainingWindows

BOS = 1


def test_bos_token_id_follows_what_the_tokenizer_does():
    plain, with_bos = make_tokenizer(), make_tokenizer(bos=True)
    assert plain.bos_token_id == BOS and data.bos_token_id(plain) is None  # has a BOS token, never adds it
    assert with_bos("w3 w4")["input_ids"][0] == BOS and data.bos_token_id(with_bos) == BOS
    assert data.tokenize(with_bos, "w3 w4").tolist() == [6, 7]  # the text itself is tokenised without it


def test_windows_without_bos_are_unchanged():
    ids = torch.arange(3, 1003)
    starts = torch.randint(0, 1000 - 32 + 1, (8,), generator=torch.Generator().manual_seed(5))
    expected = torch.stack([ids[s:s + 32] for s in starts.tolist()])
    assert torch.equal(data.calibration_windows(ids, 8, 32, seed=5), expected)
    assert torch.equal(data.consecutive_windows(ids, 32), ids[:992].view(31, 32))
    assert data.window_span(32, None) == 32 and data.window_span(32, BOS) == 31


def test_calibration_and_heldout_windows_start_with_bos():
    ids = torch.arange(3, 5003)  # every token unique: contiguity and overlap are visible
    calib = data.calibration_windows(ids, 20, 50, seed=3, bos=BOS)
    held = data.heldout_windows(ids, 30, 20, 50, seed=3, bos=BOS)
    for windows in (calib, held):
        assert windows.shape[1] == 50 and (windows[:, 0] == BOS).all()
        assert all(torch.equal(w[1:], torch.arange(int(w[1]), int(w[1]) + 49)) for w in windows)
    assert not set(calib[:, 1:].flatten().tolist()) & set(held[:, 1:].flatten().tolist())
    # 50 tokens make two possible windows of 49 after BOS, and both are drawn
    tail = data.calibration_windows(torch.arange(3, 53), 200, 50, seed=0, bos=BOS)
    assert set(tail[:, -1].tolist()) == {51, 52}


def test_consecutive_windows_with_bos_cover_the_text_in_order():
    ids = torch.arange(3, 1003)
    windows = data.consecutive_windows(ids, 32, BOS)
    assert windows.shape == (1000 // 31, 32) and (windows[:, 0] == BOS).all()
    assert torch.equal(windows[:, 1:].reshape(-1), ids[: windows.shape[0] * 31])


@pytest.fixture(scope="module")
def model():
    return make_model("llama", layers=2)


def _manual_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    labels = windows[:, 1:]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")), labels.numel()


def test_perplexity_with_bos_scores_every_text_token_and_never_the_bos(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (1000,), generator=g)
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    try:
        res = perplexity(model, ids, 32, bos=BOS, progress=False, batch_size=7)
    finally:
        hook.remove()
    n = 1000 // 31
    assert res.n_windows == n and res.n_tokens == n * 31 and res.bos and "BOS first" in res.format()
    inputs = [t for t in seen if t.shape[-1] == 32]  # (the first call is a short probe)
    assert sum(t.shape[0] for t in inputs) == n and all((t[:, 0] == BOS).all() for t in inputs)
    windows = torch.cat([torch.full((n, 1), BOS), ids[: n * 31].view(n, 31)], dim=1)
    nll, count = _manual_nll(model, windows)
    assert count == res.n_tokens  # one prediction per text token; BOS is never a label
    assert (windows[:, 1:] != BOS).all()
    assert res.nll == pytest.approx(nll / count, rel=1e-5)
    # without a BOS: the old windows, the first token of each only an input
    plain = perplexity(model, ids, 32, progress=False)
    nll, count = _manual_nll(model, ids[: 31 * 32].view(31, 32))
    assert not plain.bos and plain.n_windows == 31 and plain.nll == pytest.approx(nll / count, rel=1e-5)


def test_recovery_windows_start_with_bos_and_match_the_evaluation():
    ids = torch.arange(3, 1003)
    w = TrainingWindows.from_ids(ids, 10, heldout=5, seed=3, bos=BOS)
    assert w.train.shape == (1000 // 9 - 5, 10) and w.heldout.shape == (5, 10)
    assert (w.train[:, 0] == BOS).all() and (w.heldout[:, 0] == BOS).all() and (w.batch(3, 4)[:, 0] == BOS).all()
    sets = eval_windows(ids, [10, 32], 500, bos=BOS)
    assert torch.equal(sets[32], data.consecutive_windows(ids[:500], 32, BOS))
    assert torch.equal(eval_windows(ids, [10], None)[10], ids.view(100, 10))  # no BOS: unchanged


def test_prune_command_with_a_bos_tokenizer(tmp_path, capsys):
    root = tmp_path
    make_model("llama", layers=2).save_pretrained(root / "model")
    make_tokenizer(bos=True).save_pretrained(root / "model")
    (root / "text.txt").write_text(make_text())
    tok = make_tokenizer(bos=True)
    cfg = PruneConfig(method="ridge-auto", pruning_ratio=0.5, nsamples=8, seqlen=32, nholdout=4)
    windows, heldout, info = calibration_windows_for(tok, cfg, str(root / "text.txt"))
    assert (windows[:, 0] == BOS).all() and (heldout[:, 0] == BOS).all() and info["bos"] == BOS
    report = root / "r.json"
    assert main(["prune", "--model", str(root / "model"), "--calib", str(root / "text.txt"), "--eval",
                 str(root / "text.txt"), "--nsamples", "8", "--seqlen", "32", "--eval_seqlen", "32", "-q",
                 "--pruning_ratio", "0.5", "--report", str(report)]) == 0
    assert "BOS first" in capsys.readouterr().out
    prov = json.loads(report.read_text())
    assert prov["calibration"]["bos"] == BOS and prov["calibration"]["windows_sha256"] == data.token_hash(
        data.calibration_windows(data.tokenize(tok, (root / "text.txt").read_text()), 8, 32, 0, BOS))
    out = cmp.run_compare(str(root / "model"), ["rcpu"], [0.5], root / "cmp", calib=str(root / "text.txt"),
                          eval_source=str(root / "text.txt"), nsamples=[8], seqlen=32, eval_seqlens=[32],
                          progress=False)
    assert out["protocol_details"]["bos"] == BOS
    dense = out["cells"]["dense"]["ppl"]["32"]
    assert dense["bos"] and dense["n_windows"] == data.tokenize(tok, (root / "text.txt").read_text()).numel() // 31
    shutil.rmtree(root / "cmp", ignore_errors=True)
