"""The one place where a validated Config becomes objects.

The main process (``relaygw.daemon.service``), each SMTP worker process
(``relaygw.daemon.workers.process``), a reload and the command-line tools all
build what they need here, so every process serves exactly the same sessions:

- ``prepare``: the file work a configuration needs (users file, TLS keys), blocking;
- ``build_sessions``: per listener, the SMTP session factory and what the socket
  talks to (the factory, inside TLS on an implicit-TLS port);
- ``build_cleanup``: the receive stage and its transforms;
- ``build_core``: the main process's spool, queue, couriers and metrics;
- ``listener_service``, ``handoff_listener``, ``metrics_service``, ``worker_pool``:
  the main process's listening services;
- ``build_worker_front``: what an SMTP worker process serves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from relaygw.config import Config, ListenerConfig
from relaygw.daemon.listeners import ListenerService, MetricsService
from relaygw.daemon.workers.pool import HandoffListener, WorkerPool
from relaygw.delivery.courier import Courier
from relaygw.delivery.dns import Resolver
from relaygw.delivery.local import MaildirCourier
from relaygw.delivery.relay import RelayCourier
from relaygw.queue.manager import QueueManager
from relaygw.queue.store import Spool, StoredMessage
from relaygw.receive.cleanup import Cleanup, ReceiveMetrics
from relaygw.receive.longlines import LongLines
from relaygw.receive.policy import ConfiguredPolicy
from relaygw.receive.transforms import MessageTransform, ReceivedHeader
from relaygw.smtp.auth import Authenticator, UsersFileError, load_users
from relaygw.smtp.framing import MAX_LINE
from relaygw.smtp.server import (
    ConnectionCounter,
    MessageSink,
    ServerSettings,
    SessionMetrics,
    SMTPServerFactory,
)
from relaygw.smtp.tls import TLSSetupError, ensure_self_signed, server_tls_options

SPOOL_THREADS = (2, 16)  # min, max: commits and reads of many sessions at once
AUTH_THREADS = (0, 4)  # scrypt checks
DNS_THREADS = (0, 10)  # dnspython lookups

if TYPE_CHECKING:
    from relaygw.observe.metrics import Metrics

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.front")


UNLIMITED = 1 << 62  # a worker's own connection caps: the main process enforces the real ones


class StartupError(Exception):
    """relaygw cannot start; the message says why, naming the config key."""


class ConfigHolder:
    """The configuration in force; reload replaces ``current``."""

    def __init__(self, config: Config) -> None:
        self.current = config

    def __call__(self) -> Config:
        return self.current


@dataclass(frozen=True)
class Prepared:
    """What a configuration needs read from files before it can serve."""

    users: dict[str, str] | None  # user -> password hash; None without [auth] users_file
    tls: Any  # the server TLS options (CertificateOptions), or None without a TLS listener


def tls_options(config: Config, announce: bool = True) -> Any:
    if not any(listener.tls != "none" for listener in config.listeners):
        return None
    try:
        if config.tls.certificate is not None:
            assert config.tls.private_key is not None  # config requires both or neither
            return server_tls_options(config.tls.certificate, config.tls.private_key)
        cert, key = ensure_self_signed(config.server.spool_dir / "tls", config.server.hostname)
        if announce:
            log.warn("tls: no [tls] certificate configured; using self-signed {cert}",
                     cert=str(cert))
        return server_tls_options(cert, key)
    except TLSSetupError as e:
        raise StartupError(str(e)) from e
    except OSError as e:
        raise StartupError(f"server.spool_dir: cannot create TLS files: {e}") from e


def users(config: Config) -> dict[str, str] | None:
    if config.auth.users_file is None:
        return None
    try:
        return load_users(config.auth.users_file)
    except UsersFileError as e:
        raise StartupError("\n".join(f"auth.users_file: {p}" for p in e.problems)) from e
    except OSError as e:
        raise StartupError(f"auth.users_file: cannot read {config.auth.users_file}: "
                           f"{e.strerror}") from e


def prepare(config: Config, announce: bool = True) -> Prepared:
    """The file work a configuration needs (users, TLS keys): blocking, so at start-up
    or in a thread, never on the reactor thread of a running daemon."""
    return Prepared(users(config), tls_options(config, announce))


def server_settings(config: Config, listener: ListenerConfig, tls: Any) -> ServerSettings:
    return ServerSettings(
        hostname=config.server.hostname,
        max_message_size=config.server.max_message_size,
        max_recipients=config.server.max_recipients,
        max_hops=config.server.max_hops,
        idle_timeout=config.server.idle_timeout,
        max_errors=config.server.max_errors,
        normalize_bare_newlines=config.server.bare_newlines == "normalize",
        max_line_length=(config.server.max_line_length if config.server.long_lines == "accept"
                         else MAX_LINE),
        tls_mode=listener.tls,
        require_tls=listener.require_tls,
        auth_mode=listener.auth,
        tls_options=tls if listener.tls != "none" else None,
    )


def outer_factory(factory: SMTPServerFactory, listener: ListenerConfig,
                  tls: Any) -> IProtocolFactory:
    """What the socket talks to: the session factory, inside TLS on an implicit-TLS port."""
    factory.noisy = False
    if listener.tls != "implicit":
        return factory
    outer = TLSMemoryBIOFactory(tls, False, factory)
    outer.noisy = False
    return outer


def authenticator(prepared: Prepared, auth_pool: ThreadPool, reactor: Any, *,
                  users_file: Path | None = None) -> Authenticator | None:
    """The sessions' Authenticator; with ``users_file`` it re-reads that file when it
    changes (in ``auth_pool``), so each process, every worker too, sees new users."""
    if prepared.users is None:
        return None
    return Authenticator(prepared.users, auth_pool, reactor, source=users_file)


@dataclass
class Sessions:
    """One listener's sessions: the factory and what its socket talks to."""

    factory: SMTPServerFactory
    outer: IProtocolFactory


def build_sessions(config: Config, prepared: Prepared,
                   listeners: Sequence[ListenerConfig] | None = None, *,
                   policy: ConfiguredPolicy,
                   sink: MessageSink, auth: Authenticator | None, reactor: Any,
                   counter: ConnectionCounter, metrics: SessionMetrics,
                   on_session_end: Callable[[object], None] | None = None,
                   ) -> dict[ListenerConfig, Sessions]:
    """Session factories for ``listeners`` (all of the config's by default)."""
    built = {}
    for listener in config.listeners if listeners is None else listeners:
        factory = SMTPServerFactory(
            server_settings(config, listener, prepared.tls), policy, sink, auth, reactor,
            counter=counter, metrics=metrics, listener=listener.address,
            on_session_end=on_session_end)
        built[listener] = Sessions(factory, outer_factory(factory, listener, prepared.tls))
    return built


def transforms(config: Config) -> Sequence[MessageTransform]:
    """The receive stage's transforms, in the order they apply."""
    received = ReceivedHeader(config.server.hostname)
    if config.server.long_lines == "reject":
        return (received,)  # no line over 998 octets gets in
    return (received, LongLines())


def build_cleanup(spool: Spool, hand_off: Callable[[StoredMessage], None],
                  config_source: Callable[[], Config], metrics: ReceiveMetrics) -> Cleanup:
    return Cleanup(spool, hand_off, config_source, transforms, metrics)


def resolver(config: Config, reactor: Any, dns_pool: ThreadPool) -> Resolver:
    return Resolver(reactor, dns_pool, config.dns.nameservers, config.dns.timeout)


def spool_pool() -> ThreadPool:
    return ThreadPool(*SPOOL_THREADS, name="relaygw-spool")


def auth_pool() -> ThreadPool:
    return ThreadPool(*AUTH_THREADS, name="relaygw-auth")


@dataclass
class Core:
    """The main process's mail path, below the sessions."""

    spool: Spool
    spool_pool: ThreadPool
    auth_pool: ThreadPool
    dns_pool: ThreadPool
    relay: RelayCourier
    manager: QueueManager
    policy: ConfiguredPolicy
    metrics: Metrics
    cleanup: Cleanup


def build_core(config: Config, holder: ConfigHolder, reactor: Any) -> Core:
    # Imported here: SMTP workers use this module too, and they need neither
    # prometheus_client nor twisted.web (6 MiB each).
    from relaygw.observe.metrics import Metrics, smarthost_circuits

    spool_threads = spool_pool()
    spool = Spool(config.server.spool_dir, reactor, spool_threads)
    dns_pool = ThreadPool(*DNS_THREADS, name="relaygw-dns")
    relay = RelayCourier(reactor, resolver(config, reactor, dns_pool), holder, spool.run)
    couriers: dict[str, Courier] = {
        "maildir": MaildirCourier(spool.run, lambda: holder().server.hostname),
        "smarthost": relay,
        "mx": relay,
    }

    def oldest_age() -> float:
        arrived = manager.oldest_arrival()
        return max(0.0, reactor.seconds() - arrived) if arrived is not None else 0.0

    metrics = Metrics(queue_size=lambda: len(manager), oldest_age=oldest_age,
                      circuit_states=smarthost_circuits(holder, relay.health))
    manager = QueueManager(spool, holder, couriers, reactor,
                           grace=config.server.shutdown_grace,
                           on_grace_over=relay.abort_all, metrics=metrics)
    cleanup = build_cleanup(spool, manager.enqueued, holder, metrics)
    return Core(spool, spool_threads, auth_pool(), dns_pool, relay, manager,
                ConfiguredPolicy(holder, spool), metrics, cleanup)


def _endpoint(reactor: Any, listener: ListenerConfig) -> IStreamServerEndpoint:
    if ":" in listener.host:
        return TCP6ServerEndpoint(reactor, listener.port, interface=listener.host, backlog=511)
    return TCP4ServerEndpoint(reactor, listener.port, interface=listener.host, backlog=511)


def listener_service(config: Config, listener: ListenerConfig, sessions: Sessions,
                     reactor: Any) -> ListenerService:
    """One process mode: a listening port whose sessions run here."""
    return ListenerService(_endpoint(reactor, listener), sessions.outer, listener.address,
                           sessions=sessions.factory, grace=config.server.shutdown_grace)


def handoff_listener(listener: ListenerConfig, pool: WorkerPool,
                     reactor: Any) -> HandoffListener:
    """Worker mode: a listening socket whose clients go to the workers."""
    return HandoffListener(reactor, listener, pool)


def worker_pool(config: Config, core: Core, counter: ConnectionCounter, reactor: Any, *,
                worker_log: str | None, on_worker_died: Callable[[], None]) -> WorkerPool:
    return WorkerPool(
        reactor, config.server.workers, frozenset(lc.address for lc in config.listeners),
        counter, core.manager.enqueued, metrics=core.metrics,
        grace=config.server.shutdown_grace, log_format=worker_log,
        on_worker_died=on_worker_died, backlog=core.manager.delivery_progress)


def metrics_service(config: Config, core: Core, reactor: Any,
                    listeners_down: Callable[[], list[str]]) -> MetricsService | None:
    """/metrics and /healthz, when ``[metrics] address`` is set."""
    from relaygw.observe.metrics import HealthCheck, metrics_resource, metrics_site

    if config.metrics.host is None or config.metrics.port is None:
        return None
    health = HealthCheck(reactor, core.spool_pool, config.server.spool_dir, listeners_down)
    return MetricsService(reactor, config.metrics.host, config.metrics.port,
                          metrics_site(metrics_resource(core.metrics, health), reactor))


class FrontMetrics(ReceiveMetrics, SessionMetrics, Protocol):
    """What the sessions and the receive stage of a process count."""


def build_worker_front(config: Config, users: dict[str, str] | None, reactor: Any, *,
                       spool_threads: ThreadPool, auth_threads: ThreadPool,
                       metrics: FrontMetrics, hand_off: Callable[[StoredMessage], None],
                       on_session_end: Callable[[object], None],
                       ) -> tuple[Spool, dict[str, Sessions]]:
    """An SMTP worker's spool and sessions, by listener address. The main process
    enforces the connection caps; the worker spools each message itself, then
    ``hand_off`` reports it. Raises StartupError when the TLS files cannot be read."""
    prepared = Prepared(users, tls_options(config, announce=False))
    spool = Spool(config.server.spool_dir, reactor, spool_threads)
    cleanup = build_cleanup(spool, hand_off, lambda: config, metrics)
    built = build_sessions(
        config, prepared, policy=ConfiguredPolicy(lambda: config, spool), sink=cleanup,
        auth=authenticator(prepared, auth_threads, reactor, users_file=config.auth.users_file),
        reactor=reactor,
        counter=ConnectionCounter(UNLIMITED, UNLIMITED), metrics=metrics,
        on_session_end=on_session_end)
    return spool, {listener.address: sessions for listener, sessions in built.items()}
