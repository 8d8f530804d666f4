"""Atomic outputs: a file or a whole folder appears under its final name complete, or not at all.

A crash, ``kill -9``, Ctrl-C or a full disk in the middle of a write leaves the previous file or folder
as it was, never a mix of old and new files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block finishes: a crash mid-write
    (kill -9 included) never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """An empty sibling folder of ``path`` to fill; when the block finishes, it replaces ``path`` as a whole.

    If the block fails (an error, Ctrl-C, a full disk), ``path`` is left as it was and the sibling is
    removed. On Linux the old and new folders are swapped in one ``renameat2(RENAME_EXCHANGE)``; elsewhere
    the old folder is renamed aside first, so a crash between the two renames leaves it as a hidden
    sibling (``.NAME.*.tmp``), never mixed with the new files.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield temporary
        os.chmod(temporary, 0o755)  # mkdtemp makes it private; outputs are ordinary folders
        if not path.is_dir() or not _exchange(temporary, path):
            _replace_folder(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # the new folder on failure, the old one on success


def remove_leftovers(path: Path) -> None:
    """The temporaries of ``path`` that a killed earlier write left behind (``.NAME.*.tmp``)."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or file system cannot."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):  # a file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(second))


def _replace_folder(new: Path, path: Path) -> None:
    """Put ``new`` at ``path``; an old folder there ends at ``new``'s name (removed by the caller)."""
    if not path.exists():
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.replace(path, aside)  # onto the empty folder just made
    os.replace(new, path)
    os.replace(aside, new)
