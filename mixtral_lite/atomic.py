"""Atomic folder writes: a checkpoint folder is replaced whole, so nothing is lost and nothing mixes.

A save builds the complete new folder as a hidden sibling (``.NAME.tmp-PID-RAND``), fsyncs every
file and the folder, and only then switches it in with one ``rename``: onto a missing or empty
``NAME`` a plain rename, onto an existing folder Linux's ``renameat2(RENAME_EXCHANGE)``, which swaps
the two directory entries in one step. Whatever moment a save is killed at, ``NAME`` is the
complete old folder or the complete new one; the old one is deleted only after the switch. Files of
the old folder that the save does not write (a tokenizer, notes) are carried over as hard links.

Where the exchange is not available (not Linux, a file system without it) the switch falls back to
two renames (old to ``.NAME.previous``, new into place): never a mix and never a loss, but a reader
in between finds no folder, and a crash there leaves the old checkpoint at ``.NAME.previous``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def fsync_file(path: Path) -> None:
    """Flush one file's data to the disk (a rename is only durable after the data is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``path`` as a temporary sibling, fsync, then rename it over: old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2); False where that is unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _clean_stale(folder: Path) -> None:
    """Remove temporary folders of saves that were killed (their process is gone)."""
    prefix = f".{folder.name}.tmp-"
    for p in folder.parent.glob(prefix + "*"):
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, keep: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """Yield an empty temporary folder; on a clean exit it replaces ``path`` whole (see the module).

    Entries of the old ``path`` for which ``keep(name)`` is true and that the caller did not write
    are carried into the new folder first. On an exception the temporary folder is removed and
    ``path`` is left untouched.
    """
    folder = Path(path)
    if folder.is_symlink():
        folder = folder.resolve()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder (expected a checkpoint folder to write)")
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(folder)
        tmp = parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"{folder}: cannot write here ({exc.strerror or exc})") from None
    try:
        yield tmp
        if folder.is_dir():
            for old in folder.iterdir():
                if keep(old.name) and not os.path.lexists(tmp / old.name):
                    if old.is_dir() and not old.is_symlink():
                        shutil.copytree(old, tmp / old.name, symlinks=True, copy_function=_link_or_copy)
                    elif old.is_symlink():
                        os.symlink(os.readlink(old), tmp / old.name)
                    else:
                        _link_or_copy(str(old), str(tmp / old.name))
        for p in tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                fsync_file(p)
        fsync_dir(tmp)
        _switch(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    shutil.rmtree(tmp, ignore_errors=True)  # after an exchange it holds the old folder


def _switch(tmp: Path, folder: Path) -> None:
    if not folder.exists():
        os.rename(tmp, folder)
        return
    try:
        os.rmdir(folder)  # an empty folder: a plain rename replaces it
    except OSError:
        pass
    else:
        os.rename(tmp, folder)
        return
    if _exchange(tmp, folder):
        return
    previous = folder.with_name(f".{folder.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    os.rename(folder, previous)
    os.rename(tmp, folder)
    shutil.rmtree(previous, ignore_errors=True)


__all__ = ["atomic_folder", "write_bytes_atomic", "fsync_file", "fsync_dir"]
