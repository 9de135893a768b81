"""The command line: flags, outputs and one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rcpu.cli import main


def _prune_args(root, *extra):
    return ["prune", "--model", str(root / "model"), "--calib", str(root / "text.txt"), "--eval",
            str(root / "text.txt"), "--nsamples", "16", "--seqlen", "32", "--eval_seqlen", "32", "-q", *extra]


def test_prune_saves_reloadable_model(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(_prune_args(tiny_checkpoint, "--method", "rcpu", "--pruning_ratio", "0.5",
                            "--save_model", str(out), "--report", str(tmp_path / "r.json"))) == 0
    text = capsys.readouterr().out
    assert "dense : ppl" in text and "pruned: ppl" in text and "seqlen 32" in text and "float32" in text
    assert "parameters:" in text and "pruning took" in text
    prov = json.loads((out / "rcpu_provenance.json").read_text())
    assert prov["config"]["pruning_ratio"] == 0.5 and prov["calibration"]["nsamples"] == 16
    assert prov["calibration"]["seqlen"] == 32 and prov["calibration"]["seed"] == 0
    assert prov["evaluation"]["pruned"]["seqlen"] == 32
    assert len(prov["layers"][0]["kept_channels"]) == 48
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 48 and model.config.num_attention_heads == 4
    assert (out / "tokenizer.json").exists()
    # same seed, same pruned weights
    again = tmp_path / "again"
    assert main(_prune_args(tiny_checkpoint, "--method", "rcpu", "--pruning_ratio", "0.5", "--eval", "none",
                            "--save_model", str(again))) == 0
    other = AutoModelForCausalLM.from_pretrained(again)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), other.state_dict().items(), strict=False):
        assert n1 == n2 and torch.equal(p1, p2)


def test_flap_global_allocation_saves_nonuniform(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "flap"
    assert main(_prune_args(tiny_checkpoint, "--method", "flap", "--pruning_ratio", "0.3",
                            "--save_model", str(out))) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlp_bias"]  # FLAP bias compensation of down_proj is carried by the stock switch
    if "layer_intermediate_size" in cfg:  # widths differ per layer
        assert (out / "modeling_rcpu.py").exists()
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    assert model is not None


def test_eval_command(tiny_checkpoint, capsys):
    assert main(["eval", "--model", str(tiny_checkpoint / "model"), "--ppl", str(tiny_checkpoint / "text.txt"),
                 "--seqlen", "16", "32", "-q"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ppl")]
    assert len(lines) == 2 and "seqlen 16" in lines[0] and "seqlen 32" in lines[1]
    assert "tokens" in lines[0] and "float32" in lines[0]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "rcpu.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--pruning_ratio", "1.2"], "--pruning_ratio must be in [0, 1)"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--calib", "/no/such/file.txt"], "not found"),
    (["--nsamples", "4", "--seqlen", "100000"], "--seqlen"),
])
def test_bad_input_one_line_error(tiny_checkpoint, tmp_path, args, message):
    save = tmp_path / "never"
    proc = _run(*_prune_args(tiny_checkpoint, "--eval", "none", "--save_model", str(save)), *args)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("rcpu: error:")]
    assert len(err) == 1 and message in err[0], proc.stderr
    assert not save.exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_bad_model_and_existing_output(tiny_checkpoint, tmp_path):
    proc = _run("prune", "--model", str(tmp_path / "missing"), "-q")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    (tmp_path / "exists").mkdir()
    proc = _run(*_prune_args(tiny_checkpoint, "--save_model", str(tmp_path / "exists")))
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr


def test_bad_model_fails_before_calibration_text_is_fetched(tmp_path, monkeypatch, capsys):
    """A wrong --model must not first download the built-in text (offline, that hid the real error)."""
    from rcpu import data

    def fetched(*a, **k):
        raise AssertionError("calibration text touched before the model path was checked")

    monkeypatch.setattr(data, "describe_source", fetched)
    (tmp_path / "weights.bin").write_bytes(b"0")
    for model, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "weights.bin", "not a .gguf")):
        assert main(["prune", "--model", str(model), "-q"]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.txt", " \n\n\t\n"),
                                          ("empty.jsonl", '{"text": ""}\n\n{"text": "  "}\n')])
def test_empty_calib_file_fails_before_the_model_loads(tiny_checkpoint, tmp_path, monkeypatch, capsys, name, content):
    from rcpu import loading

    def loaded(*a, **k):
        raise AssertionError("the model was loaded before the calibration file was checked")

    monkeypatch.setattr(loading, "load_model", loaded)
    monkeypatch.setattr(loading, "streamable_dir", loaded)
    empty = tmp_path / name
    empty.write_text(content)
    for save in ([], ["--save_model", str(tmp_path / "out")]):  # in memory and streamed
        rc = main(["prune", "--model", str(tiny_checkpoint / "model"), "--calib", str(empty),
                   "--eval", str(tiny_checkpoint / "text.txt"), "--device", "cpu", "-q", *save])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rcpu: error:")]
        assert rc == 2 and len(err) == 1 and f"text source {empty} is empty" in err[0], err
    assert not (tmp_path / "out").exists()


def test_refinement_and_gram_dtype_flags_reach_the_provenance(tiny_checkpoint, tmp_path):
    out = tmp_path / "refined"
    assert main(_prune_args(tiny_checkpoint, "--method", "ridge", "--pruning_ratio", "0.5", "--eval", "none",
                            "--refine_epochs", "2", "--refine_lr", "5e-4", "--gram_dtype", "float32",
                            "--save_model", str(out))) == 0
    prov = json.loads((out / "rcpu_provenance.json").read_text())
    cfg = prov["config"]
    assert cfg["refine_epochs"] == 2 and cfg["refine_lr"] == 5e-4 and cfg["gram_dtype"] == "float32"
    assert "heldout_windows" in prov["calibration"]
    for layer in prov["layers"]:
        log = layer["refine"]
        assert log["epochs"] == 2 and log["measured_on"] == "heldout"
        assert log["kept"] == (log["rel_error_after"] < log["rel_error_before"])


def _parse(*argv):
    from rcpu.cli import build_parser

    return build_parser().parse_args(list(argv))


def test_prune_flags_are_generated_from_the_config_fields(capsys):
    """Every PruneConfig field has its flag; no flags give PruneConfig()'s defaults; flags reach their fields."""
    import dataclasses

    from rcpu.cli import _config_from_args, _config_values
    from rcpu.config import PruneConfig
    from rcpu.errors import RcpuError

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(PruneConfig):
        flag = f.metadata.get("flag", f.name)
        assert f"--{flag}" in text and f.metadata["help"], f.name
        if "_" in flag:
            assert f"--{flag.replace('_', '-')}" in text, f.name
    assert PruneConfig(**_config_values(PruneConfig, _parse("prune"))) == PruneConfig()
    assert _config_from_args(PruneConfig, _parse("prune")) == PruneConfig().validate()

    values = _config_values(PruneConfig, _parse(
        "prune", "--method", "flap-ridge", "--pruning-ratio", "0.35", "--no-compensate_attn", "--no-compensate-mlp",
        "--ridge_lambda", "auto", "--ridge-grid", "0.01, 0.1,1", "--ridge_lambda_absolute", "--no-rebalance",
        "--gram_dtype", "float32", "--head-unit", "group", "--allocation", "error",
        "--selection_block", "4", "--refine_epochs", "2", "--refine-lr", "5e-4",
        "--nsamples", "16", "--batch_size", "4", "--seed", "7"))
    expect = dict(method="flap-ridge", pruning_ratio=0.35, compensate_attn=False, compensate_mlp=False,
                  ridge_lambda="auto", ridge_grid=(0.01, 0.1, 1.0), ridge_lambda_relative=False, rebalance=False,
                  gram_dtype="float32", head_unit="group", allocation="error",
                  selection_block=4, refine_epochs=2, refine_lr=5e-4, nsamples=16,
                  batch_size=4, seed=7, score=None, compensation=None)
    assert {k: values[k] for k in expect} == expect
    cfg = _config_from_args(PruneConfig, _parse("prune", "--method", "ridge", "--ridge-lambda", "0.05",
                                                "--statistics", "dense"))
    # validated: the preset's settings are plain fields
    assert (cfg.ridge_lambda, cfg.score, cfg.compensation, cfg.statistics, cfg.allocation) == \
        (0.05, "rcpu", "ridge", "dense", "uniform")
    for argv, message in ((["--ridge_lambda", "x"], "--ridge_lambda must be a number or 'auto', got 'x'"),
                          (["--ridge_grid", "1,a"], "--ridge_grid must be comma-separated numbers, got '1,a'")):
        with pytest.raises(RcpuError, match=message):
            _config_from_args(PruneConfig, _parse("prune", *argv))


def test_validate_resolves_the_preset_once():
    from rcpu.config import DEFAULTS, PRESETS, PruneConfig

    for method in PRESETS:
        raw = PruneConfig(method=method)
        cfg = raw.validate()
        assert all(getattr(raw, name) is None for name in DEFAULTS)  # the caller's config is left as given
        assert all(getattr(cfg, name) == {**DEFAULTS, **PRESETS[method]}[name] for name in DEFAULTS)
        assert cfg.validate() == cfg and cfg.to_dict() == raw.to_dict()
    assert PruneConfig(method="flap", statistics="sequential").validate().statistics == "sequential"
