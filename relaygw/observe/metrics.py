"""Prometheus metrics and the /healthz endpoint.

``Metrics`` owns its own ``CollectorRegistry``: nothing here registers with
prometheus_client's global registry or keeps module state, so every test (and
every RelayService) gets a fresh set. The counters are plain dictionaries that
the components bump on the reactor thread, and the page that renders them runs
on the reactor thread too, so no lock is taken per message and the scrape-time
callbacks (queue size, oldest message, circuit states) read reactor-owned state
safely. Rendering is cheap (a few hundred lines); the only blocking work, the
spool write probe behind /healthz, runs in a thread pool.

prometheus_client's own ``twisted.MetricsResource`` is not used: it binds the
global reactor and its shared thread pool and collects in a pool thread, where
iterating the queue's dictionaries would race with the reactor. Its ``Counter``
and ``Histogram`` are not used either: they lock on every increment and export
an extra ``_created`` series per label set, which can only be turned off
process-wide.
"""

from __future__ import annotations

import bisect
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import RestrictedRegistry
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import pages
from twisted.web.http import Request
from twisted.web.iweb import IRequest
from twisted.web.resource import EncodingResourceWrapper, IResource, Resource
from twisted.web.server import NOT_DONE_YET, GzipEncoderFactory, Site

from relaygw.observe.null import NO_METRICS, NullMetrics

if TYPE_CHECKING:
    from relaygw.config import Config

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.metrics")

__all__ = ["NO_METRICS", "NullMetrics", "Metrics", "HealthCheck", "metrics_site",
           "metrics_resource", "smarthost_circuits"]

# Arrival to final outcome: from a local Maildir write to the end of a 5-day queue life.
LATENCY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                   7200.0, 14400.0, 43200.0, 86400.0)
REFUSAL_REASONS = ("max_connections", "max_connections_per_client")
CIRCUIT_STATES = ("closed", "open", "half-open")
FINAL_STATUSES = ("sent", "bounced", "expired")  # deferred is not an outcome
HEALTH_TTL = 1.0  # seconds a spool probe result is reused
HEALTH_TIMEOUT = 5.0  # seconds before a hanging spool probe counts as a failure

_TLS_VERSION = re.compile(r"(?:D?TLS|SSL)v[0-9.]{1,4}")

_T = TypeVar("_T")
_Labels = TypeVar("_Labels", bound=tuple[str, ...])
Health = tuple[bool, str]  # ok, and the reason when not


def _tls_label(version: str | None) -> str:
    """"TLSv1.3" from "TLSv1.3" or "TLSv1.3 TLS_AES_256_GCM_SHA384"; "none" for plaintext."""
    if not version:
        return "none"
    first = version.split(None, 1)[0]
    return first if _TLS_VERSION.fullmatch(first) else "other"


def _status_class(enhanced: str | None) -> str:
    first = (enhanced or "")[:1]
    return first if first in ("2", "4", "5") else "unknown"


class Metrics(NullMetrics):
    """The relay's counters and scrape-time gauges, in a registry of their own.

    Not thread-safe by design: call the methods on the reactor thread and scrape
    through ``metrics_resource`` (which renders on the reactor thread). Each call
    is a dictionary update or two.
    """

    def __init__(self, queue_size: Callable[[], int] = lambda: 0,
                 oldest_age: Callable[[], float] = lambda: 0.0,
                 circuit_states: Callable[[], dict[str, str]] = dict) -> None:
        self.queue_size = queue_size
        self.oldest_age = oldest_age
        self.circuit_states = circuit_states
        self._open: dict[str, int] = {}
        self._connections: dict[tuple[str, str], int] = {}
        self._refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self._accepted = 0
        self._accepted_bytes = 0
        self._rejected: dict[tuple[str, str, str], int] = {}
        self._deliveries: dict[tuple[str, str, str], int] = {}
        # (route, status) -> [per-bucket counts (not cumulative) ..., +Inf count, sum]
        self._latency: dict[tuple[str, str], list[float]] = {}
        self._tls_in: dict[str, int] = {}
        self._tls_out: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- inbound ----------------------------------------------------------------

    def connection_opened(self, listener: str, tls: bool) -> None:
        self._open[listener] = self._open.get(listener, 0) + 1
        key = (listener, "true" if tls else "false")
        self._connections[key] = self._connections.get(key, 0) + 1

    def connection_closed(self, listener: str) -> None:
        self._open[listener] = max(0, self._open.get(listener, 0) - 1)

    def connection_refused(self, reason: str) -> None:
        self._refused[reason] = self._refused.get(reason, 0) + 1

    def message_accepted(self, size: int) -> None:
        self._accepted += 1
        self._accepted_bytes += size

    def message_rejected(self, stage: str, code: int, enhanced: str | None) -> None:
        key = (stage, str(code), enhanced or "none")
        self._rejected[key] = self._rejected.get(key, 0) + 1

    def tls_inbound(self, version: str | None) -> None:
        key = _tls_label(version)
        self._tls_in[key] = self._tls_in.get(key, 0) + 1

    # -- outbound ---------------------------------------------------------------

    def delivery(self, route: str, status: str, enhanced: str | None, seconds: float) -> None:
        key = (route, status, _status_class(enhanced))
        self._deliveries[key] = self._deliveries.get(key, 0) + 1
        if status not in FINAL_STATUSES:
            return
        counts = self._latency.get((route, status))
        if counts is None:
            counts = self._latency[(route, status)] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: upper bound inclusive
        counts[-1] += seconds

    def tls_outbound(self, version: str | None) -> None:
        key = _tls_label(version)
        self._tls_out[key] = self._tls_out.get(key, 0) + 1

    # -- collection -------------------------------------------------------------

    def families(self, scrape: bool = True) -> Iterator[Metric]:
        """Every metric family with current values; ``scrape=False`` leaves the
        callback gauges empty (for the registry's describe)."""
        open_now = GaugeMetricFamily("relaygw_connections_open",
                                     "Inbound SMTP connections open now", labels=["listener"])
        for listener, n in sorted(self._open.items()):
            open_now.add_metric([listener], n)
        yield open_now
        yield _counter("relaygw_connections", "Inbound SMTP connections accepted",
                       ["listener", "tls"], self._connections)
        yield _counter("relaygw_connections_refused",
                       "Inbound connections refused with 421 at once, by limit", ["reason"],
                       {(k,): v for k, v in self._refused.items()})
        yield CounterMetricFamily("relaygw_messages_accepted",
                                  "Messages accepted (250 after DATA)", value=self._accepted)
        yield CounterMetricFamily("relaygw_messages_accepted_bytes",
                                  "Size of accepted messages", value=self._accepted_bytes)
        yield _counter("relaygw_messages_rejected",
                       "MAIL, RCPT and DATA commands refused by policy, by enhanced status code",
                       ["stage", "code", "enhanced_status"], self._rejected)
        yield _counter("relaygw_deliveries",
                       "Delivery attempt outcomes per recipient, by route, result and enhanced "
                       "status class", ["route", "status", "enhanced_class"], self._deliveries)
        latency = HistogramMetricFamily(
            "relaygw_delivery_latency_seconds",
            "Seconds from arrival to a recipient's final outcome (sent, bounced, expired)",
            labels=["route", "status"])
        for (route, status), counts in sorted(self._latency.items()):
            cumulative: float = 0  # an int: counts[:-1] are counts, only counts[-1] is a sum
            buckets = []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts[:-1], strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            latency.add_metric([route, status], buckets, counts[-1])
        yield latency
        yield _counter("relaygw_tls_inbound", "Accepted messages by the TLS version of the "
                       'inbound session ("none": plaintext)', ["version"],
                       {(k,): v for k, v in self._tls_in.items()})
        yield _counter("relaygw_tls_outbound", "SMTP delivery attempts per recipient by the TLS "
                       'version of the outbound session ("none": plaintext)', ["version"],
                       {(k,): v for k, v in self._tls_out.items()})
        yield from self._scraped(scrape)

    def _scraped(self, scrape: bool) -> Iterator[Metric]:
        """The gauges read from callbacks; one whose callback fails has no sample."""
        size = GaugeMetricFamily("relaygw_queue_messages", "Messages in the queue", labels=[])
        age = GaugeMetricFamily("relaygw_queue_oldest_message_age_seconds",
                                "Age of the oldest queued message (0 when empty)", labels=[])
        circuit = GaugeMetricFamily(
            "relaygw_smarthost_circuit_state",
            "Circuit breaker state per smarthost host: 1 for the current state",
            labels=["host", "state"])
        if scrape:
            for family, callback in ((size, self.queue_size), (age, self.oldest_age)):
                current = _call(callback)
                if current is not None:
                    family.add_metric([], current)
            for host, now in sorted((_call(self.circuit_states) or {}).items()):
                for state in CIRCUIT_STATES:
                    circuit.add_metric([host, state], 1 if state == now else 0)
        yield from (size, age, circuit)


def _counter(name: str, documentation: str, labels: list[str],
             values: Mapping[_Labels, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key), n)
    return family


def _call(callback: Callable[[], _T]) -> _T | None:
    """A scrape-time callback's value; one that fails drops its metric, not the scrape."""
    try:
        return callback()
    except Exception:
        log.failure("metrics: {callback!r} failed", callback=callback)
        return None


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics.families()

    def describe(self) -> Iterable[Metric]:
        return list(self.metrics.families(scrape=False))  # no callback runs at registration


class CircuitStates(Protocol):
    """Circuit breaker states by "host:port": the courier's ``HostHealth``."""

    def state(self, host: str) -> str:
        """"closed", "open" or "half-open"."""


def smarthost_circuits(config_source: Callable[[], Config],
                       health: CircuitStates) -> Callable[[], dict[str, str]]:
    """A ``circuit_states`` callback: every configured smarthost host and its circuit state.

    ``health`` is RelayCourier.health (a HostHealth). Only configured smarthost hosts
    are exported, so MX hosts of arbitrary domains never become label values.
    """

    def states() -> dict[str, str]:
        out: dict[str, str] = {}
        for smarthost in config_source().smarthosts:
            for hp in smarthost.hosts:
                key = f"{hp.host}:{hp.port}"  # the key HostHealth uses
                out[key] = health.state(key)
        return out

    return states


# -- health ---------------------------------------------------------------------


def spool_problem(spool_dir: str | os.PathLike[str]) -> str | None:
    """None if a file can be created, written and removed in ``<spool>/tmp``, else why not.

    Blocking: run it in a thread pool. A leftover probe file (after a crash) is
    removed at start-up like any other leftover in tmp/.
    """
    path = Path(spool_dir) / "tmp" / f"healthz-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok\n")
        finally:
            os.close(fd)
            os.unlink(path)
    except OSError as e:
        return f"{e.filename or path}: {e.strerror or e}"
    return None


def spool_writable(spool_dir: str | os.PathLike[str]) -> bool:
    """Whether the spool takes new files (blocking; see ``spool_problem``)."""
    return spool_problem(spool_dir) is None


class HealthCheck:
    """The /healthz policy: every listener listening and the spool writable.

    Calling it returns Deferred[(ok, reason)]. ``listeners_down`` runs on the
    reactor thread and names the listeners that are not listening. The spool
    probe runs in ``pool``, at most one at a time; its result is reused for
    ``ttl`` seconds, and a probe that takes longer than ``timeout`` (a hung
    disk) answers unhealthy.
    """

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool,
                 spool_dir: str | os.PathLike[str], listeners_down: Callable[[], list[str]], *,
                 ttl: float = HEALTH_TTL, timeout: float = HEALTH_TIMEOUT,
                 clock: IReactorTime | None = None,
                 probe: Callable[[str | os.PathLike[str]], str | None] = spool_problem) -> None:
        self.reactor = reactor
        self.pool = pool
        self.spool_dir = spool_dir
        self.listeners_down = listeners_down
        self.ttl = ttl
        self.timeout = timeout
        # Without a clock of its own the reactor times the probes: every reactor is both.
        self.clock = clock if clock is not None else cast(IReactorTime, reactor)
        self.probe = probe
        self._result: str | None = None
        self._checked_at: float | None = None
        self._probing = False
        self._started_at = 0.0
        self._waiters: list[Deferred[str | None]] = []

    def __call__(self) -> Deferred[Health]:
        down = self.listeners_down()
        if down:
            return succeed((False, "not listening: " + ", ".join(down)))
        return self._spool().addCallback(lambda problem: (True, "ok") if problem is None
                                         else (False, f"spool not writable: {problem}"))

    def _spool(self) -> Deferred[str | None]:
        """The spool's problem, None when writable."""
        now = self.clock.seconds()
        if self._checked_at is not None and now - self._checked_at < self.ttl:
            return succeed(self._result)
        elapsed = now - self._started_at if self._probing else 0.0
        if elapsed >= self.timeout:
            return succeed(f"check still running after {elapsed:.0f}s")
        waiter: Deferred[str | None] = Deferred()
        waiter.addTimeout(self.timeout - elapsed, self.clock,
                          onTimeoutCancel=lambda _, t: f"check timed out after {t:.0f}s")
        self._waiters.append(waiter)
        if not self._probing:
            self._probing, self._started_at = True, now
            d = deferToThreadPool(self.reactor, self.pool, self.probe, self.spool_dir)
            d.addErrback(lambda f: f"probe failed: {f.getErrorMessage()}")
            d.addCallback(self._probed)
        return waiter

    def _probed(self, problem: str | None) -> None:
        self._probing = False
        self._result, self._checked_at = problem, self.clock.seconds()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # not timed out
                waiter.callback(problem)


# -- HTTP -----------------------------------------------------------------------


class _MetricsPage(Resource):
    isLeaf = True  # noqa: N815 - Twisted's name

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        registry: CollectorRegistry | RestrictedRegistry = self.registry
        names = request.args.get(b"name[]")
        if names:
            registry = self.registry.restricted_registry([n.decode("utf-8", "replace")
                                                          for n in names])
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encoder(registry)


class _HealthPage(Resource):
    isLeaf = True  # noqa: N815 - Twisted's name

    def __init__(self, health: Callable[[], Health | Deferred[Health]]) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request: Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(result: Health) -> None:
            ok, reason = result
            respond(200 if ok else 503, "ok" if ok else reason)

        def failed(failure: Failure) -> None:
            log.failure("healthz: the health check failed", failure)
            respond(503, f"health check failed: {failure.getErrorMessage()}")

        def respond(code: int, text: str) -> None:
            if gone:
                return
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.write(text.encode("utf-8") + b"\n")
            request.finish()

        maybeDeferred(self.health).addCallbacks(answer, failed)
        return NOT_DONE_YET


class _Root(Resource):
    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return self if path == b"" else pages.notFound()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"relaygw: /metrics /healthz\n"


def metrics_resource(metrics: Metrics,
                     health: Callable[[], Health | Deferred[Health]]) -> Resource:
    """/metrics (Prometheus text or OpenMetrics, gzip if asked) and /healthz.

    ``health`` answers (ok, reason) now or as a Deferred (a ``HealthCheck``); it is
    called on the reactor thread, so it must not block.
    """
    root = _Root()
    root.putChild(b"metrics", EncodingResourceWrapper(_MetricsPage(metrics.registry),
                                                      [GzipEncoderFactory()]))
    root.putChild(b"healthz", _HealthPage(health))
    return root


class _QuietSite(Site):
    noisy = False

    def log(self, request: Request) -> None:
        """No access log: a scrape every few seconds is noise in the mail log."""


def metrics_site(resource: Resource, reactor: IReactorTime) -> Site:
    """The HTTP site serving ``resource``, without an access log; ``reactor`` times
    its idle connections."""
    return _QuietSite(resource, timeout=60, reactor=reactor)
