"""Maildir delivery (https://cr.yp.to/proto/maildir.html): one message, one mailbox, on disk.

Synchronous and free of Twisted: the caller runs it in the spool's thread pool. The steps are the
classic ones, with the fsyncs a crash-safe queue needs:

1. create ``tmp/``, ``new/`` and ``cur/`` (mode 0700, missing parents too) when absent;
2. write ``tmp/<unique>``: ``Return-Path`` and ``Delivered-To`` lines, then the stored message,
   copied from its content (the spool file) in bounded chunks with LF line ends; fsync the file;
3. hard-link it into ``new/`` (rename where the file system has no hard links), fsync ``new/``;
4. only then report ``2.0.0`` and remove the ``tmp/`` name.

Every failure is a transient result, never an exception and never a permanent failure: a full disk,
a wrong permission or a mailbox path that is a file are the operator's to fix, and the message waits
in the queue meanwhile. Whatever was written is removed again, so a retry starts clean.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

from relaygw.fileio import fsync_dir, write_all
from relaygw.results import DeliveryResult, delivered, transient

if TYPE_CHECKING:  # only the type: this module stays free of Twisted at run time
    from relaygw.delivery.courier import MessageContent

__all__ = ["CHUNK_SIZE", "deliver_to_maildir", "unique_name"]

CHUNK_SIZE = 1024 * 1024  # bytes copied per read: memory stays bounded whatever the message size

# The spool holds the message as received, with CRLF (only CRLF: a bare CR or LF was refused
# or normalised at DATA). A Maildir file is a Unix text file: Postfix's local(8) and virtual(8),
# maildrop and Dovecot's LDA (mail_save_crlf = no, its default) write LF, and that is what
# Maildir readers expect. So each CRLF becomes LF; every other byte is kept.

_counter = itertools.count(1)
_counter_lock = threading.Lock()  # deliveries run in a thread pool


def unique_name(hostname: str, now: float) -> str:
    """A Maildir unique name: ``<secs>.M<usecs>P<pid>Q<n>R<random>.<host>``.

    The delivery counter and the random part keep names distinct within one process and
    microsecond; the pid across processes. As the spec says, "/" and ":" in the host name become
    ``\\057`` and ``\\072`` (":" separates the info part of a name in ``cur/``).
    """
    with _counter_lock:
        count = next(_counter)
    usecs = int(now * 1_000_000) % 1_000_000
    host = (hostname or "localhost").replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{usecs}P{os.getpid()}Q{count}R{secrets.token_hex(8)}.{host}"


def deliver_to_maildir(maildir: Path, recipient: str, sender: str, content: MessageContent,
                       queue_id: str, hostname: str, now: float | None = None) -> DeliveryResult:
    """Deliver the stored message ``content`` into ``maildir/new``, with LF line ends.

    ``queue_id`` is accepted for the courier's uniform call; the file name does not carry it.
    Returns ``delivered("2.0.0")`` only after the file and the ``new/`` directory are fsynced;
    otherwise a transient result (``4.3.1`` disk full, ``4.2.2`` quota exceeded, ``4.3.0`` any
    other fault). Never raises.
    """
    maildir = Path(maildir)
    when = time.time() if now is None else now
    prefix = (b"Return-Path: <" + _header_safe(sender) + b">\n"
              + b"Delivered-To: <" + _header_safe(recipient) + b">\n")
    tmp_path: Path | None = None
    new_path: Path | None = None
    try:
        problem = _ensure_maildir(maildir)
        if problem is not None:
            return transient("4.3.0", f"maildir delivery failed: {problem}")
        name = unique_name(hostname, when)
        fd = os.open(maildir / "tmp" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        tmp_path = maildir / "tmp" / name  # ours only once created (O_EXCL)
        try:
            write_all(fd, prefix)
            _copy_content(fd, content)
            os.fsync(fd)  # os.write is unbuffered: nothing to flush first
        finally:
            os.close(fd)
        _link_or_rename(tmp_path, maildir / "new" / name)
        new_path = maildir / "new" / name  # ours only now: a name clash must not remove another
        fsync_dir(maildir / "new")
    except OSError as exc:
        _remove(tmp_path)
        _remove(new_path)  # not durable yet: the retry must not leave a second copy
        return _failure(exc)
    except Exception as exc:  # never raise: the queue keeps the message and retries
        _remove(tmp_path)
        _remove(new_path)
        return transient("4.3.0", f"maildir delivery failed: {exc!r}")
    _remove(tmp_path)  # after a link; a leftover would be harmless (MUAs clean tmp/ after 36 h)
    return delivered(f"delivered to maildir {maildir}")


def _failure(exc: OSError) -> DeliveryResult:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EDQUOT:
        return transient("4.2.2", f"maildir delivery failed: mailbox full: {reason}")
    if exc.errno == errno.ENOSPC:
        return transient("4.3.1", f"maildir delivery failed: {reason}")
    return transient("4.3.0", f"maildir delivery failed: {reason}")


def _header_safe(address: str) -> bytes:
    # Addresses are validated at RCPT/MAIL time; this is the second line of defence, so that no
    # address can add a header line of its own.
    for char in "\r\n\x00":
        address = address.replace(char, " ")
    return address.encode("utf-8", "replace")


def _ensure_maildir(maildir: Path) -> str | None:
    """Create the Maildir when missing; a reason string when a part exists and is no directory."""
    for path in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        if not path.is_dir():
            if path.exists() or path.is_symlink():
                return f"{path} exists and is not a directory"
            _make_dirs(path)
    return None


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` with mode 0700 for every directory created, each entry made durable."""
    missing: list[Path] = []
    probe = path
    while not probe.is_dir():
        if probe.exists() or probe.is_symlink() or probe.parent == probe:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe))
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            if not directory.is_dir():  # raced with something that is not a directory
                raise
            continue
        os.chmod(directory, 0o700)  # whatever the umask; mkdir's mode is only an upper bound
        fsync_dir(directory.parent)


def _copy_content(fd: int, content: MessageContent) -> None:
    """The message with each CRLF as LF; a CR without an LF after it stays."""
    chunks = content.chunks(CHUNK_SIZE)
    try:
        held = b""  # a CR at the end of a chunk may pair with an LF at the start of the next
        for chunk in chunks:
            chunk = held + chunk
            held = b"\r" if chunk.endswith(b"\r") else b""
            write_all(fd, chunk[: len(chunk) - len(held)].replace(b"\r\n", b"\n"))
        write_all(fd, held)
    finally:
        if isinstance(chunks, Generator):
            chunks.close()  # a write failed midway: release the spool file now, not when dropped


def _link_or_rename(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # fails, rather than overwrites, if the name is taken
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
        os.rename(source, target)  # file systems without hard links (e.g. vfat, some FUSE)


def _remove(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except (OSError, ValueError):
        pass
