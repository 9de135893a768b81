"""The GGUF rounding used by quantisation-aware recovery equals the gguf package's, bit for bit,
and a quantisation-aware recovery exports at its type without further loss."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from safetensors.torch import load_file

from rcpu.cli import main
from rcpu.quantgrid import GRID_TYPES, fake_quantize, ste


def _matrix(cols: int, seed: int = 0) -> np.ndarray:
    """Weights with what breaks block quantisers: outliers, an all-zero block, a constant block,
    a block of tied extremes of both signs, and rows whose last block is all positive."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((64, cols)) * 0.02).astype(np.float32)
    x[:, ::13] *= 8
    x[3, :32] = 0
    x[5, :32] = 0.01
    x[7, 0:32:2], x[7, 1:32:2] = -0.03, 0.03
    x[8:12, 32:] = np.abs(x[8:12, 32:]) + 0.01
    return x


def _reference(x: np.ndarray, quant: str) -> np.ndarray:
    """The gguf package's quantise -> dequantise, rows zero-padded to whole blocks like the export."""
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    pad = -x.shape[1] % 32
    padded = np.pad(x, ((0, 0), (0, pad)))
    return quants.dequantize(quants.quantize(padded, qtype), qtype)[:, :x.shape[1]]


@pytest.mark.parametrize("quant", GRID_TYPES)
@pytest.mark.parametrize("cols", [96, 48])
def test_rounding_equals_the_gguf_package_and_survives_export(quant, cols):
    x = _matrix(cols)
    ours = fake_quantize(torch.from_numpy(x), quant).numpy()
    assert np.array_equal(ours, _reference(x, quant))
    assert not np.array_equal(ours, x)
    # exporting the rounded weights at the same type gives them back exactly
    assert np.array_equal(_reference(ours, quant), ours)


def test_straight_through_value_and_gradient():
    w = torch.from_numpy(_matrix(96)).requires_grad_(True)
    g = torch.randn(w.shape)
    out = ste(w, "q4_0")
    assert torch.equal(out.detach(), fake_quantize(w, "q4_0"))  # the rounded value, to the bit
    (out * g).sum().backward()
    assert torch.equal(w.grad, g)  # the identity backwards
    with pytest.raises(ValueError, match="q4_0"):
        fake_quantize(w, "q3_k")


def test_quant_aware_recovery_exports_without_loss(tmp_path):
    from test_recover import pruned_for_export

    pruned_dir, text = pruned_for_export(tmp_path, "--pruning_ratio", "0.4")  # MLP width 47: the export pads it
    rec = tmp_path / "rec"
    assert main(["recover", "--model", str(pruned_dir), "--data", str(text), "--eval", str(tmp_path / "other.txt"),
                 "--tokens", "1024", "--seqlen", "32", "--eval_seqlen", "32", "--heldout", "4", "-q",
                 "--quant_aware", "q4_1", "--save_model", str(rec)]) == 0
    rec_cfg = json.loads((rec / "rcpu_provenance.json").read_text())["recovery"]["config"]
    assert rec_cfg["quant_aware"] == "q4_1"
    weights = load_file(str(rec / "model.safetensors"))
    width = json.loads((rec / "config.json").read_text())["intermediate_size"]
    assert width % 32, "the test needs an MLP width that the export pads"
    decoder = {k: v for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight")}
    rounded = {k: v for k, v in decoder.items() if v.shape[1] % 32 == 0 or "down_proj" in k}
    assert len(rounded) < len(decoder)  # 6 heads of 8: o_proj's rows of 48 are exported as f16
    assert all(torch.equal(fake_quantize(v, "q4_1"), v) for v in rounded.values())
    assert not any(torch.equal(fake_quantize(v, "q4_1"), v) for k, v in decoder.items() if k not in rounded)
    embed = weights["model.embed_tokens.weight"]
    assert not torch.equal(fake_quantize(embed, "q4_1"), embed)  # stored at q8_0 or above: not rounded

    out = tmp_path / "rec.gguf"
    assert main(["export", "--model", str(rec), "--gguf", str(out), "--quant", "q4_1", "-q"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for i in range(2):
        assert tensors[f"blk.{i}.attn_output.weight"].tensor_type == gguf.GGMLQuantizationType.F16
        for gg, hf, axis in (("ffn_down", "mlp.down_proj", 1), ("ffn_up", "mlp.up_proj", 0),
                             ("ffn_gate", "mlp.gate_proj", 0), ("attn_v", "self_attn.v_proj", 1)):
            t = tensors[f"blk.{i}.{gg}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
            stored = quants.dequantize(t.data, t.tensor_type)
            ours = weights[f"model.layers.{i}.{hf}.weight"].numpy()
            stored = stored[:, :ours.shape[1]] if axis == 1 else stored[:ours.shape[0]]
            assert np.array_equal(stored, ours), f"layer {i} {hf}"


def test_quant_aware_needs_every_weight_trained(tmp_path, capsys):
    assert main(["recover", "--model", "smollm2-135m", "--parameters", "lora", "--quant_aware", "q4_0",
                 "--save_model", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--parameters full" in err[0]
    assert not (tmp_path / "x").exists()


def test_quant_aware_tensor_types_train_what_the_export_writes(tmp_path):
    """Matrices the export stores in another type (--tensor_type) train through that type's rounding
    (a float type: none); the file then holds the checkpoint's weights."""
    from test_recover import pruned_for_export

    pruned_dir, text = pruned_for_export(tmp_path, "--pruning_ratio", "0.4")
    rec = tmp_path / "rec"
    types = [r"blk\.1\.ffn_down=q8_0", "attn_v=f16"]
    assert main(["recover", "--model", str(pruned_dir), "--data", str(text), "--eval", str(tmp_path / "other.txt"),
                 "--tokens", "1024", "--seqlen", "32", "--eval_seqlen", "32", "--heldout", "4", "-q",
                 "--quant_aware", "q4_0", "--quant_aware_tensor_type", ",".join(types), "--save_model", str(rec)]) == 0
    rec_cfg = json.loads((rec / "rcpu_provenance.json").read_text())["recovery"]["config"]
    assert rec_cfg["quant_aware_tensor_type"] == types
    w = load_file(str(rec / "model.safetensors"))

    def on(name, quant):
        return torch.equal(fake_quantize(w[name], quant), w[name])

    assert on("model.layers.1.mlp.down_proj.weight", "q8_0") and not on("model.layers.1.mlp.down_proj.weight", "q4_0")
    assert on("model.layers.0.mlp.down_proj.weight", "q4_0") and on("model.layers.1.mlp.up_proj.weight", "q4_0")
    assert not any(on(f"model.layers.{i}.self_attn.v_proj.weight", q) for i in range(2) for q in ("q4_0", "q8_0"))

    out = tmp_path / "rec.gguf"
    assert main(["export", "--model", str(rec), "--gguf", str(out), "--quant", "q4_0", "-q",
                 *(a for t in types for a in ("--tensor_type", t))]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q8_0
    ours = w["model.layers.1.mlp.down_proj.weight"].numpy()
    assert np.array_equal(quants.dequantize(down.data, down.tensor_type)[:, :ours.shape[1]], ours)
    assert tensors["blk.0.attn_v.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize(("extra", "message"), [
    (["--quant_aware_tensor_type", "ffn_down=q8_0"], "needs --quant_aware"),
    (["--quant_aware", "q4_0", "--quant_aware_tensor_type", "ffn_down=q3_k"], "unknown GGUF type 'q3_k'"),
    (["--quant_aware", "q4_0", "--quant_aware_tensor_type", "ffn_down"], "is not PATTERN=TYPE"),
])
def test_quant_aware_tensor_types_refused_up_front(tmp_path, capsys, extra, message):
    assert main(["recover", "--model", "smollm2-135m", *extra, "--save_model", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--quant_aware_tensor_type" in err[0]
    assert not (tmp_path / "x").exists()


def test_quant_aware_tensor_type_selecting_nothing_writes_nothing(tmp_path, capsys):
    from test_recover import pruned_for_export

    pruned_dir, text = pruned_for_export(tmp_path, "--pruning_ratio", "0.4")
    out = tmp_path / "rec"
    assert main(["recover", "--model", str(pruned_dir), "--data", str(text), "--eval", str(tmp_path / "other.txt"),
                 "--tokens", "1024", "--seqlen", "32", "--eval_seqlen", "32", "--heldout", "4", "-q",
                 "--quant_aware", "q4_0", "--quant_aware_tensor_type", r"model\.layers=q8_0",
                 "--save_model", str(out)]) == 2
    assert "selects no weight matrix" in capsys.readouterr().err
    assert not out.exists() and not any(p.name.startswith(".rec") for p in tmp_path.iterdir())
