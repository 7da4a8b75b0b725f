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

import os
import pwd
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from relaygw.delivery.relay import DeliveryFiles, RelayCourier
from relaygw.queue.manager import QueueManager
from relaygw.queue.store import Spool, StoredMessage
from relaygw.receive.cleanup import Cleanup, ReceiveMetrics
from relaygw.receive.longlines import LongLines
from relaygw.receive.policy import ConfiguredPolicy
from relaygw.receive.transforms import MessageTransform, ReceivedHeader
from relaygw.smtp.auth import Authenticator, UsersFileError, parse_users
from relaygw.smtp.framing import MAX_LINE
from relaygw.smtp.server import (
    ConnectionCounter,
    MessageSink,
    ServerSettings,
    SessionMetrics,
    SMTPServerFactory,
)
from relaygw.smtp.tls import (
    TLSSetupError,
    ensure_self_signed,
    server_tls_options_from_pem,
    trust_root_from_pem,
)

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
    # The certificate chain and key behind ``tls`` as read: worker processes build their
    # TLS from these, since after the privilege drop they may not read the key file.
    tls_pem: tuple[bytes, bytes] | None = None
    delivery: DeliveryFiles = field(default_factory=DeliveryFiles)


class FileReader:
    """Reads the files a configuration names, and remembers what it read.

    At start-up relaygw reads them while privileged; a reload runs after the drop. A
    file the dropped user may not read (a root-only key) that has not changed since
    (same inode, size, modification and change times) is taken from memory, so a
    reload still works; a changed one is an error naming the key.
    """

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, ...], bytes]] = {}

    def read(self, path: Path) -> bytes:
        try:
            before = _identity(path)
            data = path.read_bytes()
        except PermissionError:
            known = self._seen.get(path)
            try:
                if known is not None and known[0] == _identity(path):
                    return known[1]
            except OSError:
                pass
            raise
        self._seen[path] = (before, data)
        return data


def _identity(path: Path) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _cannot_read(key: str, path: Path, e: OSError) -> str:
    user = _user_name()
    why = e.strerror or str(e)
    if isinstance(e, PermissionError) and user is not None:
        why += f" (relaygw runs as {user})"
    return f"{key}: cannot read {path}: {why}"


def _user_name() -> str | None:
    """The user relaygw runs as, when it is not root (a permission problem names it)."""
    uid = os.geteuid()
    if uid == 0:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class _Problems:
    """Collects every problem, so one check shows them all, as config checking does."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def read(self, files: FileReader, key: str, path: Path) -> bytes | None:
        try:
            return files.read(path)
        except OSError as e:
            self.lines.append(_cannot_read(key, path, e))
            return None


def _tls(config: Config, files: FileReader, problems: _Problems, *, announce: bool,
         create: bool) -> tuple[Any, tuple[bytes, bytes] | None]:
    """The server TLS options and the PEM behind them. A configured [tls] pair is always
    read (a pair that cannot serve is an error even while no listener uses TLS); the
    self-signed one only when a listener needs it, and made only when ``create``."""
    uses_tls = any(listener.tls != "none" for listener in config.listeners)
    if config.tls.certificate is not None:
        assert config.tls.private_key is not None  # config requires both or neither
        cert_path, key_path = config.tls.certificate, config.tls.private_key
    elif not uses_tls:
        return None, None
    else:
        directory = config.server.spool_dir / "tls"
        if not create and not (directory / "selfsigned-key.pem").exists():
            return None, None  # made at start-up
        try:
            # The spool directory is private (0700), even when this makes it first.
            config.server.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            cert_path, key_path = ensure_self_signed(directory, config.server.hostname)
        except TLSSetupError as e:
            problems.lines.append(str(e))
            return None, None
        except OSError as e:
            problems.lines.append(f"server.spool_dir: cannot create {config.server.spool_dir}: "
                                  f"{e.strerror or e}")
            return None, None
        if announce:
            log.warn("tls: no [tls] certificate configured; using self-signed {cert}",
                     cert=str(cert_path))
    cert_pem = problems.read(files, "tls.certificate", cert_path)
    key_pem = problems.read(files, "tls.private_key", key_path)
    if cert_pem is None or key_pem is None:
        return None, None
    try:
        options = server_tls_options_from_pem(cert_pem, key_pem)
    except TLSSetupError as e:
        problems.lines.append(str(e))
        return None, None
    return (options if uses_tls else None), (cert_pem, key_pem)


def _users(config: Config, files: FileReader, problems: _Problems) -> dict[str, str] | None:
    path = config.auth.users_file
    if path is None:
        return None
    raw = problems.read(files, "auth.users_file", path)
    if raw is None:
        return None
    try:
        return parse_users(path, raw)
    except UsersFileError as e:
        problems.lines.extend(f"auth.users_file: {p}" for p in e.problems)
        return None


def _delivery_files(config: Config, files: FileReader, problems: _Problems) -> DeliveryFiles:
    passwords: dict[Path, str] = {}
    trust_roots: dict[Path, Any] = {}

    def ca_file(key: str, path: Path | None) -> None:
        if path is None or path in trust_roots:
            return
        data = problems.read(files, key, path)
        if data is None:
            return
        try:
            trust_roots[path] = trust_root_from_pem(data)
        except ValueError as e:
            problems.lines.append(f"{key}: {path}: {e}")

    for smarthost in config.smarthosts:
        where = f"smarthosts.{smarthost.name}"
        ca_file(f"{where}.ca_file", smarthost.ca_file)
        path = smarthost.password_file
        if path is None:
            continue
        raw = problems.read(files, f"{where}.password_file", path)
        if raw is None:
            continue
        try:
            password = raw.decode("utf-8").strip("\r\n")
        except UnicodeDecodeError:
            problems.lines.append(f"{where}.password_file: {path}: not UTF-8")
            continue
        if not password:
            problems.lines.append(f"{where}.password_file: {path} is empty")
            continue
        passwords[path] = password
    ca_file("delivery.ca_file", config.delivery.ca_file)
    return DeliveryFiles(passwords, trust_roots)


def prepare(config: Config, announce: bool = True, *, create: bool = True,
            files: FileReader | None = None) -> Prepared:
    """Read every file the configuration names: the [tls] pair (or the self-signed one,
    made when ``create``), the users file, the smarthosts' password and CA files and
    [delivery] ca_file. Blocking, so at start-up or in a thread, never on the reactor
    thread of a running daemon. The same check for ``check-config``, start-up and
    reload: StartupError lists every problem, one per line, each naming its key."""
    files = files or FileReader()
    problems = _Problems()
    tls, tls_pem = _tls(config, files, problems, announce=announce, create=create)
    users = _users(config, files, problems)
    delivery = _delivery_files(config, files, problems)
    if problems.lines:
        raise StartupError("\n".join(problems.lines))
    return Prepared(users, tls, tls_pem, delivery)


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


def build_core(config: Config, holder: ConfigHolder, reactor: Any,
               files: DeliveryFiles | None = None) -> Core:
    # Imported here: SMTP workers use this module too, and they need neither
    # prometheus_client nor twisted.web (6 MiB each).
    from relaygw.observe.metrics import Metrics, smarthost_circuits

    spool_threads = spool_pool()
    spool = Spool(config.server.spool_dir, reactor, spool_threads)
    dns_pool = ThreadPool(*DNS_THREADS, name="relaygw-dns")
    relay = RelayCourier(reactor, resolver(config, reactor, dns_pool), holder, spool.run, files)
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
                worker_log: str | None, on_worker_died: Callable[[], None],
                on_fatal: Callable[[str], None] | None = None) -> WorkerPool:
    return WorkerPool(
        reactor, config.server.workers, frozenset(lc.address for lc in config.listeners),
        counter, core.manager.enqueued, metrics=core.metrics,
        grace=config.server.shutdown_grace, log_format=worker_log,
        on_worker_died=on_worker_died, backlog=core.manager.delivery_progress,
        on_fatal=on_fatal)


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


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker process starts from, sent by the main process (pickled): the
    configuration in force (not the file on disk, which may have changed since), the
    users and the TLS PEM it read while privileged (a worker runs as the dropped user
    and may not read them)."""

    config: Config
    users: dict[str, str] | None
    tls_pem: tuple[bytes, bytes] | None


def worker_setup(config: Config, prepared: Prepared) -> WorkerSetup:
    return WorkerSetup(config, prepared.users, prepared.tls_pem)


def build_worker_front(setup: WorkerSetup, reactor: Any, *,
                       spool_threads: ThreadPool, auth_threads: ThreadPool,
                       metrics: FrontMetrics, hand_off: Callable[[StoredMessage], None],
                       on_session_end: Callable[[object], None],
                       ) -> tuple[Spool, dict[str, Sessions]]:
    """An SMTP worker's spool and sessions, by listener address. The main process
    enforces the connection caps; the worker spools each message itself, then
    ``hand_off`` reports it. Raises StartupError when TLS cannot be set up."""
    config = setup.config
    tls = None
    if setup.tls_pem is not None and any(lc.tls != "none" for lc in config.listeners):
        try:
            tls = server_tls_options_from_pem(*setup.tls_pem)
        except TLSSetupError as e:
            raise StartupError(str(e)) from e
    elif any(lc.tls != "none" for lc in config.listeners):
        raise StartupError("tls: the main process sent no certificate")
    prepared = Prepared(setup.users, tls)
    spool = Spool(config.server.spool_dir, reactor, spool_threads)
    cleanup = build_cleanup(spool, hand_off, lambda: config, metrics)
    built = build_sessions(
        config, prepared, policy=ConfiguredPolicy(lambda: config, spool), sink=cleanup,
        auth=authenticator(prepared, auth_threads, reactor, users_file=config.auth.users_file),
        reactor=reactor,
        counter=ConnectionCounter(UNLIMITED, UNLIMITED), metrics=metrics,
        on_session_end=on_session_end)
    return spool, {listener.address: sessions for listener, sessions in built.items()}
