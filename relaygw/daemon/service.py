"""twistd plugin entry: the one module that turns configuration into objects."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from relaygw import front
from relaygw.config import Config, ConfigError, ListenerConfig, load_config
from relaygw.daemon.control import ControlService, socket_path
from relaygw.delivery.local import MaildirCourier
from relaygw.delivery.relay import RelayCourier
from relaygw.delivery.dns import Resolver
from relaygw.daemon.wiring import ConfigHolder, StartupError, load, outer_factory, prepare
from relaygw.daemon.workers.pool import HandoffListener, WorkerPool
from relaygw.receive.policy import ConfiguredPolicy
from relaygw.daemon.listeners import ListenError, ListenerService
from relaygw.observe.logs import configure_twistd
from relaygw.observe.metrics import (
    HealthCheck,
    Metrics,
    MetricsService,
    metrics_resource,
    smarthost_circuits,
)
from relaygw.queue.manager import QueueManager
from relaygw.queue.service import SpoolService
from relaygw.queue.store import STATE_SUFFIX, Spool
from relaygw.daemon.gc_tuning import quiet_garbage_collector
from relaygw.smtp.auth import Authenticator
from relaygw.smtp.server import ConnectionCounter, SMTPServerFactory

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.daemon.service")

# Seconds after which a spool file no queue entry knows of, found after a worker
# died, is taken as stranded: a live worker reports its messages within moments.
STRANDED_AFTER = 30.0


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
        server_options = self.parent if self.parent is not None else {}
        log_format = self["log-format"] or self.config.log.format
        configure_twistd(server_options, log_format)
        self.worker_log = log_format if _logs_to_stdout(server_options) else None


def _logs_to_stdout(server_options: Any) -> bool:
    """Whether twistd writes the log to standard output, where worker processes can
    write their own lines (they inherit it) instead of sending them here to format."""
    logfile = server_options.get("logfile")
    logger = server_options.get("logger")
    if server_options.get("syslog") or (logger and not logger.startswith("relaygw.observe.logs.")):
        return False
    return logfile == "-" or (bool(server_options.get("nodaemon")) and not logfile)


def _refuse_to_start(problems: list[str]) -> None:
    print("relaygw: invalid configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    raise SystemExit(1)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    try:
        return build_service(options.config, reactor,
                             worker_log=getattr(options, "worker_log", None))
    except StartupError as e:
        _refuse_to_start(str(e).splitlines())
        raise  # not reached


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


class RelayService(_SequentialService):
    """The whole daemon: spool, queue, couriers, listeners; reloadable."""

    def __init__(self, config: Config, reactor: Any, worker_log: str | None = None) -> None:
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
        self.pool: WorkerPool | None = None
        self._restarted: Deferred | None = None  # a reload's new workers, until ready
        self._rescan: Any = None
        if config.server.workers:
            # Sessions run in worker processes; this process accepts and hands over.
            # Stop order (last added first): the listening sockets close, then the
            # workers finish their sessions.
            self.listeners: service.MultiService = _SequentialService()
            self.pool = WorkerPool(
                reactor, config.server.workers,
                frozenset(lc.address for lc in config.listeners), self.counter,
                self.manager.enqueued, metrics=self.metrics, grace=config.server.shutdown_grace,
                log_format=worker_log, on_worker_died=self._worker_died,
                backlog=self.manager.delivery_progress)
            self.pool.setServiceParent(self.listeners)
        else:
            self.listeners = service.MultiService()  # stopped together: they drain in parallel
        self.listeners.setServiceParent(self)
        self.by_listener: dict[ListenerConfig, Any] = {}
        self._apply(config, prepare(config))

    def _worker_died(self) -> None:
        """A worker killed between its spool commit and its report leaves a message
        no one queued (its client got no 250 and will send again, but the copy must
        still go out, as after a crash). Look for such files once every report that
        was on its way must have arrived."""
        if self._rescan is None or not self._rescan.active():
            self._rescan = self.reactor.callLater(STRANDED_AFTER + 1.0, self._find_stranded)

    def _find_stranded(self) -> None:
        known = set(self.manager.entries)
        cutoff = time.time() - STRANDED_AFTER

        def scan() -> list[str]:
            found = []
            for entry in os.scandir(self.spool.queue_dir):
                name = entry.name
                if name.endswith(STATE_SUFFIX) or name in known:
                    continue
                try:
                    if entry.stat().st_mtime < cutoff:
                        found.append(name)
                except FileNotFoundError:  # delivered and removed meanwhile
                    continue
            return found

        def load(ids: list[str]) -> None:
            for queue_id in ids:
                self.spool.load(queue_id).addCallbacks(queue, skip, errbackArgs=(queue_id,))

        def queue(stored: Any) -> None:
            if stored.envelope.queue_id in self.manager.entries or not self.manager.running:
                return
            log.warn("queued {queue_id}, which a worker stored but did not report before "
                     "it died", queue_id=stored.envelope.queue_id, event="recovered")
            self.manager.enqueued(stored)

        def skip(failure: Any, queue_id: str) -> None:
            if not failure.check(FileNotFoundError):
                log.failure("spool: cannot read {queue_id}", failure, queue_id=queue_id)

        self.spool.run(scan).addCallbacks(
            load, lambda f: log.failure("spool: cannot scan for unreported messages", f))

    def _oldest_age(self) -> float:
        arrived = [e.stored.envelope.arrived for e in self.manager.entries.values()]
        return max(0.0, self.reactor.seconds() - min(arrived)) if arrived else 0.0

    def _listeners_down(self) -> list[str]:
        if not self.by_listener:
            return ["no listener"]
        down = [svc.address for svc in self.by_listener.values() if svc.port is None]
        if self.pool is not None:
            # A bound socket nobody serves is not listening in any useful sense.
            down += [f"{svc.address} (no SMTP worker ready)"
                     for svc in self.by_listener.values()
                     if svc.port is not None and not self.pool.serves(svc.address)]
        return down

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
        if self.pool is not None:
            problems, self._restarted = self._apply_workers(config, users)
            return problems
        self._drop_listeners(config)
        for listener in config.listeners:
            settings = front.settings(config, listener, tls_options)
            existing = self.by_listener.get(listener)
            if existing is not None:
                existing.sessions.settings = settings
                existing.sessions.authenticator = authenticator
                continue
            factory = SMTPServerFactory(
                settings, self.policy, self.spool, authenticator, self.reactor,
                counter=self.counter, on_queued=self.manager.enqueued,
                metrics=self.metrics, listener=listener.address)
            outer = outer_factory(factory, listener, tls_options)
            svc = ListenerService(_endpoint(self.reactor, listener), outer, listener.address,
                                  sessions=factory, grace=config.server.shutdown_grace)
            self._add_listener(listener, svc, problems)
        for route in config.routes:
            if route.action == "maildir":
                log.info("routes[{index}]: maildir delivery under {template}",
                         index=route.index, template=route.maildir)
        return problems

    def _drop_listeners(self, config: Config) -> None:
        """Stop the listeners ``config`` no longer has (each drains its sessions)."""
        wanted = set(config.listeners)
        for listener in [lc for lc in self.by_listener if lc not in wanted]:
            self.by_listener.pop(listener).disownServiceParent()
            log.info("stopped listening on {address}", address=listener.address)

    def _add_listener(self, listener: ListenerConfig, svc: Any, problems: list[str]) -> None:
        """Start ``svc`` for ``listener``; a reload binds it now and reports a failure."""
        if self.running:
            try:
                svc.bind()
            except ListenError as e:
                problems.append(f"listeners: {e}")
                return
        self.by_listener[listener] = svc
        svc.setServiceParent(self.listeners)
        log.info("listening on {address} tls={tls} auth={auth}",
                 address=listener.address, tls=listener.tls, auth=listener.auth)

    def _apply_workers(self, config: Config, users: dict[str, str] | None,
                       ) -> tuple[list[str], Deferred | None]:
        """Worker mode: match the listening sockets to ``config``; on a reload, new
        workers take over with the new configuration."""
        assert self.pool is not None
        problems: list[str] = []
        self._drop_listeners(config)
        for listener in config.listeners:
            if listener not in self.by_listener:
                self._add_listener(listener, HandoffListener(self.reactor, listener, self.pool),
                                   problems)
        self.pool.grace = config.server.shutdown_grace
        snapshot = pickle.dumps((config, users), protocol=pickle.HIGHEST_PROTOCOL)
        addresses = frozenset(lc.address for lc in config.listeners)
        restarted = None
        if self.running:
            restarted = self.pool.restart(config.server.workers, addresses, snapshot)
        else:
            self.pool.snapshot = snapshot
        return problems, restarted

    def reload(self) -> Deferred:
        """Re-read the config file; Deferred[list[str]] of problems (empty: applied)."""
        old = self.holder()
        if old.source_path is None:
            return succeed([])  # the embedded default has nothing to re-read
        def read() -> tuple[Config, Any]:
            new = load_config(old.source_path)
            try:
                return new, prepare(new)
            except StartupError as e:
                raise ConfigError(str(e).splitlines()) from e

        d = deferToThread(read)

        def loaded(result: tuple[Config, Any]) -> list[str] | Deferred:
            new, prepared = result
            if new.server.spool_dir != old.server.spool_dir:
                raise ConfigError(["server.spool_dir: cannot change while running; restart"])
            if bool(new.server.workers) != bool(old.server.workers):
                raise ConfigError(["server.workers: cannot change between 0 and more "
                                   "while running; restart"])
            if (new.metrics, new.log) != (old.metrics, old.log):
                log.warn("reload: [metrics] and [log] changes take effect at the next restart")
            self.holder.current = new
            self._restarted = None
            problems = self._apply(new, prepared)
            self.relay.reconfigured(self._resolver(new))
            if self._restarted is None:
                return applied(problems, new)
            # Worker mode: the new configuration is in force once its workers are ready.
            return self._restarted.addCallback(workers_started, problems, new)

        def workers_started(ok: bool, problems: list[str], new: Config) -> list[str]:
            if not ok:
                problems = [*problems, "server.workers: a new worker process did not start "
                            "(see the log); the previous workers keep serving sessions"]
            return applied(problems, new)

        def applied(problems: list[str], new: Config) -> list[str]:
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
        quiet_garbage_collector()
        if self.install_signals:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    install_signals = False


def build_service(config: Config, reactor: Any, install_signals: bool = True,
                  worker_log: str | None = None) -> RelayService:
    """``worker_log``: the log format when the log goes to standard output (worker
    processes then write their lines there themselves); None: they send them here."""
    relay = RelayService(config, reactor, worker_log)
    relay.install_signals = install_signals
    return relay
