"""The web UI's closest-checkpoint lookup (``modules.sd_models.get_closet_checkpoint_match``) on a plain folder,
for the hosts that have no web UI to ask: the standalone app and the command line.

A name is accepted in every form the web UI accepts: its title (the path under the checkpoint folder) with or
without a `` [hash]`` suffix, the file name, the name without extension, the path with ``_`` for ``/``, the
web UI's short hash (the first 10 hex digits of the file's SHA-256) or the full SHA-256, its legacy 8-digit
hash, and finally any part of a title (the shortest title that contains it), as the web UI does.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
HASH_SUFFIX = re.compile(r"\s*\[[^]]+]\s*$")
HEX = re.compile(r"[0-9a-fA-F]{8,64}")


def checkpoint_titles(checkpoints_dir: Path) -> dict[str, Path]:
    """``{title: file}`` of the checkpoint files under the folder: '/'-separated relative paths, sorted."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return {}
    files = (p for p in folder.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
    return {p.relative_to(folder).as_posix(): p
            for p in sorted(files, key=lambda p: p.relative_to(folder).as_posix().lower())}


def legacy_hash(path: Path) -> str:
    """The web UI's old 8-digit model hash: SHA-256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def sha256(path: Path) -> str:
    """The SHA-256 of the whole file (the web UI's short hash is its first 10 digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _aliases(title: str) -> Iterable[str]:
    path = Path(title)
    yield title
    yield path.name
    yield path.stem if path.suffix.lower() in CHECKPOINT_SUFFIXES else path.name
    yield str(path.with_suffix("")).replace("/", "_").replace("\\", "_")


def closest_checkpoint(name: str, titles: dict[str, Path]) -> Path | None:
    """The file the web UI would pick for ``name`` among ``titles`` (see the module's docstring), or None."""
    name = (name or "").strip()
    if not name:
        return None
    for candidate in dict.fromkeys([name, re.sub(HASH_SUFFIX, "", name)]):
        for title, path in titles.items():
            if candidate in _aliases(title):
                return path
    if HEX.fullmatch(name):
        wanted = name.lower()
        for path in titles.values():
            if len(wanted) == 8 and legacy_hash(path) == wanted:
                return path
            if len(wanted) in (10, 64) and sha256(path)[:len(wanted)] == wanted:
                return path
    for candidate in dict.fromkeys([name, re.sub(HASH_SUFFIX, "", name)]):
        found = sorted((t for t in titles if candidate in t), key=len)
        if found:
            return titles[found[0]]
    return None
