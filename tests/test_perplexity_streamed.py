"""Perplexity of a checkpoint on disk, one decoder layer at a time: the same float as the
in-memory evaluation of the loaded model (same windows and batches, the same operations on
each batch in the same order), for every family, tied and untied heads, rcpu's per-layer
checkpoints, GGUF files and logits changed after the head; and ``rcpu prune --save_model``
with the default evaluation never loads the whole model."""

import json
import logging

import pytest
import torch
from conftest import make_model, make_text, make_tokenizer, make_windows

from rcpu.evaluate import perplexity
from rcpu.evaluate.streamed import perplexity_streamed
from rcpu.export import save_pruned
from rcpu.loading import load_model
from rcpu.models import get_adapter

# 13 windows of 32 tokens and 5 left over; batches of 4 leave a last batch of 1
IDS = make_windows(1, 13 * 32 + 5, seed=3)[0]


def _save(model, path, **kw):
    model.save_pretrained(path, max_shard_size="50KB", **kw)
    make_tokenizer().save_pretrained(path)
    return path


def _same(checkpoint, *, trust_remote_code=False, dtype=torch.float32, **kw):
    """In-memory and streamed results on the CPU; the streamed one is returned after the check."""
    model = load_model(str(checkpoint), dtype=dtype, trust_remote_code=trust_remote_code).model
    mem = perplexity(model, IDS, 32, batch_size=4, progress=False, source="x")
    streamed = perplexity_streamed(checkpoint, IDS, 32, batch_size=4, dtype=dtype, progress=False, source="x",
                                   trust_remote_code=trust_remote_code, **kw)
    assert streamed == mem  # every field, the float NLL bit for bit
    assert streamed.n_windows == 13
    return streamed


def test_stock_checkpoint_every_family(tmp_path, family):
    res = _same(_save(make_model(family, layers=4), tmp_path / "m"))
    assert res.dtype == "float32" and 1 < res.ppl < 1000


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("gemma3", False)])
def test_tied_and_untied_heads(tmp_path, family, tied):
    model = make_model(family, layers=2, tie_word_embeddings=tied)
    if not tied:
        with torch.no_grad():  # a head that differs from the embeddings
            model.lm_head.weight.normal_(0, 0.05)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
    _same(_save(model, tmp_path / "m"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_rcpu_per_layer_checkpoint(tmp_path, family):
    """Other widths in every layer: a checkpoint with rcpu's own model type (``rcpu_*``)."""
    model = make_model(family, layers=4, **({"tie_word_embeddings": True} if family == "llama" else {}))
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(2)
    for i, layer in enumerate(adapter.layers):
        if i % 2 == 0:
            adapter.prune_attention(layer, torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1]))
        adapter.prune_mlp(layer, torch.randperm(96, generator=g)[:40 + 8 * i].sort().values)
    out = save_pruned(model, make_tokenizer(), tmp_path / "pruned", {})
    assert json.loads((out / "config.json").read_text())["model_type"].startswith(f"rcpu_{family}")
    _same(out, trust_remote_code=True)


def test_bfloat16_and_hidden_states_on_the_cpu(tmp_path):
    src = _save(make_model("qwen2", layers=2), tmp_path / "m")
    _same(src, dtype=torch.bfloat16, hidden_states="cpu")
    assert _same(src, dtype=torch.bfloat16).dtype == "bfloat16"


def test_logits_changed_after_the_head(tmp_path, caplog):
    """Gemma-style final logit soft-capping: the head alone is not the model's output, so both
    paths score the model's own logits (the streamed one detects it the way the in-memory one does)."""
    model = make_model("gemma3", layers=2, final_logit_softcapping=0.5)
    src = _save(model, tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="rcpu.evaluate"):
        capped = _same(src)
    assert sum("scoring with full logits" in r.getMessage() for r in caplog.records) == 2  # in memory, streamed
    model.config.final_logit_softcapping = None
    uncapped = perplexity(model, IDS, 32, batch_size=4, progress=False, source="x")
    assert abs(capped.nll - uncapped.nll) > 1e-3  # the capping matters here


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_file(tmp_path, family):
    from test_gguf_export import bpe_tokenizer, tiny

    from rcpu.gguf_export import export_gguf

    gguf = tmp_path / "m.gguf"
    export_gguf(tiny(family), bpe_tokenizer(), gguf, quant="f32")
    model = load_model(str(gguf)).model
    ids = torch.randint(0, len(bpe_tokenizer()), (6 * 32,), generator=torch.Generator().manual_seed(1))
    mem = perplexity(model, ids, 32, batch_size=4, progress=False)
    assert perplexity_streamed(gguf, ids, 32, batch_size=4, progress=False) == mem


def test_default_batch_size_and_max_tokens(tmp_path):
    src = _save(make_model("llama", layers=2), tmp_path / "m")
    model = load_model(str(src)).model
    for kw in ({}, {"max_tokens": 100}):
        assert perplexity_streamed(src, IDS, 16, progress=False, **kw) == perplexity(model, IDS, 16, progress=False,
                                                                                     **kw)


def _refuse(*_args, **_kwargs):
    raise AssertionError("the whole model was loaded")


def test_cli_prune_save_model_never_loads_the_whole_model(tmp_path, monkeypatch, capsys):
    """``rcpu prune --model DIR --save_model OUT`` with evaluation: streamed pruning and
    streamed perplexities, and the same numbers as the in-memory run (``--no-stream``)."""
    import transformers

    from rcpu import loading
    from rcpu.cli import main

    src = _save(make_model("llama", layers=3), tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(make_text(20000))

    def args(out, *extra):
        return ["prune", "--model", str(src), "--calib", str(text), "--eval", str(text), "--device", "cpu",
                "--method", "flap", "--pruning_ratio", "0.3", "--nsamples", "32", "--seqlen", "64",
                "--eval_seqlen", "64", "--max_eval_tokens", "2000", "--save_model", str(out),
                "--report", str(out) + ".json", "-q", *extra]

    assert main(args(tmp_path / "memory", "--no-stream")) == 0  # the reference, loaded whole
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(loading, "load_model", _refuse)
        m.setattr(loading, "read_state_dict", _refuse)
        m.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(_refuse))
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(_refuse))
        assert main(args(tmp_path / "streamed")) == 0
    out = capsys.readouterr().out
    assert "streamed from" in out and "dense : ppl" in out and "pruned: ppl" in out
    streamed = json.loads((tmp_path / "streamed.json").read_text())["evaluation"]
    memory = json.loads((tmp_path / "memory.json").read_text())["evaluation"]
    assert streamed["dense"] == memory["dense"]
    assert streamed["pruned"]["ppl"] == pytest.approx(memory["pruned"]["ppl"], rel=1e-6)
    assert json.loads((tmp_path / "streamed" / "rcpu_provenance.json").read_text())["evaluation"] == streamed
    with monkeypatch.context() as m:  # the guard itself works: --no-stream loads the model and is refused
        m.setattr(loading, "load_model", _refuse)
        with pytest.raises(AssertionError, match="whole model was loaded"):
            main(args(tmp_path / "refused", "--no-stream"))


def test_bos_first_windows(tmp_path):
    """Gemma's tokenizer adds a BOS: every window starts with it, in both evaluations alike."""
    checkpoint = _save(make_model("gemma3", layers=2), tmp_path / "m")
    model = load_model(str(checkpoint)).model
    mem = perplexity(model, IDS, 32, batch_size=4, progress=False, bos=1)
    streamed = perplexity_streamed(checkpoint, IDS, 32, batch_size=4, progress=False, bos=1)
    assert streamed == mem and streamed.bos
    assert streamed != perplexity_streamed(checkpoint, IDS, 32, batch_size=4, progress=False)
