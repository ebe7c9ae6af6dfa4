"""Files that are either whole or absent: write to a temporary name, flush to disk, then rename."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from .errors import DiskFullError

TEMP_SUFFIX = ".partial"


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temp_path)``, fsync the result and rename it to ``path``.

    The temporary name ends in ``.partial`` so that no web UI lists it as a checkpoint. On any error the
    temporary file is removed and ``path`` is untouched; a full disk becomes a ``DiskFullError``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}{TEMP_SUFFIX}")
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"The disk is full: {path} could not be written (nothing half-written was left).",
                f"Free some space on the drive of {path.parent} and train again; "
                "the run resumes from its last resume point.",
            ) from exc
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
