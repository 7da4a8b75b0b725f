"""SpoolContent: a queued message's bytes, read asynchronously (the reader, headers) or in
the caller's thread (read_headers, read_all, chunks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred

from relaygw.delivery.courier import MessageContent
from relaygw.queue import content as content_module
from relaygw.queue.content import CHUNK, SpoolContent, _ContentReader

HEADER = b"SPOOL-HEADER\n"
HEADERS = (b"From: Alice <alice@sender.example>\r\n"
           b"To: bob@corp.example\r\n"
           b"Subject: test\r\n")


class Disk:
    """A ``run`` for the reader: runs at once and counts the trips to the "thread"."""

    def __init__(self) -> None:
        self.trips = 0

    def __call__(self, fn: Any, *args: Any) -> Deferred:
        self.trips += 1
        return maybeDeferred(fn, *args)


def no_thread(fn: Any, *args: Any) -> Deferred:
    raise AssertionError("the blocking methods must not go to the thread pool")


def spooled(tmp_path: Path, content: bytes, run: Any = no_thread,
            prefix: bytes = HEADER) -> SpoolContent:
    path = tmp_path / "message"
    path.write_bytes(prefix + content)
    return SpoolContent(str(path), len(prefix), len(content), run)


def result_of(d: Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def test_spool_content_is_a_message_content(tmp_path: Path) -> None:
    content: MessageContent = spooled(tmp_path, b"x\r\n")
    assert content.size == 3


# -- the reader (moved from the relay courier) ----------------------------------------------


def reader_for(tmp_path: Path, content: bytes, disk: Disk) -> _ContentReader:
    return spooled(tmp_path, content, disk).reader()


def read_all(reader: _ContentReader) -> list[bytes]:
    chunks: list[bytes] = []
    while True:
        got: list[bytes] = []
        reader.read().addCallback(got.append)
        chunks.append(got[0])
        if not got[0]:
            return chunks


def test_a_small_message_costs_one_trip_to_the_disk_thread(tmp_path: Path) -> None:
    disk = Disk()
    reader = reader_for(tmp_path, b"hello\r\n", disk)
    assert read_all(reader) == [b"hello\r\n", b""]
    reader.close()
    assert disk.trips == 1  # read, end of file and close in one


def test_empty_message(tmp_path: Path) -> None:
    disk = Disk()
    reader = reader_for(tmp_path, b"", disk)
    assert read_all(reader) == [b""]
    reader.close()


def test_big_message_is_read_in_chunks_in_the_disk_thread(tmp_path: Path) -> None:
    content = bytes(range(256)) * (CHUNK // 256) * 2 + b"tail"
    disk = Disk()
    reader = reader_for(tmp_path, content, disk)
    chunks = read_all(reader)
    assert b"".join(chunks) == content
    assert [len(c) for c in chunks] == [CHUNK, CHUNK, 4, 0]
    reader.close()
    assert disk.trips == 3
    assert reader._fd is None


def test_exactly_one_chunk_needs_a_read_that_finds_the_end(tmp_path: Path) -> None:
    content = b"x" * CHUNK
    disk = Disk()
    reader = reader_for(tmp_path, content, disk)
    assert read_all(reader) == [content, b""]
    assert disk.trips == 2 and reader._fd is None


def test_close_after_a_partial_read_closes_in_the_disk_thread(tmp_path: Path) -> None:
    content = b"y" * (CHUNK + 10)
    disk = Disk()
    reader = reader_for(tmp_path, content, disk)
    reader.read()
    assert reader._fd is not None
    reader.close()
    assert reader._fd is None and disk.trips == 2


def test_missing_file_fails_the_read(tmp_path: Path) -> None:
    disk = Disk()
    reader = SpoolContent(str(tmp_path / "gone"), 0, 10, disk).reader()
    failures: list[Any] = []
    reader.read().addErrback(failures.append)
    assert failures and failures[0].check(FileNotFoundError)
    reader.close()


def test_a_file_longer_than_the_spool_says_is_read_in_the_disk_thread(tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(HEADER + b"hello\r\nmore\r\n")
    disk = Disk()
    reader = SpoolContent(str(path), len(HEADER), 7, disk).reader()
    assert read_all(reader) == [b"hello\r\nmore\r\n", b""]
    assert disk.trips == 1


def test_each_reader_starts_at_the_message(tmp_path: Path) -> None:
    disk = Disk()
    content = spooled(tmp_path, b"hello\r\n", disk)
    assert read_all(content.reader()) == [b"hello\r\n", b""]
    assert read_all(content.reader()) == [b"hello\r\n", b""]


# -- the header section (what bounce.extract_headers did) ---------------------------------


def test_headers_stop_at_the_blank_line(tmp_path: Path) -> None:
    content = spooled(tmp_path, HEADERS + b"\r\nBody: not a header\r\nmore\r\n")
    assert content.read_headers() == HEADERS


def test_headers_without_body(tmp_path: Path) -> None:
    assert spooled(tmp_path, HEADERS).read_headers() == HEADERS


def test_headers_final_line_without_line_end(tmp_path: Path) -> None:
    assert spooled(tmp_path, b"A: 1\r\nB: 2").read_headers() == b"A: 1\r\nB: 2"


def test_headers_of_a_message_without_headers(tmp_path: Path) -> None:
    assert spooled(tmp_path, b"\r\njust a body\r\n").read_headers() == b""


def test_headers_accept_lf_files(tmp_path: Path) -> None:
    assert spooled(tmp_path, b"A: 1\nB: 2\n\nbody\n").read_headers() == b"A: 1\nB: 2\n"


def test_headers_limit_cuts_at_the_last_complete_line(tmp_path: Path) -> None:
    content = b"".join(b"X-Header-%03d: value\r\n" % i for i in range(100)) + b"\r\nbody\r\n"
    stored = spooled(tmp_path, content)
    line = len(b"X-Header-000: value\r\n")
    assert stored.read_headers(limit=10 * line + 5) == content[:10 * line]
    assert stored.read_headers(limit=10 * line) == content[:10 * line]
    assert stored.read_headers(limit=line - 1) == b""
    assert stored.read_headers(limit=0) == b""


def test_headers_limit_with_the_blank_line_just_beyond_it(tmp_path: Path) -> None:
    stored = spooled(tmp_path, HEADERS + b"\r\nbody\r\n")
    assert stored.read_headers(limit=len(HEADERS)) == HEADERS


def test_headers_default_limit_is_64_kib(tmp_path: Path) -> None:
    content = b"".join(b"X-H: %s\r\n" % (b"v" * 90) for _ in range(2000)) + b"\r\nbody\r\n"
    headers = spooled(tmp_path, content).read_headers()
    assert len(headers) <= 65536
    assert headers.endswith(b"\r\n") and content.startswith(headers)
    assert len(headers) > 65536 - 100


def test_negative_header_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        spooled(tmp_path, HEADERS).read_headers(limit=-1)


def test_headers_of_a_missing_file_raise(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        SpoolContent(str(tmp_path / "gone"), 0, 0, no_thread).read_headers()


def test_headers_are_read_in_one_trip_to_the_disk_thread(tmp_path: Path) -> None:
    disk = Disk()
    content = spooled(tmp_path, HEADERS + b"\r\nbody\r\n", disk)
    assert result_of(content.headers()) == HEADERS
    assert disk.trips == 1


def test_headers_of_a_missing_file_fail_the_deferred(tmp_path: Path) -> None:
    failure = result_of(SpoolContent(str(tmp_path / "gone"), 0, 0, Disk()).headers())
    assert failure.check(FileNotFoundError)


# -- the blocking reads ---------------------------------------------------------------------


MESSAGE = HEADERS + b"\r\n" + b"".join(b"line %04d\r\n" % i for i in range(300))


def test_read_all_is_the_message(tmp_path: Path) -> None:
    assert spooled(tmp_path, MESSAGE).read_all() == MESSAGE
    assert spooled(tmp_path, b"").read_all() == b""


@pytest.mark.parametrize("size", [1, 2, 3, 7, 4096, len(MESSAGE) - 1, len(MESSAGE),
                                  1024 * 1024])
def test_chunks_are_the_message_in_reads_of_at_most_size(tmp_path: Path, size: int) -> None:
    chunks = list(spooled(tmp_path, MESSAGE).chunks(size))
    assert b"".join(chunks) == MESSAGE
    assert all(0 < len(c) <= size for c in chunks)
    assert len(chunks) == -(-len(MESSAGE) // size)  # a regular file fills every read


def test_chunks_start_after_the_spool_header(tmp_path: Path) -> None:
    prefix = b"X" * 5000  # longer than a chunk: the offset is a seek, not a skipped read
    chunks = list(spooled(tmp_path, b"hello\r\n", prefix=prefix).chunks(4096))
    assert chunks == [b"hello\r\n"]


def test_chunks_of_an_empty_message(tmp_path: Path) -> None:
    assert list(spooled(tmp_path, b"").chunks(10)) == []


def test_chunks_open_the_file_lazily_and_close_it_at_the_end(tmp_path: Path,
                                                             monkeypatch: Any) -> None:
    opened: list[int] = []
    closed: list[int] = []
    real_open, real_close = os.open, os.close

    def tracking_open(*args: Any) -> int:
        fd = real_open(*args)
        opened.append(fd)
        return fd

    monkeypatch.setattr(content_module.os, "open", tracking_open)
    monkeypatch.setattr(content_module.os, "close",
                        lambda fd: (closed.append(fd), real_close(fd))[1])
    chunks = spooled(tmp_path, MESSAGE).chunks(100)
    assert opened == []
    next(chunks)
    assert len(opened) == 1 and closed == []
    list(chunks)
    assert closed == opened


def test_chunks_closed_early_close_the_file(tmp_path: Path, monkeypatch: Any) -> None:
    closed: list[int] = []
    real_close = os.close
    monkeypatch.setattr(content_module.os, "close",
                        lambda fd: (closed.append(fd), real_close(fd))[1])
    chunks = spooled(tmp_path, MESSAGE).chunks(100)
    next(chunks)
    chunks.close()
    assert len(closed) == 1


def test_chunks_of_a_missing_file_raise_at_the_first_read(tmp_path: Path) -> None:
    chunks = SpoolContent(str(tmp_path / "gone"), 0, 0, no_thread).chunks(10)
    with pytest.raises(FileNotFoundError):
        next(chunks)
