"""RelayCourier's parts: the connection pool (the content reader is the spool's:
tests/queue/test_content.py)."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from relaygw.delivery.relay import IDLE_REUSE, ConnectionPool


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
