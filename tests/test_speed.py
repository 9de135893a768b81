import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rcpu.errors import RcpuError
from rcpu.evaluate.speed import SpeedComparison, SpeedStats, compare_speed, greedy_run, make_prompts

PROMPT, NEW, REPEATS = 16, 8, 2


def _llama(*, heads=8, kv_heads=2, intermediate=128, vocab=128, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls on a shared, oversubscribed CI box are dominated by OpenMP thread contention
    (tens of ms per 64-wide linear with 2 threads under load); one thread keeps this module fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dense():
    return _llama()


@pytest.fixture(scope="module")
def pruned():
    return _llama(heads=4, kv_heads=2, intermediate=48, seed=1)


@pytest.fixture(scope="module")
def comparison(dense, pruned):
    return compare_speed(pruned, dense, batch_size=2, prompt_len=PROMPT, new_tokens=NEW, repeats=REPEATS, warmup=1)


def test_fields_positive_and_finite(comparison, dense, pruned):
    for stats, model in ((comparison.model, pruned), (comparison.baseline, dense)):
        assert isinstance(stats, SpeedStats)
        for v in (stats.prefill_tokens_per_s, *stats.prefill_spread, stats.decode_tokens_per_s, *stats.decode_spread):
            assert v > 0 and math.isfinite(v)
        assert stats.prefill_spread[0] <= stats.prefill_tokens_per_s <= stats.prefill_spread[1]
        assert stats.decode_spread[0] <= stats.decode_tokens_per_s <= stats.decode_spread[1]
        assert len(stats.prefill_times) == len(stats.decode_times) == REPEATS
        assert all(t > 0 for t in stats.prefill_times + stats.decode_times)
        assert stats.prefill_tokens == 2 * PROMPT and stats.decode_tokens == 2 * NEW
        assert stats.params == sum(p.numel() for p in model.parameters())
        # CPU: weights only, and said so
        assert stats.memory_kind == "cpu_weights"
        nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        assert stats.peak_memory_mib == pytest.approx(nbytes / 2**20)
        assert stats.prefill_logits == "last"
    assert comparison.model.params < comparison.baseline.params
    s = comparison.settings
    assert (s["batch_size"], s["prompt_len"], s["new_tokens"], s["repeats"]) == (2, PROMPT, NEW, REPEATS)
    assert s["dtype"] == "float32" and s["device"] == "cpu" and s["torch"] == torch.__version__


def test_tokens_per_s_are_medians_of_stored_times(comparison):
    st = comparison.model
    rates = sorted(st.prefill_tokens / t for t in st.prefill_times)
    assert st.prefill_tokens_per_s == pytest.approx(sum(rates) / 2)  # median of two
    assert st.prefill_spread == pytest.approx((rates[0], rates[-1]))


def test_speedup_is_per_repeat_ratio(comparison):
    sp = comparison.speedup()
    m, b = comparison.model, comparison.baseline
    for phase in ("prefill", "decode"):
        mt, bt = getattr(m, f"{phase}_times"), getattr(b, f"{phase}_times")
        ntok = getattr(m, f"{phase}_tokens")
        expected = [(ntok / tm) / (ntok / tb) for tm, tb in zip(mt, bt, strict=True)]
        assert sp[phase]["per_repeat"] == pytest.approx(expected)
        assert sp[phase]["median"] == pytest.approx(sorted(expected)[0] / 2 + sorted(expected)[1] / 2)
        assert sp[phase]["min"] == pytest.approx(min(expected))
        assert sp[phase]["max"] == pytest.approx(max(expected))


def test_speedup_from_known_times():
    def stats(pre, dec):
        return SpeedStats.from_times(pre, dec, prefill_tokens=100, decode_tokens=10, peak_memory_mib=1.0,
                                     memory_kind="cpu_weights", params=1, weights_mib=1.0, prefill_logits="last")

    cmp = SpeedComparison(model=stats([1.0, 2.0, 1.0], [1.0, 1.0, 1.0]),
                          baseline=stats([2.0, 2.0, 3.0], [1.5, 1.0, 2.0]), settings={})
    sp = cmp.speedup()
    assert sp["prefill"]["per_repeat"] == pytest.approx([2.0, 1.0, 3.0])
    assert (sp["prefill"]["median"], sp["prefill"]["min"], sp["prefill"]["max"]) == pytest.approx((2.0, 1.0, 3.0))
    assert sp["decode"]["median"] == pytest.approx(1.5)
    assert "prefill speed-up 2.00x (1.00-3.00)" in cmp.format()


def test_format_and_to_dict(comparison):
    text = comparison.format()
    assert "speed-up" in text
    assert len(text.splitlines()) >= 3
    d = json.loads(json.dumps(comparison.to_dict()))
    assert set(d) == {"settings", "model", "baseline", "speedup"}
    assert d["model"]["prefill_times"] == comparison.model.prefill_times
    assert d["speedup"]["decode"]["per_repeat"] == pytest.approx(comparison.speedup()["decode"]["per_repeat"])


def test_runs_alternate(dense, pruned):
    calls = []

    def recorder(name):
        def hook(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids.shape[1] > 1:  # a prefill starts a run
                calls.append(name)
        return hook

    handles = [pruned.register_forward_pre_hook(recorder("A"), with_kwargs=True),
               dense.register_forward_pre_hook(recorder("B"), with_kwargs=True)]
    try:
        compare_speed(pruned, dense, prompt_len=PROMPT, new_tokens=2, repeats=3, warmup=1)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["A", "B"] * 4  # 1 warm-up round + 3 timed rounds


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_matches_generate(pruned, batch):
    prompt = make_prompts(batch, PROMPT, 128, seed=5)
    with torch.inference_mode():
        _, _, tokens = greedy_run(pruned, prompt, NEW, device=torch.device("cpu"))
        ref = pruned.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=NEW + 1, min_new_tokens=NEW + 1)
    assert tokens.shape == (batch, NEW + 1)
    assert torch.equal(tokens, ref[:, PROMPT:])


def test_decode_loop_full_logits_path_matches(pruned):
    prompt = make_prompts(1, PROMPT, 128, seed=6)
    with torch.inference_mode():
        _, _, a = greedy_run(pruned, prompt, NEW, device=torch.device("cpu"), logits_to_keep=True)
        _, _, b = greedy_run(pruned, prompt, NEW, device=torch.device("cpu"), logits_to_keep=False)
    assert torch.equal(a, b)


def test_prompts_seeded_and_within_smaller_vocab(dense):
    a, b = make_prompts(2, 50, 37, seed=3), make_prompts(2, 50, 37, seed=3)
    assert torch.equal(a, b) and int(a.max()) < 37 and a.dtype == torch.long
    assert not torch.equal(a, make_prompts(2, 50, 37, seed=4))
    small = _llama(vocab=40, heads=4, intermediate=48)
    res = compare_speed(small, dense, prompt_len=8, new_tokens=2, repeats=1, warmup=0)
    assert res.settings["vocab_sampled"] == 40


def test_training_flag_restored(dense, pruned):
    pruned.train()
    try:
        compare_speed(pruned, dense, prompt_len=8, new_tokens=1, repeats=1, warmup=0)
        assert pruned.training and not dense.training
    finally:
        pruned.eval()


def test_rejects_bad_input(dense, pruned):
    with pytest.raises(RcpuError, match="dtype"):
        compare_speed(_llama(dtype=torch.bfloat16), dense, prompt_len=8, new_tokens=1, repeats=1)
    for kwargs in ({"repeats": 0}, {"prompt_len": 0}, {"new_tokens": 0}, {"batch_size": 1.5}, {"warmup": -1}):
        with pytest.raises(RcpuError):
            compare_speed(pruned, dense, **kwargs)
