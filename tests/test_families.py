"""Every pruning method on every model family: it prunes, saves with ``save_pruned`` and
reloads in a fresh process that never imports rcpu (stock transformers for uniform widths,
``trust_remote_code=True`` for the rcpu config) with the in-memory model's logits, bit for bit.

The cases are pruned in this process and reloaded together in one fresh interpreter (the
module fixture ``reloaded`` does both for the cases pytest selected), so the cross product
costs one interpreter start, not one per case."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, make_model, make_windows, same_threads_env

from rcpu.api import prune
from rcpu.compare import parse_method
from rcpu.compensations import COMPENSATIONS
from rcpu.config import PruneConfig
from rcpu.export import PROVENANCE, save_pruned
from rcpu.models import get_adapter

#: method spec (``rcpu compare`` syntax) -> pruning ratio. At 0.3 the tiny models keep 6 of 8
#: heads, which do not divide the hidden size 64: Llama is saved as its Mistral twin, Gemma 3
#: (whose stock config refuses it) with the rcpu config; at 0.5 they keep 4. (A short lambda
#: grid and one refinement epoch: the code paths of the defaults, at a fraction of the time.)
METHODS = {
    "rcpu": 0.5, "rcpu-scaled": 0.3, "ridge": 0.5, "ridge-auto+ridge_grid=0.01,1": 0.3, "wanda-sp": 0.3,
    "magnitude-sp": 0.5, "flap": 0.5, "flap-ridge+ridge_grid=0.01,1": 0.3, "rcpu+allocation=global": 0.5,
    "flap-ridge+allocation=global_mlp+ridge_grid=0.01,1": 0.3, "flap-ridge+allocation=error+ridge_grid=0.01,1": 0.5,
    "ridge+refine_epochs=1": 0.3,
}
#: the families beyond Llama / Mistral / Qwen2, whose methods tests/test_prune.py and
#: tests/test_streaming.py cover
NEW_FAMILIES = [f for f in FAMILIES if f not in ("llama", "mistral", "qwen2")]
#: calibration windows: 12 x 32 tokens (more than any width of the tiny models)
WINDOWS = dict(n=12, seqlen=32)
#: families whose stock config refuses a head count that does not divide the hidden size
#: (Llama has an equivalent stock class for it, Mistral)
DIVISIBILITY_RULE = {"llama": "remapped", "llama3": "remapped", "gemma3": "per-layer"}

RELOAD = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    x = torch.load(sys.argv[1], weights_only=True)
    for ckpt in sys.argv[2:]:
        remote = json.load(open(ckpt + "/config.json"))["model_type"].startswith("rcpu_")
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, trust_remote_code=remote).eval()
        with torch.no_grad():
            torch.save(model(x).logits, ckpt + "/logits.pt")
        json.dump({"class": type(model).__name__, "remote": remote,
                   "params": sum(p.numel() for p in model.parameters())}, open(ckpt + "/loaded.json", "w"))
    assert not [m for m in sys.modules if m == "rcpu" or m.startswith("rcpu.")], "rcpu was imported"
""")

TEST = "test_method_saves_and_reloads"


def _prune_and_save(family: str, method: str, out, x: torch.Tensor) -> dict:
    cfg = PruneConfig(**parse_method(method), pruning_ratio=METHODS[method], nholdout=4, batch_size=4)
    heldout = make_windows(4, 32, seed=7) if cfg.needs_heldout else None
    model = make_model(family)
    dense_params = sum(p.numel() for p in model.parameters())
    pruned, report = prune(model, cfg, windows=make_windows(**WINDOWS), heldout_windows=heldout, device="cpu",
                           progress=False)
    save_pruned(pruned, None, out, report.to_dict())
    with torch.no_grad():
        logits = pruned(x).logits
    return {"logits": logits, "report": report, "cfg": cfg.validate(), "dense_params": dense_params,
            "params": sum(p.numel() for p in pruned.parameters()), "adapter": get_adapter(pruned)}


@pytest.fixture(scope="module")
def reloaded(request, tmp_path_factory):
    """(family, method) -> what pruning gave (or the exception it raised), for every selected case;
    the saved checkpoints are reloaded in one fresh process."""
    root = tmp_path_factory.mktemp("families")
    x = make_windows(2, 16, seed=5)
    torch.save(x, root / "x.pt")
    cases = [(item.callspec.params["family"], item.callspec.params["method"]) for item in request.session.items
             if getattr(item, "originalname", None) == TEST and hasattr(item, "callspec")]
    results, saved = {}, []
    for family, method in dict.fromkeys(cases):
        out = root / f"{family}-{len(results)}"
        try:
            results[family, method] = {"out": out, **_prune_and_save(family, method, out, x)}
            saved.append(str(out))
        except Exception as exc:  # reported by the case's own test
            results[family, method] = {"error": exc}
    if saved:
        subprocess.run([sys.executable, "-c", RELOAD, str(root / "x.pt"), *saved], check=True, capture_output=True,
                       text=True, env=same_threads_env(HF_MODULES_CACHE=str(root / "modules")))
    yield results
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_method_saves_and_reloads(reloaded, family, method):
    res = reloaded[family, method]
    if "error" in res:
        raise res["error"]
    cfg, report, adapter, out = res["cfg"], res["report"], res["adapter"], res["out"]
    params = report.params
    assert params["ratio_attn_mlp"] > 0.2 and res["params"] < res["dense_params"]  # it really pruned
    uniform = params["uniform"]
    if cfg.allocation == "uniform":
        assert uniform
    adds_bias = COMPENSATIONS[cfg.compensation].adds_bias
    heads = params["heads_after"]
    # the saved format: stock wherever a stock config can describe the pruned model
    if not uniform or (adds_bias and not adapter.output_bias_switches):
        expected = "per-layer"
    elif adapter.config.hidden_size % heads:
        expected = DIVISIBILITY_RULE.get(family, "stock")
    else:
        expected = "stock"
    assert report.checkpoint["kind"] == expected
    saved = json.loads((out / "config.json").read_text())
    loaded = json.loads((out / "loaded.json").read_text())
    base_type = adapter.config.model_type.removeprefix("rcpu_")
    if expected == "per-layer":
        assert saved["model_type"] == f"rcpu_{base_type}" and (out / "modeling_rcpu.py").is_file()
        assert loaded["remote"] and loaded["class"].startswith("Rcpu")
        if not uniform:
            assert saved["layer_num_attention_heads"] == heads
            assert saved["layer_intermediate_size"] == params["intermediate_after"]
    else:
        assert saved["model_type"] == ("mistral" if expected == "remapped" else base_type)
        assert "auto_map" not in saved and not (out / "modeling_rcpu.py").exists() and not loaded["remote"]
        assert saved["num_attention_heads"] == heads and saved["intermediate_size"] == params["intermediate_after"]
        assert saved["num_key_value_heads"] == params["kv_heads_after"] and saved["head_dim"] == 8
    assert loaded["params"] == res["params"]
    torch.testing.assert_close(torch.load(out / "logits.pt"), res["logits"], atol=0, rtol=0)
    prov = json.loads((out / PROVENANCE).read_text())
    assert prov["config"]["method"] == cfg.method and prov["config"]["allocation"] == cfg.allocation
    assert prov["model"]["adapter"] == adapter.name


# --------------------------------------------------- recover, eval and compare on every new family

#: family -> (prune flags, what the pruned checkpoint is): the checkpoint formats a family can get
CLI_CASES = {
    "qwen3": (["--method", "wanda-sp", "--compensation", "bias", "--pruning_ratio", "0.5"], "per-layer"),  # no switch
    "gemma3": (["--method", "rcpu", "--pruning_ratio", "0.3"], "per-layer"),  # 6 heads: the stock config refuses
    "phi3": (["--method", "flap", "--pruning_ratio", "0.4"], "per-layer"),
    "olmo2": (["--method", "ridge", "--pruning_ratio", "0.5"], "stock"),
    "smollm3": (["--method", "wanda-sp", "--compensation", "bias", "--pruning_ratio", "0.5"], "stock"),  # switches
}
#: config keys that say what the checkpoint is: recovery must keep every one
FORMAT_KEYS = ("model_type", "architectures", "auto_map", "num_attention_heads", "num_key_value_heads", "head_dim",
               "hidden_size", "intermediate_size", "layer_num_attention_heads", "layer_num_key_value_heads",
               "layer_intermediate_size", "o_proj_bias", "down_proj_bias", "attention_bias", "mlp_bias",
               "tie_word_embeddings", "layer_types", "no_rope_layers")


def _eval_ppl(model_dir, text, out_json) -> float:
    from rcpu.cli import main

    assert main(["eval", "--model", str(model_dir), "--ppl", str(text), "--seqlen", "32", "--max_eval_tokens", "1024",
                 "--device", "cpu", "-q", "--output", str(out_json)]) == 0
    return json.loads(out_json.read_text())["perplexity"][0]["ppl"]


@pytest.mark.parametrize("family", list(CLI_CASES))
def test_prune_recover_eval_keep_the_format(tmp_path, family):
    """`rcpu prune` (streamed), `rcpu recover` with LoRA on the family's own projections (Phi-3's
    fused qkv_proj and gate_up_proj), and `rcpu eval`: the recovered checkpoint keeps the pruned
    one's format (stock or rcpu config), trained only the targeted projections, reloads with stock
    transformers (trust_remote_code for the rcpu config) with rcpu's logits, and `rcpu eval`
    measures the perplexities the recovery record reports."""
    from conftest import make_text, make_tokenizer
    from transformers import AutoModelForCausalLM

    from rcpu.cli import main
    from rcpu.loading import load_model
    from rcpu.recover.params import lora_modules

    flags, kind = CLI_CASES[family]
    dense, pruned, rec = tmp_path / "dense", tmp_path / "pruned", tmp_path / "rec"
    make_model(family, layers=2, initializer_range=0.2).save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    train, held = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text(make_text(12000, seed=0))
    held.write_text(make_text(3000, seed=5))
    assert main(["prune", "--model", str(dense), "--calib", str(train), "--eval", "none", "--nsamples", "16",
                 "--seqlen", "32", *flags, "--save_model", str(pruned), "-q"]) == 0
    prov = json.loads((pruned / PROVENANCE).read_text())
    assert prov["checkpoint"]["kind"] == kind and prov["model"]["streamed"]
    assert main(["recover", "--model", str(pruned), "--data", str(train), "--eval", str(held), "--tokens", "2048",
                 "--seqlen", "32", "--eval_seqlen", "32", "--max_eval_tokens", "1024", "--batch_size", "4",
                 "--parameters", "lora", "--lora_rank", "4", "--lr", "2e-2", "--save_model", str(rec), "-q"]) == 0

    before, after = (json.loads((d / "config.json").read_text()) for d in (pruned, rec))
    for key in FORMAT_KEYS:
        assert after.get(key) == before.get(key), key
    assert (rec / "modeling_rcpu.py").exists() == (kind == "per-layer")
    remote = kind == "per-layer"
    stock = AutoModelForCausalLM.from_pretrained(rec, trust_remote_code=remote).eval()
    source = AutoModelForCausalLM.from_pretrained(pruned, trust_remote_code=remote).eval()
    ours = load_model(str(rec)).model
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, ours(input_ids=ids).logits)
    # LoRA trained exactly the targeted projections, in every layer (merged: no adapter left)
    rec_sd, src_sd = stock.state_dict(), source.state_dict()
    assert rec_sd.keys() == src_sd.keys() and not any("lora" in k for k in rec_sd)
    trained = {k for k in rec_sd if not torch.equal(rec_sd[k], src_sd[k])}
    _, modules = lora_modules(source, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert trained == {f"{m}.weight" for m in modules}
    if family == "phi3":
        assert any(m.endswith("qkv_proj") for m in modules) and any(m.endswith("gate_up_proj") for m in modules)

    # rcpu eval gives the perplexities the recovery measured before and after training
    record = json.loads((rec / PROVENANCE).read_text())["recovery"]["evaluation"]
    for model_dir, when in ((pruned, "before"), (rec, "after")):
        ppl = _eval_ppl(model_dir, held, tmp_path / f"{when}.json")
        assert ppl == pytest.approx(record[when]["perplexity"][0]["ppl"], rel=1e-4)
    assert record["after"]["perplexity"][0]["ppl"] != record["before"]["perplexity"][0]["ppl"]


@pytest.mark.parametrize("family", ["phi3", "gemma3"])
def test_compare_on_new_families(tmp_path, family):
    """`rcpu compare` with a uniform and a global-allocation method: every cell is pruned and
    measured, and the dense row is what `rcpu eval` measures on the dense checkpoint."""
    from conftest import make_text, make_tokenizer

    from rcpu.cli import main

    dense, text = tmp_path / "dense", tmp_path / "text.txt"
    make_model(family, layers=2).save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    text.write_text(make_text(6000))
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(dense), "--methods", "wanda-sp,flap", "--pruning_ratios", "0.5",
                 "--nsamples", "8", "--seqlen", "32", "--calib", str(text), "--eval", str(text), "--eval_seqlens",
                 "32", "--max_eval_tokens", "1024", "--device", "cpu", "--output", str(out), "-q"]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert set(cells) == {"dense", "wanda-sp@0.5/n8", "flap@0.5/n8"}
    dense_ppl = cells["dense"]["ppl"]["32"]["ppl"]
    assert dense_ppl == pytest.approx(_eval_ppl(dense, text, tmp_path / "dense.json"), rel=1e-6)
    for key in ("wanda-sp@0.5/n8", "flap@0.5/n8"):
        assert cells[key]["ppl"]["32"]["ppl"] != dense_ppl and cells[key]["params"]["ratio_attn_mlp"] > 0.3
    assert cells["wanda-sp@0.5/n8"]["params"]["uniform"] and not cells["flap@0.5/n8"]["params"]["uniform"]
