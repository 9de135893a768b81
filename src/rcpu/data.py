"""Calibration and evaluation text: sources, tokenisation and calibration windows.

Sources (``load_text(source, split)``, ``split`` is ``"calib"`` or ``"eval"``):

* ``"builtin"`` (alias ``"wiki-sample"``): an offline English Wikipedia sample, see below.
* ``"brown"``: the Brown Corpus from the npm registry, split into calib / eval parts by sample
  (see :mod:`rcpu.brown`); a second English text, of another source than the Wikipedia sample.
* ``"wikitext2"``: ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``; calib is the
  ``train`` split joined with ``" "``, eval is the ``test`` split joined with ``"\\n\\n"`` (the
  protocol used by FLAP and RCPU). Needs the Hugging Face hub (or its local cache).
* a ``.txt`` file (the whole file) or a ``.jsonl`` file (one JSON object per line, field
  ``"text"``, or ``path.jsonl:FIELD`` for another field; records joined with ``"\\n\\n"``,
  empty records skipped). For local files the split is ignored: both splits get the same text.

The built-in sample (``wiki-sample-v1``)
----------------------------------------
The text is the MediaWiki XML dump excerpt that ships in the gensim 4.4.0 wheel as test data
(``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, 206 pages). It is
fetched once with :func:`rcpu.assets.wheel_member` and converted by :func:`build_wiki_sample`:

1. Keep pages in the main namespace (``<ns>0</ns>``; in dumps without ``<ns>``, titles without
   a colon) that are not redirects (no ``<redirect>`` element and text not starting with
   ``#REDIRECT``); the text of the last revision is used. Namespaced XML tags are matched by
   their local name, so any MediaWiki export schema version works.
2. Clean the wikitext with mwparserfromhell: drop ``<ref>`` footnotes and ``{| ... |}``
   tables; drop ``[[File:]]``/``[[Image:]]``/``[[Media:]]``/``[[Category:]]`` links and
   interlanguage links (``[[xx:...]]``); drop the reference-apparatus sections ("See also",
   "Notes", "References", "Further reading", "External links", "Bibliography", "Sources", ...;
   see ``DROPPED_SECTIONS``); then ``strip_code()`` (templates, comments and formatting go, link
   text stays). Section headings become paragraphs of their own. Lines of leftover markup the
   parser missed (starting with ``{|``, ``|}``, ``[[``, ``{{``, or a lone HTML tag) are dropped.
3. Normalise whitespace lightly: non-breaking spaces become spaces, runs of spaces collapse to
   one, each line is stripped, runs of blank lines collapse to one blank line (paragraph breaks
   are kept). A page is its title, a blank line, then its body; pages whose body is empty after
   cleaning are dropped.

Split rule (fixed, independent of page order): a page goes to the held-out **eval** part iff
``int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 5 == 0`` (about 20 %), otherwise
to **calib**. Within each part pages keep file order and are joined with ``"\\n\\n"``.

The result is cached in ``cache_dir("data", "wiki-sample-v1")`` as ``calib.txt``, ``eval.txt``
and ``meta.json`` (page and character counts, the rule, the source member and the sha256 of
the bz2). Every file is written to a temporary name and renamed; ``meta.json`` is written last
and marks the cache complete, so an interrupted build is rebuilt, never read. Any change to
the cleaning or split rule must bump the cache name (``wiki-sample-v2``, ...).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import torch

from .assets import cache_dir, wheel_member
from .brown import BROWN, brown_text, describe_brown
from .errors import RcpuError

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
BUILTIN_ALIASES = (BUILTIN, "wiki-sample")
WIKITEXT2 = "wikitext2"
SPLITS = ("calib", "eval")

WIKI_SAMPLE_NAME = "wiki-sample-v1"
WIKI_SAMPLE_PACKAGE = ("gensim", "4.4.0")
WIKI_SAMPLE_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
SPLIT_RULE = (
    'page goes to eval iff int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 5 == 0, '
    "else to calib; pages keep file order within each part and are joined with two newlines"
)
# Section headings (case-insensitive) whose whole section, subsections included, is dropped.
DROPPED_SECTIONS = frozenset({
    "see also", "notes", "footnotes", "references", "citations", "sources", "bibliography",
    "further reading", "external links", "notes and references", "references and notes",
    "works cited", "general references", "cited sources",
})
_DROPPED_LINK_NAMESPACES = frozenset({"file", "image", "media", "category"})
_DROPPED_TAGS = frozenset({"ref", "references", "table", "gallery"})
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]+)*:")
# Lines of markup the parser could not make sense of (broken tables, links, templates, lone HTML tags).
_LEFTOVER_MARKUP = re.compile(r"^(?:\{\||\|\}|\[\[|\{\{|</?[A-Za-z][^<>]*>$)")

_ACCEPTED = (
    "accepted sources: 'builtin' (alias 'wiki-sample'), 'brown', 'wikitext2', a .txt file, "
    "a .jsonl file (field 'text'), or 'FILE.jsonl:FIELD'"
)


# --------------------------------------------------------------------------- sources


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise RcpuError(f"unknown split {split!r}; use 'calib' or 'eval'")


def _parse_source(source: str) -> tuple[str, Path | None, str | None]:
    """Classify ``source`` as ``("builtin"|"wikitext2"|"txt"|"jsonl", path, field)``."""
    if not isinstance(source, str) or not source.strip():
        raise RcpuError(f"empty text source {source!r}; {_ACCEPTED}")
    name = source.strip()
    if name.lower() in BUILTIN_ALIASES:
        return BUILTIN, None, None
    if name.lower() == BROWN:
        return BROWN, None, None
    if name.lower() == WIKITEXT2:
        return WIKITEXT2, None, None
    path, field = Path(name).expanduser(), None
    if not path.is_file():
        match = re.fullmatch(r"(.+\.jsonl):([^:/\\]+)", name, flags=re.IGNORECASE)
        if match:
            path, field = Path(match.group(1)).expanduser(), match.group(2)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        if path.is_file():
            raise RcpuError(
                f"unsupported text file type {path.suffix or '(none)'} for {name}; "
                "use a .txt or .jsonl file"
            )
        raise RcpuError(f"unknown text source {name!r}; {_ACCEPTED}")
    if not path.is_file():
        raise RcpuError(f"text file not found: {path}; check the path")
    return suffix[1:], path.resolve(), field if suffix == ".jsonl" else None


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RcpuError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from exc


def _read_jsonl(path: Path, field: str) -> str:
    texts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise RcpuError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RcpuError(f"line {lineno} of {path} is not valid JSON ({exc.msg}); fix the file") from exc
        if not isinstance(record, dict) or field not in record:
            raise RcpuError(
                f"line {lineno} of {path} has no field {field!r}; "
                f"name the text field as {path.name}:FIELD"
            )
        value = record[field]
        if not isinstance(value, str):
            raise RcpuError(
                f"field {field!r} on line {lineno} of {path} is {type(value).__name__}, not a string; "
                "name a text field as FILE.jsonl:FIELD"
            )
        if value.strip():
            texts.append(value)
    return "\n\n".join(texts)


def _load_wikitext2(split: str) -> str:
    hf_split = "train" if split == "calib" else "test"
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise RcpuError("wikitext2 needs the 'datasets' package; pip install datasets, or use builtin") from exc
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)
    except Exception as exc:  # hub errors come in many types (connection, offline mode, HTTP)
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RcpuError(
            f"could not load wikitext2 from the Hugging Face hub ({type(exc).__name__}: {detail}); "
            "check the network, or use the offline sample (--calib builtin) or a local .txt/.jsonl file"
        ) from exc
    texts = ds["text"]
    return (" " if split == "calib" else "\n\n").join(texts)


def load_text(source: str, split: str) -> str:
    """The text of ``source`` for ``split`` ("calib" or "eval"); see the module docstring."""
    _check_split(split)
    kind, path, field = _parse_source(source)
    if kind == BUILTIN:
        text = (_ensure_wiki_sample() / f"{split}.txt").read_text(encoding="utf-8")
    elif kind == BROWN:
        text = brown_text(split)
    elif kind == WIKITEXT2:
        text = _load_wikitext2(split)
    else:
        return _read_local(source, kind, path, field)
    _check_not_empty(source, text, kind, field)
    return text


def _read_local(source: str, kind: str, path: Path, field: str | None) -> str:
    """The text of a local .txt / .jsonl file; an RcpuError when it is not UTF-8, not valid
    JSON lines, or empty."""
    text = _read_txt(path) if kind == "txt" else _read_jsonl(path, field or "text")
    _check_not_empty(source, text, kind, field)
    return text


def _check_not_empty(source: str, text: str, kind: str, field: str | None) -> None:
    if not text.strip():
        where = f" (field {field or 'text'!r})" if kind == "jsonl" else ""
        raise RcpuError(f"text source {source} is empty{where}; give a file with text in it")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_source(source: str, split: str) -> dict:
    """A small JSON-able description of ``source`` for run provenance.

    Keys: ``name`` and ``split`` always; builtin adds ``rule``, ``pages`` (both parts),
    ``chars`` (this part), ``member`` (the wheel member) and ``sha256_bz2``; wikitext2 adds the
    dataset, config, Hugging Face split and joiner; files add ``path`` (absolute), ``sha256``
    and, for .jsonl, ``field``. It never contains a ``source`` key, so callers may add one.

    A local file is read, so that an empty one (or one :func:`load_text` would refuse) is
    reported here, before a command loads a model, with the same error.
    """
    _check_split(split)
    kind, path, field = _parse_source(source)
    if kind == BUILTIN:
        meta = json.loads((_ensure_wiki_sample() / "meta.json").read_text(encoding="utf-8"))
        return {
            "name": WIKI_SAMPLE_NAME,
            "split": split,
            "rule": meta["rule"],
            "pages": meta["pages"],
            "chars": meta["chars"][split],
            "member": meta["source"],
            "sha256_bz2": meta["sha256_bz2"],
        }
    if kind == BROWN:
        return describe_brown(split)
    if kind == WIKITEXT2:
        return {
            "name": WIKITEXT2,
            "split": split,
            "dataset": "wikitext",
            "config": "wikitext-2-raw-v1",
            "hf_split": "train" if split == "calib" else "test",
            "joiner": " " if split == "calib" else "\n\n",
        }
    _read_local(source, kind, path, field)
    desc = {"name": path.name, "split": split, "path": str(path), "sha256": _file_sha256(path)}
    if kind == "jsonl":
        desc["field"] = field or "text"
    return desc


# --------------------------------------------------------------------------- built-in sample


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _iter_pages(bz2_path: Path) -> Iterator[tuple[str, str | None, bool, str]]:
    """Yield ``(title, ns, is_redirect, wikitext)`` for each ``<page>`` of a MediaWiki XML dump."""
    with bz2.open(bz2_path, "rb") as fh:
        for _event, elem in ET.iterparse(fh, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title, ns, redirect, text = "", None, False, ""
            for child in elem.iter():
                name = _local(child.tag)
                if name == "title":
                    title = (child.text or "").strip()
                elif name == "ns":
                    ns = (child.text or "").strip()
                elif name == "redirect":
                    redirect = True
                elif name == "text":
                    text = child.text or ""  # last revision wins
            yield title, ns, redirect, text
            elem.clear()


def _drop_sections(code) -> None:
    """Delete sections headed by ``DROPPED_SECTIONS`` (subsections too); other headings become text."""
    from mwparserfromhell.nodes import Heading, Text

    kept, dropping_level = [], None
    for node in code.nodes:
        if isinstance(node, Heading):
            title = node.title.strip_code().strip()
            if dropping_level is not None and node.level <= dropping_level:
                dropping_level = None
            if dropping_level is None and title.lower() in DROPPED_SECTIONS:
                dropping_level = node.level
            if dropping_level is None:
                kept.append(Text(f"\n\n{title}\n\n"))  # a heading is a paragraph of its own
        elif dropping_level is None:
            kept.append(node)
    code.nodes[:] = kept


def _dropped_node(node) -> bool:
    from mwparserfromhell.nodes import Tag, Wikilink

    if isinstance(node, Tag):
        return str(node.tag).strip().lower() in _DROPPED_TAGS
    if isinstance(node, Wikilink):
        title = str(node.title).strip()
        namespace = title.split(":", 1)[0].strip().lower() if ":" in title else ""
        return namespace in _DROPPED_LINK_NAMESPACES or bool(_INTERLANGUAGE.match(title))
    return False


def _drop_nodes(code) -> None:
    """Apply the cleaning rule to ``code`` and, recursively, to every Wikicode inside it.

    Recursion matters: an unclosed ``''`` can make the rest of a page, headings included,
    children of a formatting tag.
    """
    _drop_sections(code)
    code.nodes[:] = [node for node in code.nodes if not _dropped_node(node)]
    for node in code.nodes:
        for child in node.__children__():
            _drop_nodes(child)


def clean_wikitext(wikitext: str) -> str:
    """Plain prose from MediaWiki markup (the cleaning rule in the module docstring)."""
    import mwparserfromhell

    code = mwparserfromhell.parse(_drop_tables(wikitext))
    _drop_nodes(code)
    text = code.strip_code(normalize=True, collapse=True)
    return _normalise_whitespace(text)


def _drop_tables(wikitext: str) -> str:
    """Remove ``{| ... |}`` tables line by line (nesting aware); the parser misses some of them."""
    kept, depth = [], 0
    for line in wikitext.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("{|"):
            depth += 1
        if depth == 0:
            kept.append(line)
        else:
            depth = max(0, depth - line.count("|}"))
    return "\n".join(kept)


def _normalise_whitespace(text: str) -> str:
    text = text.replace("\u00a0", " ").replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.split("\n")]
    lines = [line for line in lines if not _LEFTOVER_MARKUP.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def eval_page(title: str) -> bool:
    """The split rule: True iff the page titled ``title`` belongs to the held-out eval part."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest(), 16) % 5 == 0


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is ordinary readable data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_wiki_sample(bz2_path: Path, out_dir: Path, source: str | None = None) -> dict:
    """Convert a bz2 MediaWiki XML dump into ``calib.txt``, ``eval.txt`` and ``meta.json``.

    ``source`` names the dump in ``meta.json`` (default: the file name). Returns the meta dict.
    """
    bz2_path, out_dir = Path(bz2_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[str]] = {"calib": [], "eval": []}
    titles: dict[str, list[str]] = {"calib": [], "eval": []}
    dropped = {"redirect": 0, "namespace": 0, "empty": 0}
    try:
        for title, ns, redirect, wikitext in _iter_pages(bz2_path):
            if ns != "0" and not (ns is None and ":" not in title):
                dropped["namespace"] += 1
                continue
            if redirect or wikitext.lstrip().upper().startswith("#REDIRECT"):
                dropped["redirect"] += 1
                continue
            body = clean_wikitext(wikitext)
            if not body:
                dropped["empty"] += 1
                continue
            split = "eval" if eval_page(title) else "calib"
            parts[split].append(f"{title}\n\n{body}")
            titles[split].append(title)
    except (OSError, EOFError, ET.ParseError) as exc:
        raise RcpuError(
            f"could not read the MediaWiki dump {bz2_path} ({exc}); delete it so it is downloaded again"
        ) from exc
    texts = {split: "\n\n".join(pages) for split, pages in parts.items()}
    for split, text in texts.items():
        if not text:
            raise RcpuError(f"the MediaWiki dump {bz2_path} gave no {split} pages; use a larger dump")
    meta = {
        "name": WIKI_SAMPLE_NAME,
        "rule": SPLIT_RULE,
        "source": source or bz2_path.name,
        "sha256_bz2": _file_sha256(bz2_path),
        "pages": {split: len(pages) for split, pages in parts.items()},
        "dropped_pages": dropped,
        "chars": {split: len(text) for split, text in texts.items()},
        "sha256": {split: hashlib.sha256(text.encode("utf-8")).hexdigest() for split, text in texts.items()},
        "eval_titles": titles["eval"],
    }
    (out_dir / "meta.json").unlink(missing_ok=True)  # mark incomplete while the parts are replaced
    for split, text in texts.items():
        _atomic_write(out_dir / f"{split}.txt", text)
    _atomic_write(out_dir / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    logger.info(
        "built %s: calib %d pages / %d chars, eval %d pages / %d chars",
        WIKI_SAMPLE_NAME, meta["pages"]["calib"], meta["chars"]["calib"],
        meta["pages"]["eval"], meta["chars"]["eval"],
    )
    return meta


def _ensure_wiki_sample() -> Path:
    """The cache directory of the built-in sample, building it on first use."""
    out_dir = cache_dir("data", WIKI_SAMPLE_NAME)
    if all((out_dir / name).is_file() for name in ("meta.json", "calib.txt", "eval.txt")):
        return out_dir
    package, version = WIKI_SAMPLE_PACKAGE
    bz2_path = wheel_member(package, version, WIKI_SAMPLE_MEMBER)
    logger.info("building the built-in Wikipedia sample from %s (one time)", bz2_path.name)
    build_wiki_sample(bz2_path, out_dir, source=f"{package}=={version}:{WIKI_SAMPLE_MEMBER}")
    return out_dir


# --------------------------------------------------------------------------- tokens


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole ``text`` as a 1-D LongTensor (no special tokens, tokenised once).

    ``verbose=False`` silences the "sequence length is longer than the specified maximum"
    warning, which is meaningless here since the ids are cut into windows afterwards.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).reshape(-1)


def bos_token_id(tokenizer) -> int | None:
    """The id of the BOS token when ``tokenizer`` starts every encoding with one, else None.

    Read from what the tokenizer does, not from its family or its flags (Gemma's fast tokenizer
    reports ``add_bos_token=False`` and adds BOS in its post-processor): a short text is encoded
    with and without special tokens, and BOS counts when only the first encoding starts with
    ``bos_token_id``. Gemma (and Llama 2/3) add one; SmolLM2 and Qwen2 add none.
    Every window made for such a tokenizer starts with BOS (see :func:`window_span`).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = "The"
    try:
        with_special = list(tokenizer(probe, add_special_tokens=True, verbose=False)["input_ids"])
        without = list(tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"])
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode a word is reported elsewhere
        return None
    if with_special[:1] == [bos] and without[:1] != [bos]:
        return int(bos)
    return None


def window_span(seqlen: int, bos: int | None) -> int:
    """Text tokens per ``seqlen``-token window: ``seqlen - 1`` when every window starts with
    ``bos`` (the BOS takes the place of the first text token, which no window scores anyway),
    else ``seqlen``. Windows are ``seqlen`` tokens long either way, and each yields ``seqlen - 1``
    next-token predictions: with a BOS, every text token of the window is predicted and the BOS
    itself never is."""
    return int(seqlen) - (1 if bos is not None else 0)


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([windows.new_full((windows.shape[0], 1), int(bos)), windows], dim=1)


def consecutive_windows(ids: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """``[n, seqlen]`` non-overlapping windows of ``ids`` in order, each of ``window_span(seqlen, bos)``
    text tokens, prefixed with ``bos`` when given; the tail that does not fill a window is dropped
    (``n`` may be 0). The one place where evaluation and training text is cut into windows."""
    ids = ids.reshape(-1).long()
    span = window_span(seqlen, bos)
    n = ids.numel() // span if span > 0 else 0
    return _with_bos(ids[: n * span].view(n, span), bos)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                        bos: int | None = None) -> torch.Tensor:
    """``[nsamples, seqlen]`` random contiguous windows of ``ids``, reproducible from ``seed``.

    Window starts are drawn uniformly from ``[0, len(ids) - span]`` with a local
    ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched), where ``span`` is
    :func:`window_span`: ``seqlen`` text tokens, or ``seqlen - 1`` after ``bos`` when given.
    """
    if nsamples < 1:
        raise RcpuError(f"--nsamples is {nsamples}; use at least 1")
    if seqlen < 1 or (bos is not None and seqlen < 2):
        raise RcpuError(f"--seqlen is {seqlen}; use at least {1 if bos is None else 2}")
    ids = ids.reshape(-1)
    n = ids.numel()
    span = window_span(seqlen, bos)
    if n < span + 1:
        raise RcpuError(
            f"calibration text has {n} tokens, fewer than --seqlen {seqlen} + 1; "
            "use a longer source or a smaller --seqlen"
        )
    starts = _window_starts(n, nsamples, span, seed)
    return _gather(ids, starts, span, bos)


def _window_starts(n: int, nsamples: int, span: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randint(0, n - span + 1, (nsamples,), generator=generator)


def _gather(ids: torch.Tensor, starts: torch.Tensor, span: int, bos: int | None) -> torch.Tensor:
    index = starts[:, None] + torch.arange(span)[None, :]
    return _with_bos(ids.long()[index.to(ids.device)], bos)


HELDOUT_SEED_OFFSET = 1_000_003


def heldout_windows(ids: torch.Tensor, nholdout: int, nsamples: int, seqlen: int, seed: int,
                    bos: int | None = None) -> torch.Tensor:
    """``[nholdout, seqlen]`` windows of the calibration text that overlap none of the
    ``calibration_windows(ids, nsamples, seqlen, seed, bos)``: for choosing hyper-parameters
    (ridge λ) on calibration data without touching evaluation text. Drawn from
    ``seed + 1_000_003`` by rejection; prefixed with ``bos`` like the calibration windows."""
    ids = ids.reshape(-1)
    n = ids.numel()
    calibration_windows(ids, nsamples, seqlen, seed, bos)  # same validation
    span = window_span(seqlen, bos)
    taken = torch.zeros(n, dtype=torch.bool)
    for s in _window_starts(n, nsamples, span, seed).tolist():
        taken[s:s + span] = True
    # a window starting at s is free iff taken[s:s+span] has no True
    busy = torch.cat([torch.zeros(1), taken.double().cumsum(0)])
    free = (busy[span:] - busy[:-span]) == 0  # for starts 0 .. n - span
    candidates = free.nonzero().flatten()
    if len(candidates) < nholdout:
        raise RcpuError(f"calibration text is too short for {nholdout} held-out windows of {seqlen} tokens "
                        "beside the calibration windows; use a longer source or fewer --nholdout")
    generator = torch.Generator(device="cpu").manual_seed(int(seed) + HELDOUT_SEED_OFFSET)
    pick = candidates[torch.randperm(len(candidates), generator=generator)[:nholdout]]
    return _gather(ids, pick, span, bos)


def token_hash(ids: torch.Tensor) -> str:
    """sha256 hex digest of ``ids`` (flattened, row-major) as little-endian int64 bytes."""
    array = ids.detach().reshape(-1).to(device="cpu", dtype=torch.int64).numpy()
    return hashlib.sha256(array.astype("<i8", copy=False).tobytes()).hexdigest()
