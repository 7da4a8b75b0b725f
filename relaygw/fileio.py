"""Durable file writes: the few primitives the spool, Maildir and key files share."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """os.write until everything is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int,
                     owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data``: all of it or nothing, also across a crash.

    ``owner`` (uid, gid): the new file gets them (changing the user needs root; a
    ``PermissionError`` then leaves ``path`` as it was).
    """
    # Temp file beside the target (same filesystem, so os.replace is atomic), fsync it,
    # rename, then fsync the directory so the rename itself is durable.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            if owner is not None and owner != _owner(fd):
                os.fchown(fd, *owner)  # before the mode: chown may clear set-id bits
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _owner(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_uid, info.st_gid
