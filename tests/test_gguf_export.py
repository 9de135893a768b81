"""GGUF export: llama.cpp metadata and naming, quantisation fallbacks, and real readers.

Tiny pruned models (heads 8 -> 4 with head_dim 8, so hidden / heads != head_dim) are exported and
read back by transformers' GGUF reader (logits compared with the in-memory model) and, when Node
and node-llama-cpp are installed, by llama.cpp itself (perplexity compared with torch's). Every
family of conftest's FAMILIES table is exported and run by llama.cpp, whose log-probabilities of
each next token are compared with transformers'.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import FAMILIES, LLAMA3_ROPE, make_model, make_tokenizer, make_windows
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rcpu.api import prune
from rcpu.cli import main
from rcpu.config import PruneConfig
from rcpu.errors import RcpuError
from rcpu.gguf_export import check_exportable, export_gguf, permute_qk
from rcpu.loading import load_model
from rcpu.models import get_adapter

REPO = Path(__file__).resolve().parents[1]
PROVENANCE = {"config": {"method": "ridge-auto", "pruning_ratio": 0.2, "score": "rcpu", "compensation": "ridge"},
              "params": {"ratio_attn_mlp": 0.2}, "model": {"source": "some/model"}}


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style): the kind llama.cpp's 'gpt2' vocabulary expresses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def tiny(family: str, *, intermediate: int = 96, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=8, vocab_size=len(bpe_tokenizer()), max_position_embeddings=256,
                  rms_norm_eps=1e-5)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, tie_word_embeddings=False, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, use_sliding_window=False, **common))
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    with torch.no_grad():  # larger weights than the default init, so that errors show in the logits
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    return model.eval()


def pruned(family: str, kept_channels: int = 64, **kw) -> torch.nn.Module:
    """Two query heads dropped from each KV group (8 -> 4 heads, head_dim 8 != 64 / 4), MLP narrowed."""
    model = tiny(family, **kw)
    adapter = get_adapter(model)
    for layer in adapter.layers:
        adapter.prune_attention(layer, torch.tensor([0, 2, 5, 7]), torch.tensor([0, 1]))
        adapter.prune_mlp(layer, torch.arange(kept_channels) + 3)
    adapter.finalize()
    return model


def ids(n: int = 2, length: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_permute_qk_interleaves_halves_per_head():
    w = np.arange(2 * 8, dtype=np.float32)[:, None].repeat(3, 1)  # 2 heads of 8 rows
    out = permute_qk(w, 2)
    assert out[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert out.shape == w.shape


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_f32_export_reloads_with_identical_logits(family, tmp_path):
    model = pruned(family)
    path = tmp_path / f"{family}-tiny.gguf"
    report = export_gguf(model, bpe_tokenizer(), path, quant="f32", provenance=PROVENANCE)
    # llama.cpp's qwen2 graph needs heads x head_dim = hidden: pruned heads go to its llama graph
    assert report.arch == "llama" and not report.fallbacks
    meta = fields(path)
    arch = report.arch
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.attention.head_count"] == 4 and meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta[f"{arch}.attention.key_length"] == 8 and meta[f"{arch}.attention.value_length"] == 8
    assert meta[f"{arch}.feed_forward_length"] == 64 and meta[f"{arch}.embedding_length"] == 64
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.rope.dimension_count"] == 8
    assert meta["general.rcpu.method"] == "ridge-auto" and meta["general.rcpu.source"] == "some/model"
    assert abs(meta["general.rcpu.pruning_ratio"] - 0.2) < 1e-6
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert ("output.weight" in names) == (family != "llama")  # tied embeddings are not written twice
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        got = load_model(str(path)).model(x).logits  # transformers' reader (+ explicit head_dim)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_qwen2_with_all_heads_keeps_qwen2_architecture(tmp_path):
    model = tiny("qwen2", intermediate=96)
    adapter = get_adapter(model)
    for layer in adapter.layers:
        adapter.prune_mlp(layer, torch.arange(64))
    adapter.finalize()
    path = tmp_path / "q.gguf"
    assert export_gguf(model, bpe_tokenizer(), path, quant="f32").arch == "qwen2"
    meta = fields(path)
    assert meta["qwen2.feed_forward_length"] == 64 and meta["qwen2.attention.head_count"] == 8
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(path)).model(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_transformers_reads_llama_export_directly(tmp_path):
    """No rcpu in the loop: from_pretrained(dir, gguf_file=...) undoes the q/k permutation itself."""
    model = pruned("llama")
    export_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf", quant="f16")
    other = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    assert other.config.head_dim == 8 and other.config.num_attention_heads == 4
    x = ids()
    with torch.no_grad():
        ref, got = model(x).logits, other(x).logits
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()  # f16 rounding only
    loss = torch.nn.functional.cross_entropy
    ppl_ref = loss(ref[:, :-1].reshape(-1, ref.shape[-1]), x[:, 1:].reshape(-1)).exp()
    ppl_got = loss(got[:, :-1].reshape(-1, got.shape[-1]), x[:, 1:].reshape(-1)).exp()
    assert abs(ppl_got / ppl_ref - 1) < 1e-3


def test_padded_mlp_width_computes_the_same_function(tmp_path):
    """40 kept channels padded to 64 with zeros (f32, so exact): same logits, and the down_proj
    bias (bias compensation) stays in the hidden dimension."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, mlp_bias=True,
                                         vocab_size=len(bpe_tokenizer()), max_position_embeddings=256)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15)
    adapter = get_adapter(model)
    for layer in adapter.layers:
        adapter.prune_mlp(layer, torch.arange(40) * 2)
    adapter.finalize()
    path = tmp_path / "padded.gguf"
    report = export_gguf(model, bpe_tokenizer(), path, quant="f32", pad_to=32)
    assert report.padded == [{"layer": 0, "from": 40, "to": 64}, {"layer": 1, "from": 40, "to": 64}]
    assert any("padded with zero channels" in line for line in report.summary_lines())
    assert fields(path)["llama.feed_forward_length"] == 64
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    down = np.asarray(tensors["blk.0.ffn_down.weight"].data)
    assert down.shape == (64, 64) and not down[:, 40:].any() and not np.asarray(tensors["blk.0.ffn_up.bias"].data)[40:].any()
    assert np.asarray(tensors["blk.0.ffn_down.bias"].data).shape == (64,)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(path)).model(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_quantised_blocks_pad_the_mlp_and_fall_back_to_f16_without_padding(tmp_path, caplog):
    model = pruned("llama", kept_channels=40)  # down_proj rows of 40: not a multiple of 32
    padded = export_gguf(model, bpe_tokenizer(), tmp_path / "p.gguf", quant="q8_0")  # padded to 64 by default
    assert not padded.fallbacks and [p["to"] for p in padded.padded] == [64, 64]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "p.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    report = export_gguf(model, bpe_tokenizer(), tmp_path / "q.gguf", quant="q8_0", pad_to=1)
    assert sorted(f["tensor"] for f in report.fallbacks) == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert any("not a multiple of 32" in line for line in report.summary_lines())
    assert "stored as f16" in caplog.text
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    up = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    ref = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    assert up.shape == ref.shape and np.abs(up - ref).max() < np.abs(ref).max() / 100
    # a rounded width (64) needs no fallback, in any block type; 4/5-bit files keep the embedding at q8_0
    for quant in ("q4_0", "q4_1", "q5_0", "q5_1", "bf16"):
        rep = export_gguf(pruned("llama"), bpe_tokenizer(), tmp_path / f"{quant}.gguf", quant=quant)
        assert not rep.fallbacks and rep.quant == quant
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / f"{quant}.gguf").tensors}
        assert types["blk.1.ffn_gate.weight"] == quant.upper()
        assert types["token_embd.weight"] == ("BF16" if quant == "bf16" else "Q8_0")


def test_tensor_types_override_the_type_of_matching_matrices(tmp_path):
    """llama-quantize's --tensor-type: the first matching pattern sets a matrix's type (the embedding
    rule included); an f16 file with a block-type override pads the MLP so that the override applies."""
    model = pruned("llama", kept_channels=40)
    path = tmp_path / "mixed.gguf"
    report = export_gguf(model, bpe_tokenizer(), path, quant="q4_0",
                         tensor_types=[r"blk\.1\.ffn_down=q8_0", "ffn_down=q5_1", "token_embd=f16"])
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_down.weight"] == "Q5_1"
    assert types["token_embd.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert {(o["tensor"], o["type"]) for o in report.overrides} == {
        ("blk.1.ffn_down.weight", "q8_0"), ("blk.0.ffn_down.weight", "q5_1"), ("token_embd.weight", "f16")}
    assert any("stored by --tensor_type" in line for line in report.summary_lines())
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    down = gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    ref = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert down.shape == (64, 64) and not down[:, 40:].any()  # padded to whole blocks
    assert np.abs(down[:, :40] - ref).max() < np.abs(ref).max() / 100
    f16 = export_gguf(model, bpe_tokenizer(), tmp_path / "f16.gguf", quant="f16", tensor_types=["ffn_down=q8_0"])
    assert not f16.fallbacks and [p["to"] for p in f16.padded] == [64, 64]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "f16.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.ffn_up.weight"] == "F16"


@pytest.mark.parametrize(("spec", "message"), [
    ("ffn_down", "is not PATTERN=TYPE"), ("ffn_down=q3_k", "unknown GGUF type"),
    ("blk.(1=q8_0", "not a regular expression"), (r"model\.layers=q8_0", "selects no weight matrix"),
    ("attn_norm=q8_0", "selects no weight matrix")])
def test_bad_tensor_types_are_refused_before_writing(tmp_path, spec, message):
    with pytest.raises(RcpuError, match=message):
        export_gguf(pruned("llama"), bpe_tokenizer(), tmp_path / "m.gguf", quant="q4_0", tensor_types=[spec])
    assert list(tmp_path.iterdir()) == []


def test_nonuniform_widths_become_per_layer_arrays(tmp_path):
    model = tiny("llama")
    adapter = get_adapter(model)
    adapter.prune_attention(adapter.layers[0], torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1]))
    adapter.prune_mlp(adapter.layers[1], torch.arange(32))
    path = tmp_path / "nu.gguf"
    report = export_gguf(model, bpe_tokenizer(), path, quant="f16")
    assert not report.uniform and any("per-layer arrays" in line for line in report.summary_lines())
    meta = fields(path)
    assert report.arch == "deci" and meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == [4, 8] and meta["deci.attention.head_count_kv"] == [2, 2]
    assert meta["deci.feed_forward_length"] == [96, 32]
    with pytest.raises(RcpuError, match="different widths per layer"):
        load_model(str(path))


def test_refusals_leave_no_file(tmp_path):
    path = tmp_path / "m.gguf"
    with pytest.raises(RcpuError, match="cannot express this tokenizer"):
        export_gguf(tiny("llama"), make_tokenizer(), path)  # a word-level vocabulary
    with pytest.raises(RcpuError, match="unknown GGUF type"):
        export_gguf(tiny("llama"), bpe_tokenizer(), path, quant="q3_k")
    assert list(tmp_path.iterdir()) == []  # no partial or temporary files
    path.write_bytes(b"keep")
    with pytest.raises(RcpuError, match="already exists"):
        export_gguf(tiny("llama"), bpe_tokenizer(), path)
    assert path.read_bytes() == b"keep"


def test_tokenizer_copied_from_a_gguf_unchanged(tmp_path):
    export_gguf(tiny("llama"), bpe_tokenizer(), tmp_path / "a.gguf")
    export_gguf(pruned("llama"), None, tmp_path / "b.gguf", quant="q8_0", tokenizer_gguf=tmp_path / "a.gguf")
    a, b = fields(tmp_path / "a.gguf"), fields(tmp_path / "b.gguf")
    tok_keys = sorted(k for k in a if k.startswith("tokenizer."))
    assert "tokenizer.ggml.merges" in tok_keys and tok_keys == sorted(k for k in b if k.startswith("tokenizer."))
    assert all(a[k] == b[k] for k in tok_keys)
    assert b["tokenizer.ggml.token_type"][-1] == int(gguf.TokenType.CONTROL)  # <|endoftext|> is special


def _checkpoint(root: Path) -> Path:
    model_dir = root / "model"
    tiny("llama").save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    words = " ".join(f"the w{i % 37} x{i % 11}." for i in range(3000))
    (root / "text.txt").write_text(words)
    return model_dir


def test_cli_prune_save_gguf_export_and_eval(tmp_path, capsys):
    model_dir = _checkpoint(tmp_path)
    text = str(tmp_path / "text.txt")
    out = tmp_path / "pruned.gguf"
    assert main(["prune", "--model", str(model_dir), "--calib", text, "--eval", "none", "--nsamples", "8",
                 "--seqlen", "32", "--pruning_ratio", "0.5", "--round_to", "32", "--save_model",
                 str(tmp_path / "pruned"), "--save_gguf", str(out), "--gguf_quant", "q8_0", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    meta = fields(out)
    assert meta["llama.feed_forward_length"] == 64 and meta["general.rcpu.method"] == "rcpu"
    # export of the checkpoint the same run wrote, then evaluation of both files
    again = tmp_path / "again.gguf"
    assert main(["export", "--model", str(tmp_path / "pruned"), "--gguf", str(again), "--quant", "f32", "-q"]) == 0
    assert fields(again)["general.rcpu.pruning_ratio"] == pytest.approx(0.5)
    assert main(["export", "--model", str(tmp_path / "pruned"), "--gguf", str(again), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    mixed = tmp_path / "mixed.gguf"
    assert main(["export", "--model", str(tmp_path / "pruned"), "--gguf", str(mixed), "--quant", "q4_0",
                 "--tensor_type", r"blk\.1\.ffn_down=q8_0", "-q"]) == 0
    assert "1 weight matrices stored by --tensor_type: blk.1.ffn_down.weight q8_0" in capsys.readouterr().out
    assert main(["export", "--model", str(tmp_path / "pruned"), "--gguf", str(tmp_path / "bad.gguf"),
                 "--tensor_type", "ffn_down=q9", "-q"]) == 2
    assert "unknown GGUF type 'q9'" in capsys.readouterr().err and not (tmp_path / "bad.gguf").exists()
    results = []
    for model in (str(tmp_path / "pruned"), str(again)):
        assert main(["eval", "--model", model, "--ppl", text, "--seqlen", "32", "--max_eval_tokens", "512",
                     "--device", "cpu", "-q", "--output", str(tmp_path / "e.json")]) == 0
        results.append(json.loads((tmp_path / "e.json").read_text())["perplexity"][0]["ppl"])
    assert results[1] == pytest.approx(results[0], rel=1e-4)


# ------------------------------------------------------------------------------------------ llama.cpp


def _node_modules() -> Path:
    """node-llama-cpp's node_modules (rcpu.assets.node_modules); the test is skipped without node or
    it, and fails instead when RCPU_REQUIRE_LLAMA_CPP is set (CI sets it when it installed them)."""
    from rcpu.assets import NODE_LLAMA_CPP, cache_dir, node_modules

    found = node_modules()
    missing = ("node" if shutil.which("node") is None else
               None if found is not None else f"{NODE_LLAMA_CPP} in {cache_dir('node', create=False)}")
    if missing:
        if os.environ.get("RCPU_REQUIRE_LLAMA_CPP"):
            pytest.fail(f"RCPU_REQUIRE_LLAMA_CPP is set but {missing} was not found")
        pytest.skip(f"needs node and {NODE_LLAMA_CPP} (npm install --prefix {cache_dir('node', create=False)} "
                    f"{NODE_LLAMA_CPP}); {missing} not found")
    return found


def test_llama_cpp_is_looked_for_in_rcpus_cache_and_required_where_ci_installed_it(tmp_path, monkeypatch):
    from rcpu.assets import node_modules

    monkeypatch.delenv("RCPU_NODE_MODULES", raising=False)
    monkeypatch.delenv("RCPU_REQUIRE_LLAMA_CPP", raising=False)
    monkeypatch.setenv("RCPU_CACHE", str(tmp_path))  # where .ci/run installs it: $RCPU_CACHE/node
    assert node_modules() is None and not (tmp_path / "node").exists()
    with pytest.raises(pytest.skip.Exception):
        _node_modules()
    monkeypatch.setenv("RCPU_REQUIRE_LLAMA_CPP", "1")
    with pytest.raises(pytest.fail.Exception, match="RCPU_REQUIRE_LLAMA_CPP is set"):
        _node_modules()
    package = tmp_path / "node" / "node_modules" / "node-llama-cpp"
    package.mkdir(parents=True)
    (package / "package.json").write_text("{}")
    assert node_modules() == tmp_path / "node" / "node_modules"


def test_llama_cpp_runs_exports_with_torch_perplexity(tmp_path):
    node_modules = _node_modules()
    x = ids(n=3, length=32)
    files, expected = [], []
    for family in ("llama", "qwen2"):
        model = pruned(family)
        with torch.no_grad():
            logits = model(x).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        for quant in ("f32", "q8_0"):
            path = tmp_path / f"{family}-{quant}.gguf"
            export_gguf(model, bpe_tokenizer(), path, quant=quant)
            files.append(str(path))
            expected.append((quant, float(nll.exp())))
        # mixed tensor types in one file (--tensor_type)
        path = tmp_path / f"{family}-mixed.gguf"
        export_gguf(model, bpe_tokenizer(), path, quant="f32", tensor_types=[r"blk\.1\.ffn_down=q8_0", "attn_v=f16"])
        files.append(str(path))
        expected.append(("q8_0", float(nll.exp())))
    # per-layer widths (llama.cpp's deci graph), with and without q/k/v biases
    for family in ("llama", "qwen2"):
        nu = tiny(family)
        adapter = get_adapter(nu)
        adapter.prune_attention(adapter.layers[0], torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1]))
        adapter.prune_mlp(adapter.layers[1], torch.arange(32))
        with torch.no_grad():
            logits = nu(x).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        export_gguf(nu, bpe_tokenizer(), tmp_path / f"nonuniform-{family}.gguf", quant="f32")
        files.append(str(tmp_path / f"nonuniform-{family}.gguf"))
        expected.append(("f32", float(nll.exp())))

    # o_proj / down_proj biases (bias compensation) on families whose configs cannot switch them on,
    # with uniform widths (llama graph) and per-layer widths (deci graph)
    for family, nonuniform in (("qwen2", False), ("mistral", False), ("qwen2", True)):
        biased = tiny(family)
        adapter = get_adapter(biased)
        g = torch.Generator().manual_seed(3)
        for i, layer in enumerate(adapter.layers):
            if nonuniform and i == 0:
                adapter.prune_attention(layer, torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1]))
            adapter.add_output_bias(adapter.attn_out(layer), torch.randn(64, generator=g) * 0.5)
            adapter.add_output_bias(adapter.mlp_out(layer), torch.randn(64, generator=g) * 0.5)
        with torch.no_grad():
            logits = biased(x).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        path = tmp_path / f"biases-{family}-{'nonuniform' if nonuniform else 'uniform'}.gguf"
        assert export_gguf(biased, bpe_tokenizer(), path, quant="f32").arch == ("deci" if nonuniform else "llama")
        files.append(str(path))
        expected.append(("f32", float(nll.exp())))

    job = {"models": files, "windows": x.tolist(), "prompts": ["the w"], "max_tokens": 4, "threads": 1}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(["node", str(REPO / "benchmarks" / "llama_cpp_eval.mjs"), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RCPU_NODE_MODULES": str(node_modules)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    for res, (quant, ppl) in zip(results, expected, strict=True):
        assert res["tokens"] == 3 * 31 and len(res["completions"]) == 1
        tol = 2e-3 if quant == "f32" else 5e-2
        assert abs(res["ppl"] / ppl - 1) < tol, (res["file"], res["ppl"], ppl)


# -------------------------------------------------------------------------------------- families


def family_model(family: str, **extra) -> torch.nn.Module:
    """A tiny model of a FAMILIES row with the byte-level vocabulary, weights large enough that
    errors show. SmolLM3 gets 4 layers with llama.cpp's NoPE pattern (no RoPE in every 4th layer)."""
    extra = {"vocab_size": len(bpe_tokenizer()), **extra}
    if family == "smollm3":
        extra = {"layers": 4, "no_rope_layers": [1, 1, 1, 0], **extra}
    model = make_model(family, **extra)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    return model


def cut(model: torch.nn.Module, heads=(0, 2, 3, 4, 5, 7), kv=(0, 1), channels: int = 72,
        layers: tuple[int, ...] | None = None) -> torch.nn.Module:
    """Pruned in place by the adapter's surgery (milliseconds): 8 -> 6 query heads (3 per KV group,
    so 6 x 8 != hidden 64), MLP 96 -> ``channels``; ``layers``: only these (per-layer widths)."""
    adapter = get_adapter(model)
    kept = torch.arange(0, 96, 96 / channels).long()[:channels] if channels != 96 else torch.arange(96)
    for i, layer in enumerate(adapter.layers):
        if layers is None or i in layers:
            adapter.prune_attention(layer, torch.tensor(heads), torch.tensor(kv))
            adapter.prune_mlp(layer, kept)
    adapter.finalize()
    return model


def token_logprobs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits.float(), -1)
    return logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]


def run_llama_cpp(tmp_path: Path, files: list[str], x: torch.Tensor) -> list[dict]:
    job = {"models": files, "windows": x.tolist(), "prompts": [], "threads": 1, "token_logprobs": True}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(["node", str(REPO / "benchmarks" / "llama_cpp_eval.mjs"), str(tmp_path / "job.json"),
                           str(tmp_path / "out.json")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RCPU_NODE_MODULES": str(_node_modules())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out.json").read_text())["results"]


def test_llama3_rope_freqs_equal_the_formula(tmp_path):
    """rope_freqs (llama.cpp divides frequency i by entry i) from Llama 3's formula, written out here,
    and the same as the ratio of transformers' unscaled to llama3-scaled inverse frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    model = cut(family_model("llama3", head_dim=16, heads=4, kv_heads=2), heads=(0, 1, 2, 3))
    path = tmp_path / "l3.gguf"
    assert export_gguf(model, bpe_tokenizer(), path, quant="f32").arch == "llama"
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
    p, dim = LLAMA3_ROPE, 16
    want = []
    for i in range(0, dim, 2):
        wavelen = 2 * np.pi * p["rope_theta"] ** (i / dim)
        if wavelen < p["original_max_position_embeddings"] / p["high_freq_factor"]:
            want.append(1.0)
        elif wavelen > p["original_max_position_embeddings"] / p["low_freq_factor"]:
            want.append(p["factor"])
        else:
            smooth = ((p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"])
                      / (p["high_freq_factor"] - p["low_freq_factor"]))
            want.append(1 / ((1 - smooth) / p["factor"] + smooth))
    assert got.shape == (dim // 2,) and len(set(want)) == 3  # all three regimes occur
    np.testing.assert_allclose(got, want, rtol=1e-6)
    inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    inv_plain = 1.0 / p["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    np.testing.assert_allclose(got, (inv_plain / inv_scaled.double()).numpy(), rtol=1e-5)
    meta = fields(path)
    assert "llama.rope.scaling.type" not in meta and meta["llama.rope.freq_base"] == p["rope_theta"]


def test_gemma3_follows_llama_cpps_conventions(tmp_path):
    """Norm weights stored as 1 + w; the model's query scale (query_pre_attn_scalar 16 here, where
    llama.cpp scales by head_dim 8, or for 62 layers by hidden / heads) folded into the q norm; the
    per-layer sliding pattern and the local RoPE base; head_dim with the pruned head count."""
    model = cut(family_model("gemma3"))
    path = tmp_path / "g.gguf"
    assert export_gguf(model, bpe_tokenizer(), path, quant="f32").arch == "gemma3"
    meta = fields(path)
    assert meta["gemma3.attention.head_count"] == 6 and meta["gemma3.attention.key_length"] == 8
    assert meta["gemma3.attention.sliding_window"] == 8
    assert meta["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert meta["gemma3.rope.freq_base"] == 1e6 and meta["gemma3.rope.freq_base_swa"] == 1e4
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    layer = model.model.layers[0]
    np.testing.assert_allclose(tensors["blk.0.attn_norm.weight"], layer.input_layernorm.weight.detach().numpy() + 1)
    np.testing.assert_allclose(tensors["blk.0.post_ffw_norm.weight"],
                               layer.post_feedforward_layernorm.weight.detach().numpy() + 1)
    np.testing.assert_allclose(tensors["blk.0.attn_k_norm.weight"], layer.self_attn.k_norm.weight.detach().numpy() + 1)
    np.testing.assert_allclose(tensors["blk.0.attn_q_norm.weight"],
                               (layer.self_attn.q_norm.weight.detach().numpy() + 1) * (16 ** -0.5 / 8 ** -0.5), rtol=1e-6)
    assert "output.weight" not in tensors  # tied
    # 62 layers: llama.cpp takes the file for Gemma 3 27B and scales by (hidden / heads)^-0.5, with
    # the heads written (6 here) and integer division, where the model keeps its query_pre_attn_scalar
    deep = cut(family_model("gemma3", layers=62, layer_types=["sliding_attention", "full_attention"] * 31))
    export_gguf(deep, bpe_tokenizer(), tmp_path / "deep.gguf", quant="f32")
    q_norm = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "deep.gguf").tensors}
    np.testing.assert_allclose(q_norm["blk.61.attn_q_norm.weight"],
                               (deep.model.layers[61].self_attn.q_norm.weight.detach().numpy() + 1)
                               * (16 ** -0.5 / (64 // 6) ** -0.5), rtol=1e-6)


def test_zero_heads_pad_attention_for_graphs_sized_hidden_by_hidden(tmp_path):
    """llama.cpp's phi3 and olmo2 graphs load q and o as hidden x hidden: 6 kept heads are written as
    8, two of them zero (q rows, o columns); OLMo 2's q norm over the whole projection gets zeros
    there and its weights scaled by sqrt(6 / 8), since its RMS then runs over 8 heads."""
    for family in ("phi3", "olmo2"):
        model = cut(family_model(family))
        path = tmp_path / f"{family}.gguf"
        report = export_gguf(model, bpe_tokenizer(), path, quant="f32")
        assert report.arch == family and report.padded_heads == {"heads": [6, 8], "kv_heads": [2, 2]}
        assert any("padded with zero heads" in line for line in report.summary_lines())
        meta = fields(path)
        assert meta[f"{family}.attention.head_count"] == 8 and meta[f"{family}.attention.head_count_kv"] == 2
        tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
        o = tensors["blk.0.attn_output.weight"].reshape(64, 8, 8)  # (hidden, head, head_dim)
        assert not o[:, [3, 7]].any() and o[:, [0, 1, 2, 4, 5, 6]].all()  # each group: 3 kept, 1 zero head
    assert meta["olmo2.rope.dimension_count"] == 8 and "output.weight" in tensors  # olmo2 requires output
    q_norm = tensors["blk.0.attn_q_norm.weight"].reshape(8, 8)
    kept = model.model.layers[0].self_attn.q_norm.weight.detach().numpy().reshape(6, 8)
    np.testing.assert_allclose(q_norm[[0, 1, 2, 4, 5, 6]], kept * np.sqrt(6 / 8), rtol=1e-6)
    assert not q_norm[[3, 7]].any()
    assert fields(tmp_path / "phi3.gguf")["phi3.rope.dimension_count"] == 6  # partial_rotary_factor 0.75


def test_families_with_llamas_layout_fall_back_to_the_llama_graph(tmp_path):
    """Phi-3 with whole-head RoPE (Phi-3-mini): pruned heads go to llama.cpp's llama graph (fused qkv
    kept, [gate; up] split), per-layer widths to deci; with partial RoPE only its own graph runs it."""
    full = {"partial_rotary_factor": 1.0}
    assert export_gguf(cut(family_model("phi3", **full)), bpe_tokenizer(), tmp_path / "a.gguf").arch == "llama"
    names = {t.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"} <= names
    assert export_gguf(cut(family_model("phi3", **full), layers=(1,)), bpe_tokenizer(),
                       tmp_path / "b.gguf").arch == "deci"
    unpruned = family_model("phi3")
    cut(unpruned, heads=tuple(range(8)))  # MLP only: the heads fill hidden, phi3's own graph
    assert export_gguf(unpruned, bpe_tokenizer(), tmp_path / "c.gguf").arch == "phi3"
    names = {t.name for t in gguf.GGUFReader(tmp_path / "c.gguf").tensors}
    assert "blk.0.ffn_up.weight" in names and "blk.0.ffn_gate.weight" not in names  # [gate; up] fused


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3", "olmo2", "smollm3"])
def test_per_layer_widths_are_refused_where_llama_cpp_takes_one_width(tmp_path, family):
    """Only llama.cpp's deci graph reads per-layer head counts / MLP widths (the others size every
    layer like layer 0); it has Llama's layout, so other families must be pruned with uniform widths."""
    model = cut(family_model(family), layers=(0,))
    with pytest.raises(RcpuError, match=rf"llama.cpp's {family} graph takes one width .*--allocation uniform"):
        export_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RcpuError, match="--allocation uniform"):
        check_exportable(family_model(family).config, PruneConfig(method="flap"))
    check_exportable(family_model(family).config, PruneConfig(method="rcpu"))


def test_check_exportable_refuses_before_anything_is_written():
    from transformers import GPT2Config

    assert check_exportable(family_model("llama").config) == "llama"
    assert check_exportable(family_model("qwen2").config) == "qwen2"
    assert check_exportable(family_model("llama3").config, PruneConfig(method="flap")) == "deci"
    assert check_exportable(family_model("mistral"), PruneConfig(method="flap-ridge")) == "deci"
    assert check_exportable(cut(family_model("qwen2"))) == "llama"  # pruned heads: llama.cpp's llama graph
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64}
    for config, message in (
            (GPT2Config(), "GGUF export supports .* not model type 'gpt2'"),
            (family_model("qwen3", rope_parameters=yarn).config, "qwen3 graph has no yarn RoPE scaling"),
            (family_model("gemma3", attn_logit_softcapping=50.0).config, "no attention logit soft-capping"),
            (make_model("smollm3").config,  # conftest's pattern: layer 0 without RoPE
             r"smollm3 graph leaves RoPE out of layers \[\] .* this model out of layers \[0\]"),
            (family_model("olmo2", hidden_act="gelu").config, "uses silu in the MLP and this model gelu")):
        with pytest.raises(RcpuError, match=message) as info:
            check_exportable(config)
        assert "\n" not in str(info.value)
    with pytest.raises(RcpuError, match="qwen3 graph has no o_proj / MLP biases .*--compensation"):
        check_exportable(family_model("qwen3").config, PruneConfig(method="rcpu", compensation="bias"))


def test_cli_prune_refuses_an_unexportable_model_before_pruning(tmp_path, monkeypatch, capsys):
    from rcpu import api, streaming

    def started(*a, **k):
        raise AssertionError("the pruning run started")

    monkeypatch.setattr(api, "prune", started)
    monkeypatch.setattr(streaming, "prune_checkpoint", started)
    family_model("gemma3").save_pretrained(tmp_path / "model")
    bpe_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text(" ".join(f"the w{i % 37}." for i in range(2000)))
    capsys.readouterr()
    common = ["prune", "--model", str(tmp_path / "model"), "--calib", str(tmp_path / "text.txt"), "--eval", "none",
              "--method", "flap", "--save_gguf", str(tmp_path / "m.gguf"), "-q"]
    for extra in ([], ["--save_model", str(tmp_path / "pruned")]):  # in memory, streamed
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert "llama.cpp's gemma3 graph" in err and "--allocation uniform" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.gguf").exists()


needs_llama_cpp = pytest.mark.skipif(
    shutil.which("node") is None or _node_modules() is None,
    reason="needs node and node-llama-cpp (npm install node-llama-cpp@3.22.1 into ~/.cache/rcpu/node)")


def assert_llama_cpp_agrees(tmp_path: Path, cases: dict[str, tuple[torch.nn.Module, str, str]],
                            x: torch.Tensor | None = None) -> None:
    """Export each case (model, quant, expected llama.cpp arch), run all files in llama.cpp, and
    compare log p(next token) at every position with transformers'. llama.cpp keeps its KV cache in
    f16, which moves them by up to ~1e-2; a wrong RoPE base, query scale, NoPE layer or norm by 0.4 to 1."""
    x = ids(n=3, length=32) if x is None else x
    files, refs = [], []
    for name, (model, quant, arch) in cases.items():
        path = tmp_path / f"{name}.gguf"
        # named "tiny": llama.cpp gives a model whose general.name says phi3 Phi-3's special tokens
        assert export_gguf(model, bpe_tokenizer(), path, quant=quant, name="tiny").arch == arch, name
        files.append(str(path))
        refs.append(token_logprobs(model, x))
    results = run_llama_cpp(tmp_path, files, x)
    for name, res, ref in zip(cases, results, refs, strict=True):
        diff = float((torch.tensor(res["logprobs"]) - ref).abs().max())
        ratio = res["ppl"] / float((-ref.mean()).exp())
        f16 = cases[name][1] == "f16"
        assert diff < (0.1 if f16 else 3e-2) and abs(ratio - 1) < (1e-2 if f16 else 2e-3), (name, diff, ratio)


@needs_llama_cpp
def test_llama_cpp_runs_every_family_as_transformers_does(tmp_path):
    """Every FAMILIES row, pruned (6 of 8 heads, 72 of 96 channels), at f32; and Phi-3 with whole-head
    RoPE (llama graph) and with LongRoPE, OLMo 2 with as many KV heads as query heads (both padded
    with zero heads), Gemma 3 with 62 layers (llama.cpp's query scale for the 27B model), and FLAP's
    per-layer widths on Llama 3 (deci graph)."""
    own = {"qwen2": "llama", "mistral": "llama", "llama3": "llama"}
    cases = {f: (cut(family_model(f)), "f32", own.get(f, get_adapter(make_model(f)).gguf_arch)) for f in FAMILIES}
    cases["phi3-whole-rope"] = (cut(family_model("phi3", partial_rotary_factor=1.0)), "f32", "llama")
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 1024, "long_factor": [1.0, 2.0, 4.0],
                "short_factor": [1.0, 1.5, 3.0]}  # llama.cpp's context (512) is within 1024: short factors
    cases["phi3-longrope"] = (cut(family_model("phi3", rope_parameters=longrope, max_position_embeddings=4096)),
                              "f32", "phi3")
    mha = cut(family_model("olmo2", kv_heads=8), kv=(0, 2, 3, 4, 5, 7))
    assert mha.model.layers[0].self_attn.k_proj.out_features == 48  # 6 KV heads: padded to 8 with the queries
    cases["olmo2-mha"] = (mha, "f32", "olmo2")
    deep = family_model("gemma3", layers=62, layer_types=["sliding_attention", "full_attention"] * 31)
    cases["gemma3-62-layers"] = (cut(deep), "f32", "gemma3")  # llama.cpp's query scale for "27B"
    flap = family_model("llama3")
    prune(flap, PruneConfig(method="flap", pruning_ratio=0.25), windows=make_windows(16, 32), device="cpu",
          progress=False)
    cases["llama3-flap"] = (flap, "f32", "deci")
    assert_llama_cpp_agrees(tmp_path, cases)


@needs_llama_cpp
def test_llama_cpp_runs_llama3_with_a_128k_vocabulary(tmp_path):
    """Llama 3.x's 128256-token vocabulary (a 261-token tokenizer padded as llama.cpp's converter pads),
    rope_freqs, tied and untied output, f16. One short window: every position's full distribution
    crosses from llama.cpp to node as 128k probabilities."""
    assert_llama_cpp_agrees(tmp_path, {
        f"llama3-{kind}": (cut(family_model("llama3", vocab_size=128256, tie_word_embeddings=kind == "tied")),
                           "f16", "llama") for kind in ("tied", "untied")}, x=ids(n=1, length=24))
