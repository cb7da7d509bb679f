"""Files that are never seen half-written, used by every writer of fsdfm (models, token files,
training state): git's write-then-rename.

A file is written under a temporary name beside its target (``NAME.tmp-<pid>-<random>``, so
that the rename stays on one file system), flushed and fsynced, then renamed over the target;
the directory is fsynced so that the rename itself survives a power cut. A reader sees the old
file or the new one, never a mix. :class:`Staging` does this for several files that are renamed
together in a chosen order; temporaries that a killed process leaves behind are recognised by
their ``.tmp-`` mark (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_MARK = ".tmp-"


def temporary_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``, marked as ours."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (so that a rename in it is durable); best effort, since some
    file systems refuse to open or sync directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's file-creation mask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Staging:
    """Files written under temporary names and renamed into place by :meth:`commit`, in the
    order they were staged; on leaving the ``with`` block every temporary that was not committed
    is removed (an error while writing leaves the targets as they were)::

        with Staging() as stage:
            stage.write(directory / "data.bin", lambda f: f.write(payload))
            stage.write(directory / "data.json", lambda f: f.write(sidecar))  # renamed last
            stage.commit()
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)

    def write(self, target: Path, write: Callable[[BinaryIO], object]) -> None:
        """Stage ``target`` with the bytes that ``write(file)`` writes into an open binary file."""
        tmp = self._reserve(target)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    def write_path(self, target: Path, write: Callable[[Path], object]) -> None:
        """Stage ``target`` with a writer that takes a path (libraries that open the file
        themselves, such as safetensors); the file gets the usual permissions (0666 less the
        umask) whatever mode the writer created it with."""
        tmp = self._reserve(target)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        fsync_path(tmp)

    def staged(self) -> list[tuple[Path, Path]]:
        """(temporary, target) of every file staged and not yet committed, in order."""
        return list(self._staged)

    def _reserve(self, target: Path) -> Path:
        tmp = temporary_name(Path(target))
        self._staged.append((tmp, Path(target)))
        return tmp

    def commit(self) -> None:
        """Rename every staged file over its target, in order, and make the renames durable."""
        directories = []
        for tmp, target in self._staged:
            os.replace(tmp, target)
            if target.parent not in directories:
                directories.append(target.parent)
        self._staged.clear()
        for directory in directories:
            fsync_path(directory)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` with what ``write(file)`` writes, atomically (see the module)."""
    with Staging() as stage:
        stage.write(Path(path), write)
        stage.commit()


def figure_bytes(fig, fmt: str = "png", dpi: int = 90) -> bytes:
    """A matplotlib figure rendered to bytes (written with :func:`atomic_write` or a
    :class:`Staging`, never straight into its target)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi)
    return buffer.getvalue()


def save_figure(fig, path: Path, dpi: int = 90) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (png without one)."""
    path = Path(path)
    data = figure_bytes(fig, path.suffix.lstrip(".") or "png", dpi)
    atomic_write(path, lambda f: f.write(data))
    return path


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 16 MB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE, also
    for directories); False where the system or the file system cannot, nothing changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a C library older than glibc 2.28
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


# A temporary of ours: the target's name, the mark, the writer's pid and 8 hex digits.
_TEMPORARY = re.compile(r"^(?P<target>.+)" + re.escape(TMP_MARK) + r"(?P<pid>\d+)-[0-9a-f]{8}$")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(*directories: Path, target: str | None = None) -> None:
    """Remove the temporaries (files and directories) in ``directories`` that a killed writer
    left: names of the form NAME.tmp-<pid>-<8 hex digits> whose process is gone (with
    ``target``, only those of that NAME). Anything else, a live writer's included, stays."""
    for directory in directories:
        if not Path(directory).is_dir():
            continue
        for entry in Path(directory).glob(f"*{TMP_MARK}*"):
            found = _TEMPORARY.match(entry.name)
            if not found or (target is not None and found["target"] != target):
                continue
            if _process_alive(int(found["pid"])):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
