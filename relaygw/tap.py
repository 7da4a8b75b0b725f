"""twistd plugin entry: the one module that turns configuration into objects."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from relaygw.config import Config, ConfigError, ListenerConfig, default_config, load_config
from relaygw.control import ControlService, socket_path
from relaygw.delivery.local import MaildirCourier
from relaygw.delivery.relay import RelayCourier
from relaygw.dns import Resolver
from relaygw.inbound import ConfiguredPolicy
from relaygw.listener import ListenError, ListenerService
from relaygw.logging import configure_twistd
from relaygw.metrics import (
    HealthCheck,
    Metrics,
    MetricsService,
    metrics_resource,
    smarthost_circuits,
)
from relaygw.queue.manager import QueueManager
from relaygw.queue.service import SpoolService
from relaygw.queue.store import Spool
from relaygw.smtp.auth import Authenticator, UsersFileError, load_users
from relaygw.smtp.server import ConnectionCounter, ServerSettings, SMTPServerFactory
from relaygw.smtp.tls import TLSSetupError, ensure_self_signed, server_tls_options

log = Logger()


class StartupError(Exception):
    """relaygw cannot start; the message says why, naming the config key."""


def load(path: str | None) -> Config:
    """The config at path, or the embedded default under ./relaygw-data."""
    if path is None:
        return default_config(Path.cwd() / "relaygw-data")
    return load_config(path)


class Options(usage.Options):
    synopsis = "[--config PATH]"
    optParameters = [  # noqa: N815 - Twisted's name
        ["config", "c", None,
         "TOML configuration file (default: built-in, data in ./relaygw-data)"],
        ["log-format", None, None, "text or json (default: [log] format, else text)"],
    ]

    def postOptions(self) -> None:
        try:
            self.config = load(self["config"])
        except ConfigError as e:
            _refuse_to_start(e.problems)
        configure_twistd(self.parent if self.parent is not None else {},
                         self["log-format"] or self.config.log.format)


def _refuse_to_start(problems: list[str]) -> None:
    print("relaygw: invalid configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    raise SystemExit(1)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    try:
        return build_service(options.config, reactor)
    except StartupError as e:
        _refuse_to_start(str(e).splitlines())
        raise  # not reached


def _tls_options(config: Config) -> Any:
    if not any(listener.tls != "none" for listener in config.listeners):
        return None
    try:
        if config.tls.certificate is not None:
            return server_tls_options(config.tls.certificate, config.tls.private_key)
        cert, key = ensure_self_signed(config.server.spool_dir / "tls", config.server.hostname)
        log.warn("tls: no [tls] certificate configured; using self-signed {cert}", cert=str(cert))
        return server_tls_options(cert, key)
    except TLSSetupError as e:
        raise StartupError(str(e)) from e
    except OSError as e:
        raise StartupError(f"server.spool_dir: cannot create TLS files: {e}") from e


def _users(config: Config) -> dict[str, str] | None:
    if config.auth.users_file is None:
        return None
    try:
        return load_users(config.auth.users_file)
    except UsersFileError as e:
        raise StartupError("\n".join(f"auth.users_file: {p}" for p in e.problems)) from e
    except OSError as e:
        raise StartupError(f"auth.users_file: cannot read {config.auth.users_file}: "
                           f"{e.strerror}") from e


def _prepare(config: Config) -> tuple[dict[str, str] | None, Any]:
    """The file work a configuration needs (users, TLS keys): blocking, so at start-up
    or in a thread, never on the reactor thread of a running daemon."""
    return _users(config), _tls_options(config)


def _endpoint(reactor: Any, listener: ListenerConfig) -> Any:
    endpoint_type = TCP6ServerEndpoint if ":" in listener.host else TCP4ServerEndpoint
    return endpoint_type(reactor, listener.port, interface=listener.host, backlog=511)


class _ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class ConfigHolder:
    """The configuration in force; reload replaces ``current``."""

    def __init__(self, config: Config) -> None:
        self.current = config

    def __call__(self) -> Config:
        return self.current


class _SequentialService(service.MultiService):
    """Stops its children one after the other, last started first.

    Shutdown is a pipeline: listeners drain their sessions, then deliveries in
    flight finish, then the thread pools and the spool close.
    """

    def stopService(self) -> Deferred:
        service.Service.stopService(self)
        d: Deferred = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, c=child: c.stopService())
            d.addErrback(lambda f: log.failure("shutdown step failed", f))
        return d


class _QueueStarter(service.Service):
    """Hands the spool's recovered messages to the queue once both run."""

    def __init__(self, spool_service: SpoolService, manager: QueueManager) -> None:
        self.spool_service = spool_service
        self.manager = manager

    def startService(self) -> None:
        super().startService()
        self.manager.load(self.spool_service.recovered)
        self.spool_service.recovered = []


def _settings(config: Config, listener: ListenerConfig, tls_options: Any) -> ServerSettings:
    return ServerSettings(
        hostname=config.server.hostname,
        max_message_size=config.server.max_message_size,
        max_recipients=config.server.max_recipients,
        max_hops=config.server.max_hops,
        idle_timeout=config.server.idle_timeout,
        max_errors=config.server.max_errors,
        normalize_bare_newlines=config.server.bare_newlines == "normalize",
        tls_mode=listener.tls,
        require_tls=listener.require_tls,
        auth_mode=listener.auth,
        tls_options=tls_options if listener.tls != "none" else None,
    )


class RelayService(_SequentialService):
    """The whole daemon: spool, queue, couriers, listeners; reloadable."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.holder = ConfigHolder(config)
        spool_pool = ThreadPool(minthreads=2, maxthreads=16, name="relaygw-spool")
        self.spool = Spool(config.server.spool_dir, reactor, spool_pool)
        spool_service = SpoolService(self.spool, spool_pool, reactor)
        spool_service.setServiceParent(self)
        self.auth_pool = ThreadPool(minthreads=0, maxthreads=4, name="relaygw-auth")
        _ThreadPoolService(self.auth_pool).setServiceParent(self)
        self.dns_pool = ThreadPool(minthreads=0, maxthreads=10, name="relaygw-dns")
        _ThreadPoolService(self.dns_pool).setServiceParent(self)

        self.relay = RelayCourier(reactor, self._resolver(config), self.holder, self.spool.run)
        couriers = {
            "maildir": MaildirCourier(self.spool.run, lambda: self.holder().server.hostname),
            "smarthost": self.relay,
            "mx": self.relay,
        }
        self.metrics = Metrics(queue_size=lambda: len(self.manager.entries),
                               oldest_age=self._oldest_age,
                               circuit_states=smarthost_circuits(self.holder, self.relay.health))
        self.manager = QueueManager(self.spool, self.holder, couriers, reactor,
                                    grace=config.server.shutdown_grace,
                                    on_grace_over=self.relay.abort_all,
                                    metrics=self.metrics)
        self.manager.setServiceParent(self)
        _QueueStarter(spool_service, self.manager).setServiceParent(self)
        self.control = ControlService(socket_path(config.server.spool_dir), self.manager,
                                      self.spool, self.holder, self.reload, reactor)
        self.control.setServiceParent(self)
        if config.metrics.address is not None:
            # Added before the listeners, so it stops after them: /healthz says 503 meanwhile.
            health = HealthCheck(reactor, spool_pool, config.server.spool_dir,
                                 self._listeners_down)
            MetricsService(reactor, config.metrics.host, config.metrics.port,
                           metrics_resource(self.metrics, health)).setServiceParent(self)

        self.policy = ConfiguredPolicy(self.holder, self.spool)
        self.counter = ConnectionCounter(config.server.max_connections,
                                         config.server.max_connections_per_client)
        self.listeners = service.MultiService()  # stopped together: they drain in parallel
        self.listeners.setServiceParent(self)
        self.by_listener: dict[ListenerConfig, ListenerService] = {}
        self._apply(config, _prepare(config))

    def _oldest_age(self) -> float:
        arrived = [e.stored.envelope.arrived for e in self.manager.entries.values()]
        return max(0.0, self.reactor.seconds() - min(arrived)) if arrived else 0.0

    def _listeners_down(self) -> list[str]:
        if not self.by_listener:
            return ["no listener"]
        return [svc.address for svc in self.by_listener.values() if svc.port is None]

    def _resolver(self, config: Config) -> Resolver:
        return Resolver(self.reactor, self.dns_pool, config.dns.nameservers, config.dns.timeout)

    def _apply(self, config: Config, prepared: tuple[dict[str, str] | None, Any]) -> list[str]:
        """Make the listeners and their settings match ``config``; returns problems."""
        problems: list[str] = []
        users, tls_options = prepared
        authenticator = (Authenticator(users, self.auth_pool, self.reactor)
                         if users is not None else None)
        self.counter.max_total = config.server.max_connections
        self.counter.max_per_client = config.server.max_connections_per_client
        wanted = set(config.listeners)
        for listener in [lc for lc in self.by_listener if lc not in wanted]:
            svc = self.by_listener.pop(listener)
            svc.disownServiceParent()  # stops listening, drains its sessions
            log.info("stopped listening on {address}", address=listener.address)
        for listener in config.listeners:
            settings = _settings(config, listener, tls_options)
            existing = self.by_listener.get(listener)
            if existing is not None:
                existing.sessions.settings = settings
                existing.sessions.authenticator = authenticator
                continue
            factory = SMTPServerFactory(
                settings, self.policy, self.spool, authenticator, self.reactor,
                counter=self.counter, on_queued=self.manager.enqueued,
                metrics=self.metrics, listener=listener.address)
            outer: Any = factory
            if listener.tls == "implicit":
                outer = TLSMemoryBIOFactory(tls_options, False, factory)
            outer.noisy = factory.noisy = False
            svc = ListenerService(_endpoint(self.reactor, listener), outer, listener.address,
                                  sessions=factory, grace=config.server.shutdown_grace)
            if self.running:  # a listener added by reload binds now
                try:
                    svc.bind()
                except ListenError as e:
                    problems.append(f"listeners: {e}")
                    continue
            self.by_listener[listener] = svc
            svc.setServiceParent(self.listeners)
            log.info("listening on {address} tls={tls} auth={auth}",
                     address=listener.address, tls=listener.tls, auth=listener.auth)
        for route in config.routes:
            if route.action == "maildir":
                log.info("routes[{index}]: maildir delivery under {template}",
                         index=route.index, template=route.maildir)
        return problems

    def reload(self) -> Deferred:
        """Re-read the config file; Deferred[list[str]] of problems (empty: applied)."""
        old = self.holder()
        if old.source_path is None:
            return succeed([])  # the embedded default has nothing to re-read
        def read() -> tuple[Config, Any]:
            new = load_config(old.source_path)
            try:
                return new, _prepare(new)
            except StartupError as e:
                raise ConfigError(str(e).splitlines()) from e

        d = deferToThread(read)

        def loaded(result: tuple[Config, Any]) -> list[str]:
            new, prepared = result
            if new.server.spool_dir != old.server.spool_dir:
                raise ConfigError(["server.spool_dir: cannot change while running; restart"])
            if (new.metrics, new.log) != (old.metrics, old.log):
                log.warn("reload: [metrics] and [log] changes take effect at the next restart")
            self.holder.current = new
            problems = self._apply(new, prepared)
            self.relay.reconfigured(self._resolver(new))
            for problem in problems:
                log.error("reload: {problem}", problem=problem)
            log.info("reload: {path} applied", path=str(new.source_path))
            return problems

        def refused(failure: Any) -> list[str]:
            failure.trap(ConfigError)
            problems = failure.value.problems
            for problem in problems:
                log.error("reload refused, the old configuration stays: {problem}",
                          problem=problem)
            return problems

        return d.addCallback(loaded).addErrback(refused)

    def startService(self) -> None:
        super().startService()
        if self.install_signals:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    install_signals = False


def build_service(config: Config, reactor: Any, install_signals: bool = True) -> RelayService:
    relay = RelayService(config, reactor)
    relay.install_signals = install_signals
    return relay
