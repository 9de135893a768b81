"""Checkpoints with per-layer widths (rcpu_* model types) load without remote code and prune again."""

import ast
import json
from pathlib import Path

import torch
from conftest import make_model, make_tokenizer, make_windows
from transformers import AutoModelForCausalLM

from rcpu import PruneConfig, load_model, prune
from rcpu.export import save_pruned
from rcpu.models import get_adapter
from rcpu.nonuniform import layer_widths

X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def _nonuniform_checkpoint(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = make_model("llama", layers=3)
    adapter = get_adapter(model)
    adapter.prune_attention(adapter.layers[0], torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1]))
    adapter.prune_mlp(adapter.layers[1], torch.arange(40))
    adapter.finalize()
    out = save_pruned(model, make_tokenizer(), tmp_path / "nu", {"config": {"method": "test"}})
    assert json.loads((out / "config.json").read_text())["model_type"] == "rcpu_llama"
    return model, out


def test_rcpu_checkpoint_loads_and_prunes_again(tmp_path):
    model, path = _nonuniform_checkpoint(tmp_path)
    loaded = load_model(str(path))  # no trust_remote_code: rcpu's own modeling class
    assert type(loaded.model).__name__ == "RcpuLlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X).logits, model(X).logits)
    before = layer_widths(loaded.model)
    again, report = prune(loaded.model, PruneConfig(method="rcpu", pruning_ratio=0.25), windows=make_windows(16, 32),
                          device="cpu", progress=False)
    after = layer_widths(again)
    assert all(a["intermediate_size"] < b["intermediate_size"] for a, b in zip(after, before, strict=True))
    out = save_pruned(again, loaded.tokenizer, tmp_path / "again", report.to_dict())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_intermediate_size"] == [w["intermediate_size"] for w in after]
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(X).logits, again(X).logits)


def test_rcpu_checkpoint_pruned_to_equal_widths_saves_as_stock(tmp_path):
    model, path = _nonuniform_checkpoint(tmp_path)
    loaded = load_model(str(path)).model
    adapter = get_adapter(loaded)
    for layer in adapter.layers:  # cut every layer to 4 heads over 2 KV heads and 32 channels
        heads = layer.self_attn.q_proj.out_features // layer.self_attn.head_dim
        kept = torch.tensor([0, 1, 2, 3]) if heads == 4 else torch.tensor([0, 1, 4, 5])
        adapter.prune_attention(layer, kept, torch.tensor([0, 1]))
        adapter.prune_mlp(layer, torch.arange(32))
    adapter.finalize()
    out = save_pruned(loaded, make_tokenizer(), tmp_path / "uniform", {})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in cfg and "layer_intermediate_size" not in cfg
    assert not (out / "modeling_rcpu.py").exists()
    stock = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code
    with torch.no_grad():
        torch.testing.assert_close(stock(X).logits, loaded(X).logits)


def test_adapters_do_not_import_the_selection_maths():
    models_dir = Path(__file__).resolve().parents[1] / "src" / "rcpu" / "models"
    for file in models_dir.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "select" not in (node.module or ""), f"{file.name} imports {node.module}"


def test_qwen2_with_output_biases_prunes_again_streamed_like_in_memory(tmp_path):
    """FLAP on Qwen2 (o_proj / down_proj biases in the rcpu config), then pruned again from disk:
    the streamed skeleton builds those biases and the result equals the in-memory one."""
    from test_streaming import _assert_same_checkpoint

    from rcpu.streaming import prune_checkpoint

    first, report = prune(make_model("qwen2", layers=3), PruneConfig(method="flap", pruning_ratio=0.5),
                          windows=make_windows(16, 32), device="cpu", progress=False)
    src = save_pruned(first, make_tokenizer(), tmp_path / "flap", report.to_dict())
    saved = json.loads((src / "config.json").read_text())
    assert saved["o_proj_bias"] is True and saved["down_proj_bias"] is True
    cfg = PruneConfig(method="ridge", pruning_ratio=0.25)
    again, report2 = prune(load_model(str(src)).model, cfg, windows=make_windows(16, 32, seed=3), device="cpu",
                           progress=False)
    assert all(layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
               for layer in again.model.layers)
    save_pruned(again, make_tokenizer(), tmp_path / "memory", report2.to_dict())
    res = prune_checkpoint(src, cfg, tmp_path / "streamed", windows=make_windows(16, 32, seed=3), progress=False)
    _assert_same_checkpoint(tmp_path / "memory", res.path)
    with torch.no_grad():
        assert torch.equal(load_model(str(res.path)).model(X).logits, again(X).logits)


def test_cli_streams_rcpu_checkpoints_without_remote_code(tmp_path, capsys):
    from conftest import make_text

    from rcpu.cli import main

    _, src = _nonuniform_checkpoint(tmp_path)
    (tmp_path / "text.txt").write_text(make_text())
    assert main(["prune", "--model", str(src), "--calib", str(tmp_path / "text.txt"), "--eval", "none",
                 "--device", "cpu", "--method", "wanda-sp", "--pruning_ratio", "0.25", "--nsamples", "8",
                 "--seqlen", "32", "--save_model", str(tmp_path / "again"), "-q"]) == 0
    assert "streamed from" in capsys.readouterr().out
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "rcpu_llama"
