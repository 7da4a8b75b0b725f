"""A queued message's bytes, read from its spool file: the spool's MessageContent.

The message starts ``offset`` bytes into the queue file (after the envelope header) and
runs to the end of the file. Asynchronous reads go through the spool's ``run`` (its
thread pool); the blocking methods are for code that already runs in a thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import Deferred, succeed

__all__ = ["CHUNK", "HEADER_LIMIT", "SpoolContent"]

CHUNK = 256 * 1024  # bytes per asynchronous read
HEADER_LIMIT = 64 * 1024  # bytes of header section returned at most

Run = Callable[..., Deferred[Any]]  # the spool's run: blocking work in its thread pool


class SpoolContent:
    """``size`` message bytes at ``offset`` in the spool file ``path``."""

    __slots__ = ("_run", "offset", "path", "size")

    def __init__(self, path: str, offset: int, size: int, run: Run) -> None:
        self.path = path  # a plain string: open() takes it without pathlib's parsing
        self.offset = offset
        self.size = size
        self._run = run

    def __repr__(self) -> str:
        return f"SpoolContent({self.path!r}, offset={self.offset}, size={self.size})"

    def reader(self) -> _ContentReader:
        return _ContentReader(self._run, self.path, self.offset)

    def headers(self) -> Deferred[bytes]:
        return self._run(self.read_headers)

    def read_headers(self, limit: int = HEADER_LIMIT) -> bytes:
        """The header section: everything before the first empty line (which is not
        included), line ends as stored. At most ``limit`` bytes: a longer header section
        is cut after its last complete line. Blocking; OSError when the file cannot be
        read."""
        if limit < 0:
            raise ValueError("limit must not be negative")
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(limit + 1)
        cut = len(data) > limit  # more follows: the last line read may be incomplete
        data = data[:limit]
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            if end == -1:
                return data[:start] if cut else data  # a final line without its line end
            if data[start:end] in (b"", b"\r"):
                return data[:start]  # the empty line that ends the header section
            start = end + 1
        return data

    def read_all(self) -> bytes:
        """The whole message. Blocking; OSError when the file cannot be read."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read()

    def chunks(self, size: int) -> Iterator[bytes]:
        """The message in reads of ``size`` bytes (memory stays bounded). Blocking; the
        file opens at the first ``next`` and closes at the end, or when the iterator is
        dropped or closed."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.lseek(fd, self.offset, os.SEEK_SET)
            while True:
                chunk = os.read(fd, size)
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)


class _ContentReader:
    """Reads the stored message, chunk by chunk, in the spool's thread pool.

    A short read is the end of the file (a regular file returns less than asked
    only there), so the file is closed in the same trip and neither the final
    ``b""`` nor ``close`` needs another one: a small message costs one trip.
    Plain ``os.pread`` on a descriptor: a Python file object adds five system
    calls (fstat, isatty, seeks).
    """

    def __init__(self, run: Run, path: str, offset: int) -> None:
        self._run = run
        self._path = path
        self._offset = offset  # the next byte to read; advanced in the disk thread
        self._fd: int | None = None  # used in the disk thread only
        self._started = False  # these two on the reactor thread only
        self._at_end = False

    def read(self) -> Deferred[bytes]:
        if self._at_end:
            return succeed(b"")
        self._started = True
        return self._run(self._read).addCallback(self._got)

    def _got(self, data: bytes) -> bytes:
        if len(data) < CHUNK:
            self._at_end = True  # _read has closed the file
        return data

    def _read(self) -> bytes:
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(self._fd, CHUNK, self._offset)
        except BaseException:
            self._close()
            raise
        self._offset += len(data)
        if len(data) < CHUNK:
            self._close()
        return data

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> Deferred[None]:
        if not self._started or self._at_end:
            return succeed(None)  # never opened, or already closed at the end
        return self._run(self._close)  # after a read still in flight, if any
