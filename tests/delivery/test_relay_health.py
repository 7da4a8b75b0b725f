"""The smarthost/MX circuit breaker."""

from __future__ import annotations

from twisted.internet.task import Clock

from relaygw.delivery import relay
from relaygw.delivery.relay import HostHealth


def test_host_is_skipped_after_repeated_failures_then_tried_once():
    clock = Clock()
    health = HostHealth(clock, failures_to_open=3, open_for=60)
    for _ in range(2):
        health.failed("mx1:25")
    assert health.state("mx1:25") == "closed" and health.available("mx1:25")
    health.failed("mx1:25")
    assert health.state("mx1:25") == "open" and not health.available("mx1:25")
    clock.advance(60)
    assert health.state("mx1:25") == "half-open" and health.available("mx1:25")
    health.succeeded("mx1:25")
    assert health.state("mx1:25") == "closed" and health.states() == {}


def test_tracked_hosts_stay_bounded(monkeypatch):
    monkeypatch.setattr(relay, "MAX_TRACKED_HOSTS", 3)
    health = HostHealth(Clock(), failures_to_open=2, open_for=60)
    health.failed("a")
    health.failed("a")  # open: kept while it is skipped
    for host in ("b", "c", "d"):
        health.failed(host)
    assert sorted(health.states()) == ["a", "c", "d"]  # b, least recently failed, forgotten
    assert health.state("a") == "open"
