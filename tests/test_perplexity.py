import importlib
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rcpu.errors import RcpuError
from rcpu.evaluate import PerplexityResult, perplexity

ppl_module = importlib.import_module("rcpu.evaluate.perplexity")

VOCAB = 128


def _tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (16 * 10 + 7,), generator=g)


def _reference(model, ids, seqlen):
    n = ids.numel() // seqlen
    losses = []
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seqlen : (i + 1) * seqlen][None]
            losses.append(model(w, labels=w).loss.double().item() * (seqlen - 1))
    return math.exp(sum(losses) / (n * (seqlen - 1)))


@pytest.fixture(scope="module")
def ref16(model, ids):
    return _reference(model, ids, 16)


def test_split_path_used_for_llama(model, ids):
    split = ppl_module._split_model(model, ids[None, :16])
    assert split is not None
    assert split[1] is model.lm_head


def test_matches_direct_computation(model, ids, ref16):
    res = perplexity(model, ids, 16, progress=False)
    assert isinstance(res, PerplexityResult)
    assert res.ppl == pytest.approx(ref16, rel=1e-5)
    assert res.nll == pytest.approx(math.log(res.ppl), rel=1e-9)
    assert res.n_windows == 10
    assert res.n_tokens == 10 * 15
    assert res.seqlen == 16
    assert res.dtype == "float32"


def test_fallback_path_matches(model, ids, ref16, monkeypatch):
    # Force the plain model(input_ids).logits path.
    monkeypatch.setattr(ppl_module, "_split_model", lambda model, probe: None)
    res = perplexity(model, ids, 16, progress=False)
    assert res.ppl == pytest.approx(ref16, rel=1e-5)


def test_chunked_head_matches(model, ids, ref16, monkeypatch):
    # Tiny chunks: several head calls per batch, including a ragged last chunk.
    monkeypatch.setattr(ppl_module, "_LOGIT_CHUNK_ELEMENTS", VOCAB * 7)
    res = perplexity(model, ids, 16, batch_size=3, progress=False)
    assert res.ppl == pytest.approx(ref16, rel=1e-5)


def test_logit_postprocessing_detected(ids):
    # A model whose forward modifies the head output must not use the split path.
    model = _tiny_llama()
    inner_forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = inner_forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled_forward
    res = perplexity(model, ids, 16, progress=False)
    n = ids.numel() // 16
    w = ids[: n * 16].view(n, 16)
    with torch.no_grad():
        logits = model(input_ids=w).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1))
    assert res.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_independent_of_batch_size(model, ids):
    ppls = [perplexity(model, ids, 16, batch_size=b, progress=False).ppl for b in (1, 3, None, 100)]
    for p in ppls[1:]:
        assert p == pytest.approx(ppls[0], rel=1e-5)


def test_max_tokens_truncates(model, ids):
    res = perplexity(model, ids, 16, max_tokens=70, progress=False)
    assert res.n_windows == 4
    assert res.n_tokens == 4 * 15
    assert res.ppl == pytest.approx(_reference(model, ids[:64], 16), rel=1e-5)
    # max_tokens larger than the text is harmless
    assert perplexity(model, ids, 16, max_tokens=10**9, progress=False).n_windows == 10


def test_remainder_dropped(model, ids):
    res = perplexity(model, ids, 32, progress=False)
    assert res.n_windows == ids.numel() // 32 == 5
    assert res.ppl == pytest.approx(perplexity(model, ids[: 5 * 32], 32, progress=False).ppl, rel=1e-6)


def test_too_few_tokens(model, ids):
    with pytest.raises(RcpuError, match=r"15 tokens.*seqlen 16"):
        perplexity(model, ids[:15], 16, progress=False)
    with pytest.raises(RcpuError, match="seqlen 16"):
        perplexity(model, ids, 16, max_tokens=10, progress=False)


def test_bad_arguments(model, ids):
    with pytest.raises(RcpuError):
        perplexity(model, ids.view(1, -1).repeat(2, 1), 16, progress=False)
    with pytest.raises(RcpuError):
        perplexity(model, ids, 1, progress=False)
    with pytest.raises(RcpuError):
        perplexity(model, ids, 16, batch_size=0, progress=False)


def test_restores_training_flag(ids):
    model = _tiny_llama()
    model.train()
    perplexity(model, ids, 16, progress=False)
    assert model.training


def test_format_and_to_dict(model, ids):
    res = perplexity(model, ids, 16, source="builtin:eval", progress=False)
    line = res.format()
    assert "\n" not in line
    assert line.startswith(f"ppl {res.ppl:.2f}")
    assert "seqlen 16" in line
    assert "150 tokens" in line
    assert "float32" in line
    assert "builtin:eval" in line
    d = res.to_dict()
    assert d["n_windows"] == 10 and d["source"] == "builtin:eval" and d["ppl"] == res.ppl
    big = PerplexityResult(
        ppl=21.4321,
        nll=3.0,
        n_tokens=520192,
        n_windows=4096,
        seqlen=128,
        dtype="float32",
        source="builtin:eval",
    )
    assert big.format() == "ppl 21.43  (seqlen 128, 4,096 windows, 520,192 tokens, float32, builtin:eval)"


def test_bf16_dtype(ids):
    model = _tiny_llama(dtype=torch.bfloat16)
    res = perplexity(model, ids, 16, progress=False)
    assert res.dtype == "bfloat16"
    assert "bfloat16" in res.format()
    assert math.isfinite(res.ppl)
    assert res.ppl == pytest.approx(_reference(model, ids, 16), rel=1e-2)
