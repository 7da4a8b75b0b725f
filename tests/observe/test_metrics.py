"""Tests for relaygw.observe.metrics: registry contents, the health policy, and the HTTP endpoint
scraped for real over loopback."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import prometheus_client
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet import error as neterror
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers

from relaygw.config import HostPort
from relaygw.daemon.listeners import ListenError, MetricsService
from relaygw.delivery.relay import HostHealth
from relaygw.observe.metrics import (
    LATENCY_BUCKETS,
    NO_METRICS,
    HealthCheck,
    Metrics,
    NullMetrics,
    metrics_resource,
    metrics_site,
    smarthost_circuits,
    spool_problem,
    spool_writable,
)

TIMEOUT = 10  # seconds; a wedged request fails the test instead of hanging it

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def exposition(metrics: Metrics) -> str:
    return prometheus_client.generate_latest(metrics.registry).decode()


def busy_metrics() -> Metrics:
    health = {"smtp1.example.net:587": "open", "smtp2.example.net:587": "closed"}
    metrics = Metrics(queue_size=lambda: 7, oldest_age=lambda: 3600.5,
                      circuit_states=lambda: health)
    metrics.connection_opened("0.0.0.0:25", tls=False)
    metrics.connection_opened("0.0.0.0:25", tls=False)
    metrics.connection_opened("[::]:465", tls=True)
    metrics.connection_closed("0.0.0.0:25")
    metrics.connection_refused("max_connections_per_client")
    metrics.message_accepted(1000)
    metrics.message_accepted(2500)
    metrics.message_rejected("rcpt", 550, "5.7.1")
    metrics.message_rejected("rcpt", 550, "5.7.1")
    metrics.message_rejected("data", 554, "5.4.6")
    metrics.tls_inbound("TLSv1.3 TLS_AES_256_GCM_SHA384")
    metrics.tls_inbound(None)
    metrics.delivery("routes[0]", "sent", "2.0.0", 0.1)  # on a bucket bound: counts in it
    metrics.delivery("routes[0]", "sent", "2.0.0", 42.0)
    metrics.delivery("routes[1]", "deferred", "4.4.1", 30.0)  # not an outcome: no latency
    metrics.delivery("routes[1]", "bounced", "5.1.1", 90000.0)  # beyond a day: +Inf only
    metrics.delivery("routes[1]", "expired", "4.4.7", 432000.0)
    metrics.tls_outbound("TLSv1.2")
    metrics.tls_outbound("TLSv1.2")
    metrics.tls_outbound(None)
    return metrics


# -- the registry ----------------------------------------------------------------------------

def test_counters_and_gauges_after_a_sequence_of_calls() -> None:
    found = samples(exposition(busy_metrics()))
    assert value(found, "relaygw_connections_open", listener="0.0.0.0:25") == 1
    assert value(found, "relaygw_connections_open", listener="[::]:465") == 1
    assert value(found, "relaygw_connections_total", listener="0.0.0.0:25", tls="false") == 2
    assert value(found, "relaygw_connections_total", listener="[::]:465", tls="true") == 1
    assert value(found, "relaygw_connections_refused_total", reason="max_connections") == 0
    assert value(found, "relaygw_connections_refused_total",
                 reason="max_connections_per_client") == 1
    assert value(found, "relaygw_messages_accepted_total") == 2
    assert value(found, "relaygw_messages_accepted_bytes_total") == 3500
    assert value(found, "relaygw_messages_rejected_total",
                 stage="rcpt", code="550", enhanced_status="5.7.1") == 2
    assert value(found, "relaygw_messages_rejected_total",
                 stage="data", code="554", enhanced_status="5.4.6") == 1
    assert value(found, "relaygw_tls_inbound_total", version="TLSv1.3") == 1
    assert value(found, "relaygw_tls_inbound_total", version="none") == 1
    assert value(found, "relaygw_tls_outbound_total", version="TLSv1.2") == 2
    assert value(found, "relaygw_tls_outbound_total", version="none") == 1
    deliveries = {labels: v for (name, labels), v in found.items()
                  if name == "relaygw_deliveries_total"}
    assert deliveries == {
        frozenset({("route", "routes[0]"), ("status", "sent"), ("enhanced_class", "2")}): 2,
        frozenset({("route", "routes[1]"), ("status", "deferred"), ("enhanced_class", "4")}): 1,
        frozenset({("route", "routes[1]"), ("status", "bounced"), ("enhanced_class", "5")}): 1,
        frozenset({("route", "routes[1]"), ("status", "expired"), ("enhanced_class", "4")}): 1,
    }
    assert value(found, "relaygw_queue_messages") == 7
    assert value(found, "relaygw_queue_oldest_message_age_seconds") == 3600.5
    circuit = {labels: v for (name, labels), v in found.items()
               if name == "relaygw_smarthost_circuit_state"}
    assert circuit == {
        frozenset({("host", "smtp1.example.net:587"), ("state", "closed")}): 0,
        frozenset({("host", "smtp1.example.net:587"), ("state", "open")}): 1,
        frozenset({("host", "smtp1.example.net:587"), ("state", "half-open")}): 0,
        frozenset({("host", "smtp2.example.net:587"), ("state", "closed")}): 1,
        frozenset({("host", "smtp2.example.net:587"), ("state", "open")}): 0,
        frozenset({("host", "smtp2.example.net:587"), ("state", "half-open")}): 0,
    }


def test_latency_histogram() -> None:
    found = samples(exposition(busy_metrics()))

    def bucket(route: str, status: str, le: str) -> float:
        return value(found, "relaygw_delivery_latency_seconds_bucket",
                     route=route, status=status, le=le)

    assert [bucket("routes[0]", "sent", le) for le in ("0.1", "30.0", "60.0", "86400.0", "+Inf")
            ] == [1, 1, 2, 2, 2]
    assert value(found, "relaygw_delivery_latency_seconds_sum",
                 route="routes[0]", status="sent") == pytest.approx(42.1)
    assert value(found, "relaygw_delivery_latency_seconds_count",
                 route="routes[0]", status="sent") == 2
    assert (bucket("routes[1]", "bounced", "86400.0"), bucket("routes[1]", "bounced", "+Inf")
            ) == (0, 1)
    assert not any(name.startswith("relaygw_delivery_latency") and ("status", "deferred") in lbl
                   for name, lbl in found)
    les = [dict(lbl)["le"] for name, lbl in found
           if name == "relaygw_delivery_latency_seconds_bucket"
           and dict(lbl)["route"] == "routes[0]"]
    assert les == [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    assert LATENCY_BUCKETS[0] == 0.1 and LATENCY_BUCKETS[-1] == 86400.0


def test_names_types_and_no_created_series() -> None:
    text = exposition(busy_metrics())
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == {
        "relaygw_connections_open": "gauge",
        "relaygw_connections": "counter",
        "relaygw_connections_refused": "counter",
        "relaygw_messages_accepted": "counter",
        "relaygw_messages_accepted_bytes": "counter",
        "relaygw_messages_rejected": "counter",
        "relaygw_deliveries": "counter",
        "relaygw_delivery_latency_seconds": "histogram",
        "relaygw_tls_inbound": "counter",
        "relaygw_tls_outbound": "counter",
        "relaygw_queue_messages": "gauge",
        "relaygw_queue_oldest_message_age_seconds": "gauge",
        "relaygw_smarthost_circuit_state": "gauge",
    }
    assert "_created" not in text


def test_fresh_metrics_start_at_zero() -> None:
    found = samples(exposition(Metrics()))
    assert found == {
        ("relaygw_connections_refused_total", frozenset({("reason", "max_connections")})): 0,
        ("relaygw_connections_refused_total",
         frozenset({("reason", "max_connections_per_client")})): 0,
        ("relaygw_messages_accepted_total", frozenset()): 0,
        ("relaygw_messages_accepted_bytes_total", frozenset()): 0,
        ("relaygw_queue_messages", frozenset()): 0,
        ("relaygw_queue_oldest_message_age_seconds", frozenset()): 0,
    }


def test_label_values_are_bounded() -> None:
    metrics = Metrics()
    metrics.tls_inbound("TLSv1.3")
    metrics.tls_inbound("weird version string {}")
    metrics.tls_inbound("SSLv3")
    metrics.tls_outbound("")
    metrics.delivery("none", "deferred", "", 1.0)
    metrics.delivery("none", "deferred", "X.1.1", 1.0)
    metrics.message_rejected("mail", 530, None)
    metrics.connection_closed("127.0.0.1:25")  # never below zero
    found = samples(exposition(metrics))
    assert value(found, "relaygw_tls_inbound_total", version="other") == 1
    assert value(found, "relaygw_tls_inbound_total", version="SSLv3") == 1
    assert value(found, "relaygw_tls_outbound_total", version="none") == 1
    assert value(found, "relaygw_deliveries_total",
                 route="none", status="deferred", enhanced_class="unknown") == 2
    assert value(found, "relaygw_messages_rejected_total",
                 stage="mail", code="530", enhanced_status="none") == 1
    assert value(found, "relaygw_connections_open", listener="127.0.0.1:25") == 0


def test_a_failing_callback_drops_its_metric_not_the_scrape() -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        metrics = Metrics(queue_size=lambda: 1 // 0)
        found = samples(exposition(metrics))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert ("relaygw_queue_messages", frozenset()) not in found
    assert ("relaygw_queue_oldest_message_age_seconds", frozenset()) in found
    assert any(e.get("log_failure") is not None
               and e["log_failure"].check(ZeroDivisionError) for e in events)


def test_each_metrics_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.message_accepted(10)
    assert value(samples(exposition(first)), "relaygw_messages_accepted_total") == 1
    assert value(samples(exposition(second)), "relaygw_messages_accepted_total") == 0
    assert first.registry is not second.registry
    assert first.registry is not prometheus_client.REGISTRY
    assert "relaygw_" not in prometheus_client.generate_latest().decode()


def test_null_metrics_accepts_every_call() -> None:
    public = {name for name in vars(Metrics) if not name.startswith("_")}
    assert public - {"families"} == {name for name in vars(NullMetrics)
                                     if not name.startswith("_")}
    NO_METRICS.connection_opened("x", True)
    NO_METRICS.delivery("routes[0]", "sent", "2.0.0", 1.0)


def test_smarthost_circuits_exports_configured_hosts_only() -> None:
    clock = Clock()
    health = HostHealth(clock, failures_to_open=1, open_for=60)
    config = SimpleNamespace(smarthosts=(
        SimpleNamespace(hosts=(HostPort("smtp1.example.net", 587),
                               HostPort("2001:db8::25", 25))),))
    health.failed("smtp1.example.net:587")
    health.failed("mx.elsewhere.example:25")  # an MX host: never a label value
    states = smarthost_circuits(lambda: config, health)
    assert states() == {"smtp1.example.net:587": "open", "2001:db8::25:25": "closed"}
    clock.advance(60)
    assert states()["smtp1.example.net:587"] == "half-open"


# -- the spool probe and the health policy ---------------------------------------------------

def test_spool_writable(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    assert spool_writable(tmp_path) is True
    assert list((tmp_path / "tmp").iterdir()) == []  # the probe cleans up
    assert spool_writable(tmp_path / "missing") is False
    problem = spool_problem(tmp_path / "missing")
    assert problem is not None and "No such file or directory" in problem
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "tmp").write_text("a file where the directory should be")
    assert "Not a directory" in spool_problem(blocked)


class _SyncPool:
    """Runs "thread" work at once, or keeps it for the test to finish later."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.held: list[Any] = []
        self.calls = 0

    def callInThreadWithCallback(self, on_result: Any, fn: Any, *args: Any) -> None:  # noqa: N802
        self.calls += 1

        def run() -> None:
            try:
                result = fn(*args)
            except Exception:
                on_result(False, Failure())
            else:
                on_result(True, result)

        if self.hold:
            self.held.append(run)
        else:
            run()


class _SyncReactor(Clock):
    def callFromThread(self, fn: Any, *args: Any) -> None:  # noqa: N802
        fn(*args)


def result_of(d: defer.Deferred) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_health_check_caches_the_spool_probe_for_a_second() -> None:
    reactor, pool = _SyncReactor(), _SyncPool()
    answers = [None, "/spool/tmp/x: Read-only file system"]
    probed: list[Any] = []

    def probe(spool_dir: Any) -> str | None:
        probed.append(spool_dir)
        return answers[len(probed) - 1]

    check = HealthCheck(reactor, pool, "/spool", lambda: [], probe=probe)
    assert result_of(check()) == (True, "ok")
    reactor.advance(0.9)
    assert result_of(check()) == (True, "ok")
    assert probed == ["/spool"]
    reactor.advance(0.1)
    assert result_of(check()) == (
        False, "spool not writable: /spool/tmp/x: Read-only file system")
    assert pool.calls == 2


def test_health_check_listeners_first() -> None:
    pool = _SyncPool()
    check = HealthCheck(_SyncReactor(), pool, "/spool", lambda: ["0.0.0.0:25", "[::]:465"],
                        probe=lambda _: None)
    assert result_of(check()) == (False, "not listening: 0.0.0.0:25, [::]:465")
    assert pool.calls == 0


def test_health_check_probe_that_raises() -> None:
    def probe(_: Any) -> None:
        raise RuntimeError("boom")

    check = HealthCheck(_SyncReactor(), _SyncPool(), "/spool", lambda: [], probe=probe)
    assert result_of(check()) == (False, "spool not writable: probe failed: boom")


def test_health_check_hung_spool() -> None:
    reactor, pool = _SyncReactor(), _SyncPool(hold=True)
    check = HealthCheck(reactor, pool, "/spool", lambda: [], probe=lambda _: None, timeout=5)
    first, second = check(), check()
    assert pool.calls == 1  # one probe at a time, shared
    reactor.advance(5)
    assert result_of(first) == result_of(second) == (
        False, "spool not writable: check timed out after 5s")
    assert result_of(check()) == (False, "spool not writable: check still running after 5s")
    assert pool.calls == 1
    pool.held.pop()()  # the disk answers at last
    assert result_of(check()) == (True, "ok")
    assert pool.calls == 1


@pytest.fixture
def reactor():
    # The global reactor, which pytest-twisted installed before any test ran.
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-metrics")
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


@pytest_twisted.inlineCallbacks
def test_health_check_probes_off_the_reactor_thread(reactor, threadpool, tmp_path: Path):
    (tmp_path / "tmp").mkdir()
    threads: list[bool] = []

    def probe(spool_dir: Any) -> str | None:
        threads.append(threading.current_thread() is threading.main_thread())
        return spool_problem(spool_dir)

    check = HealthCheck(reactor, threadpool, tmp_path, lambda: [], probe=probe)
    assert (yield check()) == (True, "ok")
    assert threads == [False]


# -- HTTP over loopback ----------------------------------------------------------------------

class Fetched:
    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code, self.headers, self.body = code, headers, body

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class _Body(Protocol):
    """Collects a response body (readBody warns about Agent's own transport proxy)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


@defer.inlineCallbacks
def fetch(reactor: Any, port: int, path: str, headers: dict[str, str] | None = None):
    agent = Agent(reactor)
    d = agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode(),
                      Headers({k: [v] for k, v in (headers or {}).items()}))
    d.addTimeout(TIMEOUT, reactor)
    response = yield d
    reader = _Body()
    response.deliverBody(reader)
    body = yield reader.done
    return Fetched(response.code, response.headers, body)


def serving(reactor: Any, metrics: Metrics, health: Any) -> MetricsService:
    svc = MetricsService(reactor, "127.0.0.1", 0,
                         metrics_site(metrics_resource(metrics, health), reactor))
    svc.startService()
    assert svc.port and svc.port > 0
    return svc


@pytest_twisted.inlineCallbacks
def test_scrape_metrics_over_http(reactor) -> None:
    threads: list[bool] = []

    def queue_size() -> int:
        threads.append(threading.current_thread() is threading.main_thread())
        return 3

    metrics = Metrics(queue_size=queue_size)
    metrics.message_accepted(512)
    svc = serving(reactor, metrics, lambda: (True, "ok"))
    try:
        page = yield fetch(reactor, svc.port, "/metrics")
        assert page.code == 200
        assert page.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
        found = samples(page.body.decode())
        assert value(found, "relaygw_messages_accepted_total") == 1
        assert value(found, "relaygw_messages_accepted_bytes_total") == 512
        assert value(found, "relaygw_queue_messages") == 3
        assert threads == [True]  # scrape callbacks run on the reactor thread

        zipped = yield fetch(reactor, svc.port, "/metrics", {"Accept-Encoding": "gzip"})
        assert zipped.header("content-encoding") == "gzip"
        assert samples(gzip.decompress(zipped.body).decode()) == found

        om = yield fetch(reactor, svc.port, "/metrics",
                         {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.header("content-type").startswith("application/openmetrics-text")
        assert om.body.endswith(b"# EOF\n")

        only = yield fetch(reactor, svc.port, "/metrics?name[]=relaygw_queue_messages")
        assert set(name for name, _ in samples(only.body.decode())) == {"relaygw_queue_messages"}

        index = yield fetch(reactor, svc.port, "/")
        assert (index.code, index.body) == (200, b"relaygw: /metrics /healthz\n")
        missing = yield fetch(reactor, svc.port, "/nope")
        assert missing.code == 404
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_healthz_200_and_503(reactor) -> None:
    state = {"ok": True}

    def health() -> tuple[bool, str]:
        return (True, "ok") if state["ok"] else (False, "not listening: 0.0.0.0:25")

    svc = serving(reactor, Metrics(), health)
    try:
        up = yield fetch(reactor, svc.port, "/healthz")
        assert (up.code, up.body) == (200, b"ok\n")
        assert up.header("content-type") == "text/plain; charset=utf-8"
        assert up.header("cache-control") == "no-store"
        state["ok"] = False
        down = yield fetch(reactor, svc.port, "/healthz")
        assert (down.code, down.body) == (503, b"not listening: 0.0.0.0:25\n")
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_healthz_with_the_real_check(reactor, threadpool, tmp_path: Path) -> None:
    down: list[str] = []
    check = HealthCheck(reactor, threadpool, tmp_path, lambda: down, ttl=0)
    svc = serving(reactor, Metrics(), check)
    try:
        page = yield fetch(reactor, svc.port, "/healthz")
        assert page.code == 503  # no tmp/ yet
        assert page.body.startswith(b"spool not writable: " + str(tmp_path / "tmp").encode())
        (tmp_path / "tmp").mkdir()
        page = yield fetch(reactor, svc.port, "/healthz")
        assert (page.code, page.body) == (200, b"ok\n")
        down.append("127.0.0.1:2525")
        page = yield fetch(reactor, svc.port, "/healthz")
        assert (page.code, page.body) == (503, b"not listening: 127.0.0.1:2525\n")
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_healthz_when_the_check_itself_fails(reactor) -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)

    def health() -> tuple[bool, str]:
        raise RuntimeError("no idea")

    svc = serving(reactor, Metrics(), health)
    try:
        page = yield fetch(reactor, svc.port, "/healthz")
        assert (page.code, page.body) == (503, b"health check failed: no idea\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield svc.stopService()
    assert any(e.get("log_failure") is not None for e in events)


@pytest_twisted.inlineCallbacks
def test_no_access_log_and_the_port_closes(reactor) -> None:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    svc = serving(reactor, Metrics(), lambda: (True, "ok"))
    port = svc.port
    try:
        yield fetch(reactor, port, "/metrics")
        yield fetch(reactor, port, "/healthz")
    finally:
        globalLogPublisher.removeObserver(events.append)
        yield svc.stopService()
    assert svc.port is None
    texts = [str(e.get("log_format", "")) + str(e.get("log_text", "")) for e in events]
    assert not any("GET /" in text for text in texts)
    with pytest.raises(neterror.ConnectionRefusedError):
        yield fetch(reactor, port, "/metrics")


@pytest_twisted.inlineCallbacks
def test_address_in_use(reactor) -> None:
    first = serving(reactor, Metrics(), lambda: (True, "ok"))
    second = MetricsService(reactor, "127.0.0.1", first.port,
                            metrics_site(metrics_resource(Metrics(), lambda: (True, "ok")),
                                         reactor))
    try:
        with pytest.raises(ListenError,
                           match=rf"^cannot listen on metrics.address 127.0.0.1:{first.port}: "):
            second.bind()
        assert second.port is None
    finally:
        yield first.stopService()
