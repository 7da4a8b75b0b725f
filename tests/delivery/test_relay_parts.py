"""RelayCourier's parts: the content reader and the connection pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from relaygw.delivery.relay import CHUNK, IDLE_REUSE, ConnectionPool, _ContentReader

HEADER = b"SPOOL-HEADER\n"


class Disk:
    """A ``run`` for the reader: runs at once and counts the trips to the "thread"."""

    def __init__(self) -> None:
        self.trips = 0

    def __call__(self, fn: Any, *args: Any) -> Deferred:
        self.trips += 1
        return maybeDeferred(fn, *args)


def reader_for(tmp_path: Path, content: bytes, disk: Disk) -> _ContentReader:
    path = tmp_path / "message"
    path.write_bytes(HEADER + content)
    return _ContentReader(disk, path, len(HEADER), len(content))


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
    reader = _ContentReader(disk, tmp_path / "gone", 0, 10)
    failures: list[Any] = []
    reader.read().addErrback(failures.append)
    assert failures and failures[0].check(FileNotFoundError)
    reader.close()


class FakeProto:
    def __init__(self) -> None:
        self.usable = True
        self.quits = 0

    def quit(self) -> None:
        self.quits += 1
        self.usable = False


def test_pool_reuses_one_idle_timer_per_connection() -> None:
    clock = Clock()
    pool = ConnectionPool(clock)
    proto: Any = FakeProto()
    pool.give("k", proto)
    assert len(clock.getDelayedCalls()) == 1
    for _ in range(3):
        clock.advance(IDLE_REUSE - 1)
        assert pool.take("k") is proto
        pool.give("k", proto)
        assert len(clock.getDelayedCalls()) == 1
    clock.advance(IDLE_REUSE - 0.5)
    assert proto.quits == 0
    clock.advance(0.5)
    assert proto.quits == 1 and pool.take("k") is None
    assert clock.getDelayedCalls() == []


def test_pool_timer_leaves_a_busy_connection_alone() -> None:
    clock = Clock()
    pool = ConnectionPool(clock)
    proto: Any = FakeProto()
    pool.give("k", proto)
    assert pool.take("k") is proto
    clock.advance(IDLE_REUSE + 1)  # busy all that time
    assert proto.quits == 0
    pool.give("k", proto)
    clock.advance(IDLE_REUSE)
    assert proto.quits == 1


def test_pool_drops_unusable_connections_and_closes_all() -> None:
    clock = Clock()
    pool = ConnectionPool(clock)
    dead: Any = FakeProto()
    alive: Any = FakeProto()
    pool.give("k", dead)
    pool.give("k", alive)
    dead.usable = False
    assert pool.take("k") is alive
    assert pool.take("k") is None
    pool.give("k", alive)
    pool.close_all()
    assert alive.quits == 1 and clock.getDelayedCalls() == []


def test_a_file_longer_than_the_spool_says_is_read_in_the_disk_thread(tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(HEADER + b"hello\r\nmore\r\n")
    disk = Disk()
    reader = _ContentReader(disk, path, len(HEADER), 7)
    assert read_all(reader) == [b"hello\r\nmore\r\n", b""]
    assert disk.trips == 1
