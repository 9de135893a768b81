"""Pruned checkpoints at the widths of real models (one or two decoder layers, random bf16
weights): they save, reload in a fresh process with stock transformers (the rcpu config where a
stock config refuses the pruned widths) and give the logits of the in-memory pruned model. Toy
widths hide the divisibility rules of real configs: transformers' LlamaConfig refuses
``hidden_size % num_attention_heads != 0``, which LLaMA-7B at the paper's 20 % (32 -> 26 heads)
hits, and so does Gemma3TextConfig (Gemma-3-4B: 8 -> 6 heads over 2560).

The vocabulary is the tests' 128 tokens except in ``llama3.1-8b-vocab``: the vocabulary is not
pruned, it only sizes the embedding and the head (1 GB each in bf16 at Llama 3's 128,256
tokens), so one case checks that path and the others stay small and fast."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import VOCAB, make_model, make_text, make_tokenizer, make_windows, same_threads_env
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rcpu import RcpuError
from rcpu.api import prune
from rcpu.cli import main
from rcpu.config import PruneConfig
from rcpu.export import save_pruned
from rcpu.models import get_adapter
from rcpu.models.checkpoint import mistral_equivalent, model_for_saving

# Llama-3's RoPE scaling, with the original context shrunk to the tests' 256 positions
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
#: name -> (model_type, widths of the published model)
SHAPES = {
    "llama-7b": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008)),
    "llama3-8b": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, rope_parameters=LLAMA3_ROPE)),
    "llama2-13b": ("llama", dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=40,
                                 intermediate_size=13824)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                   intermediate_size=14336, sliding_window=None)),
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, use_sliding_window=False, tie_word_embeddings=False)),
    # Llama-3.1-8B with its whole vocabulary (untied 128,256 x 4096 embedding and head)
    "llama3.1-8b-vocab": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                        intermediate_size=14336, rope_parameters=LLAMA3_ROPE, vocab_size=128256,
                                        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                               intermediate_size=12288, tie_word_embeddings=False)),
    # a sliding and a global layer (window 8 < the test's 12 tokens, so they differ)
    "gemma3-4b": ("gemma3_text", dict(hidden_size=2560, num_attention_heads=8, num_key_value_heads=4,
                                      intermediate_size=10240, head_dim=256, query_pre_attn_scalar=256,
                                      num_hidden_layers=2, sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"])),
    "phi4-mini": ("phi3", dict(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
                               intermediate_size=8192, partial_rotary_factor=0.75, tie_word_embeddings=True)),
    "olmo2-7b": ("olmo2", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008, tie_word_embeddings=False)),
    # a layer with RoPE and one without
    "smollm3-3b": ("smollm3", dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                                   intermediate_size=11008, tie_word_embeddings=True, num_hidden_layers=2,
                                   no_rope_layers=[1, 0])),
}
#: families whose stock config refuses heads that do not divide the hidden size: how they are saved then
INDIVISIBLE = {"llama": "remapped", "gemma3_text": "per-layer"}
#: token ids of the families whose defaults lie outside the tests' vocabulary
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
RATIOS = (0.1, 0.2, 0.3)

# ONE fresh interpreter that never imports rcpu loads every checkpoint and writes its logits.
RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    x = torch.load(sys.argv[1], weights_only=True)
    for ckpt in sys.argv[2:]:
        remote = json.load(open(ckpt + "/config.json"))["model_type"].startswith("rcpu_")
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, trust_remote_code=remote).eval()
        with torch.no_grad():
            torch.save(model(x).logits, ckpt + "/logits.pt")
        json.dump({"class": type(model).__name__, "dtype": str(next(model.parameters()).dtype)},
                  open(ckpt + "/loaded.json", "w"))
        del model
    assert not [m for m in sys.modules if m == "rcpu" or m.startswith("rcpu.")], "rcpu was imported"
""")


def _distinct_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A bf16 matrix of pairwise different random-looking rows, cheaply: row b * 1009 + a is random
    row a times 1 + b / 128 (exact in bf16), so a shifted or misplaced row changes the logits."""
    period = 1009
    assert rows <= 128 * period
    block = torch.randn(period, cols, generator=torch.Generator().manual_seed(seed)).mul_(0.02).to(torch.bfloat16)
    index = torch.arange(rows)
    return block[index % period].mul_((1 + (index // period) / 128).to(torch.bfloat16)[:, None])


def _real_width_model(name: str) -> torch.nn.Module:
    model_type, widths = SHAPES[name]
    ids = {} if model_type in ("llama", "mistral", "qwen2") else TOKEN_IDS
    config = AutoConfig.for_model(model_type, **{"num_hidden_layers": 1, "vocab_size": VOCAB,
                                                 "max_position_embeddings": 256, "head_dim": 128, **ids, **widths})
    torch.manual_seed(0)
    vocab = config.vocab_size
    if vocab == VOCAB:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:  # the random init of a 128k-row embedding and head takes a minute: built small, then given the rows
        small = copy.deepcopy(config)
        small.vocab_size = VOCAB
        model = AutoModelForCausalLM.from_config(small, dtype=torch.bfloat16)
        hidden = config.hidden_size
        model.set_input_embeddings(torch.nn.Embedding.from_pretrained(_distinct_rows(vocab, hidden, 1), freeze=False))
        head = torch.nn.utils.skip_init(torch.nn.Linear, hidden, vocab, bias=False, dtype=torch.bfloat16)
        head.weight.data.copy_(_distinct_rows(vocab, hidden, 2))
        model.set_output_embeddings(head)
        model.config.vocab_size = vocab
    if model_type == "qwen2":
        with torch.no_grad():
            for lin in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj):
                lin.bias.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list(SHAPES))
def test_real_widths_save_and_reload(scratch_dir, name):
    model_type, widths = SHAPES[name]
    vocab = widths.get("vocab_size", VOCAB)
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randint(0, vocab, (1, 11), generator=g), torch.tensor([[vocab - 1]])], 1)  # the last id too
    torch.save(x, scratch_dir / "x.pt")
    calib = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    dense = _real_width_model(name)
    expected, ckpts = {}, []
    ratios = RATIOS if vocab == VOCAB else (0.2,)  # (the vocabulary does not change with the ratio: llama3-8b has all)
    for ratio in ratios:
        cfg = PruneConfig(method="wanda-sp", pruning_ratio=ratio, nsamples=2, seqlen=16, batch_size=2)
        pruned, report = prune(dense if len(ratios) == 1 else copy.deepcopy(dense), cfg, windows=calib, device="cpu",
                               progress=False)
        heads = report.params["heads_after"]
        hidden = widths["hidden_size"]
        out = save_pruned(pruned, None, scratch_dir / f"r{ratio}", report.to_dict())
        saved = json.loads((out / "config.json").read_text())
        umask = os.umask(0)
        os.umask(umask)
        assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable by a server
        kind = INDIVISIBLE.get(model_type, "stock") if hidden % heads else "stock"
        assert report.checkpoint["kind"] == kind
        assert saved["head_dim"] == widths.get("head_dim", 128) and saved["hidden_size"] == hidden
        assert saved["vocab_size"] == vocab
        if kind == "per-layer":  # uniform widths that only the rcpu config accepts
            n = saved["num_hidden_layers"]
            assert saved["model_type"] == f"rcpu_{model_type}" and (out / "modeling_rcpu.py").is_file()
            assert saved["layer_num_attention_heads"] == [heads] * n
            assert saved["layer_num_key_value_heads"] == [report.params["kv_heads_after"]] * n
            assert saved["layer_intermediate_size"] == [report.params["intermediate_after"]] * n
        else:
            assert saved["num_attention_heads"] == heads
            assert saved["num_key_value_heads"] == report.params["kv_heads_after"] and "auto_map" not in saved
            assert saved["intermediate_size"] == report.params["intermediate_after"]
            assert saved["model_type"] == ("mistral" if kind == "remapped" else model_type)
        if kind == "remapped":  # what a serving engine reading config.json needs to see
            assert saved["architectures"] == ["MistralForCausalLM"] and saved["sliding_window"] is None
            assert saved["rope_parameters"] == pruned.config.rope_parameters
            assert saved["tie_word_embeddings"] == pruned.config.tie_word_embeddings
        for key in ("layer_types", "no_rope_layers", "partial_rotary_factor", "query_pre_attn_scalar"):
            if key in widths:
                assert saved[key] == widths[key], key
        with torch.no_grad():
            expected[str(out)] = pruned(x).logits
        ckpts.append(str(out))
        del pruned
    del dense
    subprocess.run([sys.executable, "-c", RELOAD, str(scratch_dir / "x.pt"), *ckpts], check=True,
                   capture_output=True, text=True,
                   env=same_threads_env(HF_MODULES_CACHE=str(scratch_dir / "modules")))
    for ckpt in ckpts:
        loaded = json.loads(open(f"{ckpt}/loaded.json").read())
        assert loaded["dtype"] == "torch.bfloat16"
        torch.testing.assert_close(torch.load(f"{ckpt}/logits.pt"), expected[ckpt], atol=0, rtol=0)


def test_paper_head_counts_are_the_default():
    """LLaMA-7B (32 heads, no GQA) at the paper's ratios: floor(rho * 32) heads go."""
    for ratio, heads in ((0.1, 29), (0.2, 26), (0.3, 23)):
        cfg = PruneConfig(method="wanda-sp", pruning_ratio=ratio, nsamples=2, seqlen=8, batch_size=2)
        from rcpu.api import check_saveable

        fmt = check_saveable(_meta_llama7b(), cfg)
        assert fmt.config.num_attention_heads == heads and fmt.kind == "remapped"


def _meta_llama7b() -> torch.nn.Module:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=4096, num_attention_heads=32,
                                            intermediate_size=11008, vocab_size=VOCAB))


@pytest.mark.parametrize("tied", [True, False])
def test_mistral_remap_is_exactly_equivalent(tied):
    """The remapped twin computes the same logits as the Llama model, including Llama-3 RoPE
    scaling and tied embeddings, and shares its tensors (no copy)."""
    model = make_model("llama", heads=8, kv_heads=2, hidden=64, head_dim=16, tie_word_embeddings=tied,
                       rope_parameters=LLAMA3_ROPE)
    adapter = get_adapter(model)
    for layer in adapter.layers:  # one query head less per KV group: 6 heads
        adapter.prune_attention(layer, torch.tensor([0, 1, 2, 4, 5, 7]), torch.tensor([0, 1]))
    adapter.finalize()
    fmt = adapter.saved_format()
    assert fmt.kind == "remapped"  # 64 % 6 != 0
    twin = model_for_saving(model, fmt)
    assert type(twin).__name__ == "MistralForCausalLM"
    assert twin.model.layers[0].mlp.up_proj.weight.data_ptr() == model.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert (twin.lm_head.weight.data_ptr() == twin.model.embed_tokens.weight.data_ptr()) == tied
    x = make_windows(2, 200, seed=4)  # long enough for positions where llama3 scaling changes RoPE
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, model(x).logits, atol=0, rtol=0)


def test_llama_with_biases_and_indivisible_heads_fails_before_pruning():
    """No stock config carries it: refused before any layer is touched."""
    model = make_model("llama", heads=8, kv_heads=8, hidden=64, head_dim=8, attention_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PruneConfig(method="wanda-sp", pruning_ratio=0.2)
    with pytest.raises(RcpuError, match="cannot be saved as a stock llama checkpoint.*multiple.*bias"):
        prune(model, cfg, windows=make_windows(), device="cpu", progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_mistral_equivalent_refuses_biases():
    with pytest.raises(ValueError):
        mistral_equivalent(LlamaConfig(attention_bias=True))


def test_cli_refuses_unsaveable_setting_with_exit_2(tmp_path, capsys):
    model = make_model("llama", heads=8, kv_heads=8, hidden=64, head_dim=8, layers=1)
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(make_text(2000))
    rc = main(["prune", "--model", str(tmp_path / "m"), "--method", "wanda-sp", "--compensation", "bias",
               "--pruning_ratio", "0.2", "--calib", str(tmp_path / "t.txt"), "--eval", "none", "--device", "cpu",
               "--save_model", str(tmp_path / "out"), "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rcpu")]
    assert rc == 2 and len(err) == 1 and err[0].startswith("rcpu: error: the pruned model cannot be saved")
    assert not (tmp_path / "out").exists()


def test_gpu_unfriendly_widths_are_pointed_out_and_round_to_avoids_them():
    notes = {}
    for round_to in (1, 64):
        cfg = PruneConfig(method="wanda-sp", pruning_ratio=0.2, nsamples=2, seqlen=16, batch_size=2,
                          round_to=round_to)
        _, report = prune(_real_width_model("llama-7b"), cfg, windows=make_windows(2, 16), device="cpu",
                          progress=False)
        notes[round_to] = (report.params["intermediate_after"], [n for n in report.summary_lines() if "--round_to" in n])
    (width, note), (rounded, no_note) = notes[1], notes[64]
    assert width == 8807 and len(note) == 1 and "8807 not a multiple of 64" in note[0]
    assert rounded % 64 == 0 and abs(rounded - width) <= 32 and not no_note


@pytest.mark.parametrize("name", ["llama-7b", "llama3-8b"])
def test_real_widths_recover_keeps_the_pruned_format(scratch_dir, name):
    """`rcpu recover` at real widths: LLaMA-7B at 20 % is saved as its Mistral twin (26 heads do
    not divide 4096), Llama-3-8B keeps its KV groups and RoPE scaling. The recovered checkpoint
    must keep exactly the pruned checkpoint's config, load with stock transformers, and hold
    trained weights with no adapter left over."""
    dense, pruned_dir, out = scratch_dir / "dense", scratch_dir / "pruned", scratch_dir / "rec"
    _real_width_model(name).save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    (scratch_dir / "train.txt").write_text(make_text(600, seed=0))
    (scratch_dir / "eval.txt").write_text(make_text(300, seed=5))
    assert main(["prune", "--model", str(dense), "--method", "wanda-sp", "--pruning_ratio", "0.2", "--calib",
                 str(scratch_dir / "train.txt"), "--nsamples", "2", "--seqlen", "16", "--eval", "none",
                 "--save_model", str(pruned_dir), "-q"]) == 0
    assert main(["recover", "--model", str(pruned_dir), "--data", str(scratch_dir / "train.txt"), "--eval",
                 str(scratch_dir / "eval.txt"), "--tokens", "64", "--seqlen", "16", "--batch_size", "2",
                 "--eval_seqlen", "16", "--max_eval_tokens", "64", "--parameters", "lora", "--lora_rank", "4",
                 "--lr", "1e-2", "--save_model", str(out), "-q"]) == 0
    before, after = (json.loads((d / "config.json").read_text()) for d in (pruned_dir, out))
    for key in ("model_type", "architectures", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_size", "intermediate_size", "tie_word_embeddings", "rope_parameters"):
        assert after[key] == before[key], key
    assert "auto_map" not in after
    assert after["num_attention_heads"] < 32 and after["model_type"] == "mistral"  # 4096 % heads != 0: the twin
    rec = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    src = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    rec_sd, src_sd = rec.state_dict(), src.state_dict()
    assert rec_sd.keys() == src_sd.keys() and not any("lora" in k for k in rec_sd)
    assert all(rec_sd[k].shape == src_sd[k].shape for k in rec_sd)
    trained = [k for k in rec_sd if not torch.equal(rec_sd[k], src_sd[k])]
    assert trained and all(k.endswith("proj.weight") for k in trained)  # LoRA moved the projections only
    prov = json.loads((out / "rcpu_provenance.json").read_text())
    assert prov["recovery"]["teacher"]["source"] == str(dense)
