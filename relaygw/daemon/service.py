"""The daemon as a Twisted service tree: start-up order, shutdown order, reload.

What the objects are is the wiring's business (``relaygw.daemon.wiring``); this
module decides when they start and stop. Start: the spool recovers, the thread
pools start, the queue takes the recovered messages, the control socket and
/metrics listen, then the SMTP listeners. Stop: the other way round, one after the
other: listeners drain their sessions, deliveries in flight finish, the pools and
the spool close.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relaygw.config import DEFAULT_PATH, Config, ConfigError, ListenerConfig, load_config
from relaygw.daemon import wiring
from relaygw.daemon.control import ControlService, socket_path
from relaygw.daemon.gc_tuning import quiet_garbage_collector
from relaygw.daemon.listeners import BindingService, ListenError
from relaygw.daemon.privileges import give_to_user, warn_unwritable_maildirs
from relaygw.daemon.wiring import ConfigHolder, Prepared, StartupError
from relaygw.daemon.workers.pool import WorkerPool, WorkerSpawnError
from relaygw.observe.logs import reopen_log_files
from relaygw.queue.manager import QueueManager
from relaygw.queue.service import SpoolService, SpoolUnusableError
from relaygw.queue.store import StoredMessage
from relaygw.smtp.server import ConnectionCounter

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.tap")

# Seconds after which a spool file no queue entry knows of, found after a worker
# died, is taken as stranded: a live worker reports its messages within moments.
STRANDED_AFTER = 30.0


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

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)
        d: Deferred[None] = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(_stop, child)
            d.addErrback(lambda f: log.failure("shutdown step failed", f))
        return d


def _stop(_: object, child: service.IService) -> Deferred[None] | None:
    result: Deferred[None] | None = child.stopService()
    return result


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
    """The whole daemon: spool, queue, couriers, listeners; reloadable.

    ``stranded_after``: seconds after a worker's death before spool files no queue
    entry knows of count as stranded (tests shorten it). ``run_blocking`` runs the
    blocking part of a reload (reading the files) off the reactor thread.
    """

    install_signals = False

    def __init__(self, config: Config, reactor: Any, worker_log: str | None = None, *,
                 stranded_after: float = STRANDED_AFTER,
                 run_blocking: Callable[[Callable[[], Any]], Deferred[Any]] = deferToThread,
                 run_as: tuple[int, int] | None = None,
                 on_fatal: Callable[[str], None] | None = None,
                 ) -> None:
        super().__init__()
        self.reactor = reactor
        self.run_blocking = run_blocking
        self.holder = ConfigHolder(config)
        self.stranded_after = stranded_after
        self.run_as = run_as  # (uid, gid) twistd switches to after privilegedStartService
        self.on_fatal = on_fatal  # the process's end: say why, stop, exit non-zero
        self._fatal = False
        # Every file the configuration names is read now, while privileged (twistd calls
        # makeService before it drops privileges); a reload reads them again.
        self.files = wiring.FileReader()
        prepared = wiring.prepare(config, files=self.files)
        core = wiring.build_core(config, self.holder, reactor, prepared.delivery)
        self.core = core
        self.spool, self.manager, self.relay = core.spool, core.manager, core.relay
        self.metrics, self.cleanup = core.metrics, core.cleanup
        spool_service = SpoolService(self.spool, core.spool_pool, reactor)
        spool_service.setServiceParent(self)
        _ThreadPoolService(core.auth_pool).setServiceParent(self)
        _ThreadPoolService(core.dns_pool).setServiceParent(self)
        self.manager.setServiceParent(self)
        _QueueStarter(spool_service, self.manager).setServiceParent(self)
        self.control = ControlService(socket_path(config.server.spool_dir), self.manager,
                                      self.spool, self.holder, self.reload, reactor)
        self.control.setServiceParent(self)
        # Added before the listeners, so it stops after them: /healthz says 503 meanwhile.
        metrics_service = wiring.metrics_service(config, core, reactor, self._listeners_down)
        if metrics_service is not None:
            metrics_service.setServiceParent(self)
        self.counter = ConnectionCounter(config.server.max_connections,
                                         config.server.max_connections_per_client)
        self.pool: WorkerPool | None = None
        self._restarted: Deferred[bool] | None = None  # a reload's new workers, until ready
        self._rescan: IDelayedCall | None = None
        self.listeners: service.MultiService
        if config.server.workers:
            # Sessions run in worker processes; this process accepts and hands over.
            # Stop order (last added first): the listening sockets close, then the
            # workers finish their sessions.
            self.listeners = _SequentialService()
            self.pool = wiring.worker_pool(config, core, self.counter, reactor,
                                           worker_log=worker_log,
                                           on_worker_died=self._worker_died,
                                           on_fatal=self.fatal)
            self.pool.setServiceParent(self.listeners)
        else:
            self.listeners = service.MultiService()  # stopped together: they drain in parallel
        self.listeners.setServiceParent(self)
        self.by_listener: dict[ListenerConfig, Any] = {}
        self._apply(config, prepared)

    # -- stranded messages (worker mode) ------------------------------------------

    def _worker_died(self) -> None:
        """A worker killed between its spool commit and its report leaves a message
        no one queued (its client got no 250 and will send again, but the copy must
        still go out, as after a crash). Look for such files once every report that
        was on its way must have arrived."""
        if self._rescan is None or not self._rescan.active():
            self._rescan = self.reactor.callLater(self.stranded_after + 1.0,
                                                  self.queue_stranded)

    def queue_stranded(self) -> Deferred[list[str]]:
        """Queue the spool's messages that no queue entry knows of and that are older
        than ``stranded_after``; Deferred[the queue ids taken]."""
        known = self.manager.queued_ids()
        cutoff = time.time() - self.stranded_after
        taken: list[str] = []

        def load(ids: list[str]) -> Deferred[list[str]]:
            loads = [self.spool.load(queue_id).addCallbacks(queue, skip, errbackArgs=(queue_id,))
                     for queue_id in ids]
            return DeferredList(loads).addCallback(lambda _: taken)

        def queue(stored: StoredMessage) -> None:
            queue_id = stored.envelope.queue_id
            if self.manager.knows(queue_id) or not self.manager.running:
                return
            log.warn("queued id={queue_id}, which a worker stored but did not report before "
                     "it died", queue_id=queue_id, event="recovered")
            self.manager.enqueued(stored)
            taken.append(queue_id)

        def skip(failure: Failure, queue_id: str) -> None:
            if not failure.check(FileNotFoundError):
                log.failure("spool: cannot read id={queue_id}", failure, queue_id=queue_id)

        def cannot_scan(failure: Failure) -> list[str]:
            log.failure("spool: cannot scan for unreported messages", failure)
            return taken

        return self.spool.run(self.spool.unqueued, known, cutoff).addCallbacks(
            load, cannot_scan)

    # -- health -------------------------------------------------------------------

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

    # -- listeners ----------------------------------------------------------------

    def _apply(self, config: Config, prepared: Prepared) -> list[str]:
        """Make the listeners and their settings match ``config``; returns problems."""
        self.counter.max_total = config.server.max_connections
        self.counter.max_per_client = config.server.max_connections_per_client
        if self.pool is not None:
            worker_problems, self._restarted = self._apply_workers(config, prepared)
            return worker_problems
        problems: list[str] = []
        self._drop_listeners(config)
        auth = wiring.authenticator(prepared, self.core.auth_pool, self.reactor,
                                    users_file=config.auth.users_file)
        for listener in config.listeners:
            existing = self.by_listener.get(listener)
            if existing is not None:
                # A listener that stays keeps its socket and sessions; new sessions
                # get the new settings.
                existing.sessions.settings = wiring.server_settings(config, listener,
                                                                    prepared.tls)
                existing.sessions.authenticator = auth
        new = [lc for lc in config.listeners if lc not in self.by_listener]
        sessions = wiring.build_sessions(
            config, prepared, new, policy=self.core.policy, sink=self.cleanup, auth=auth,
            reactor=self.reactor, counter=self.counter, metrics=self.metrics)
        for listener, built in sessions.items():
            self._add_listener(listener,
                               wiring.listener_service(config, listener, built, self.reactor),
                               problems)
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

    def _add_listener(self, listener: ListenerConfig, svc: BindingService,
                      problems: list[str]) -> None:
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

    def _apply_workers(self, config: Config, prepared: Prepared,
                       ) -> tuple[list[str], Deferred[bool] | None]:
        """Worker mode: match the listening sockets to ``config``; on a reload, new
        workers take over with the new configuration."""
        assert self.pool is not None
        problems: list[str] = []
        self._drop_listeners(config)
        for listener in config.listeners:
            if listener not in self.by_listener:
                self._add_listener(listener,
                                   wiring.handoff_listener(listener, self.pool, self.reactor),
                                   problems)
        self.pool.grace = config.server.shutdown_grace
        snapshot = pickle.dumps(wiring.worker_setup(config, prepared),
                                protocol=pickle.HIGHEST_PROTOCOL)
        addresses = frozenset(lc.address for lc in config.listeners)
        restarted = None
        if self.running:
            restarted = self.pool.restart(config.server.workers, addresses, snapshot)
        else:
            self.pool.snapshot = snapshot
        return problems, restarted

    # -- reload -------------------------------------------------------------------

    def reload(self) -> Deferred[list[str]]:
        """Re-read the config file; Deferred[list[str]] of problems (empty: applied)."""
        old = self.holder()
        if old.source_path is None:
            return succeed([])  # the embedded default has nothing to re-read
        source = old.source_path

        def read() -> tuple[Config, Prepared]:
            new = load_config(source)
            try:
                return new, wiring.prepare(new, files=self.files)
            except StartupError as e:
                raise ConfigError(str(e).splitlines()) from e

        d: Deferred[Any] = self.run_blocking(read)

        def loaded(result: tuple[Config, Prepared]) -> list[str] | Deferred[list[str]]:
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
            self.relay.reconfigured(wiring.resolver(new, self.reactor, self.core.dns_pool),
                                    prepared.delivery)
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

        def refused(failure: Failure) -> list[str]:
            failure.trap(ConfigError)
            assert isinstance(failure.value, ConfigError)
            problems: list[str] = failure.value.problems
            for problem in problems:
                log.error("reload refused, the old configuration stays: {problem}",
                          problem=problem)
            return problems

        # Both paths end in list[str]; the overloads cannot see it through the union.
        return cast("Deferred[list[str]]", d.addCallback(loaded).addErrback(refused))

    # -- start and failure ---------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Before twistd drops privileges: the directories the dropped user writes in
        are made, and given to it (``run_as``), then the listeners bind."""
        if self.run_as is not None and os.geteuid() == 0:
            give_to_user(self.holder(), *self.run_as)
        super().privilegedStartService()

    def startService(self) -> None:
        config = self.holder()
        log.info("configuration {source}", source=describe_source(config),
                 event="configuration")
        for warning in config.warnings:
            log.warn("configuration warning: {warning}", warning=warning)
        try:
            super().startService()
        except (SpoolUnusableError, WorkerSpawnError) as e:
            self.abandon()
            raise StartupError(str(e)) from None
        except StartupError:
            self.abandon()
            raise
        warn_unwritable_maildirs(config)
        quiet_garbage_collector()
        if self.install_signals:
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
            signal.signal(signal.SIGUSR1,
                          lambda *_: self.reactor.callFromThread(reopen_log_files))

    def abandon(self) -> None:
        """Start-up failed: stop the threads already started, so nothing keeps the
        process alive while it ends."""
        for pool in (self.core.spool_pool, self.core.auth_pool, self.core.dns_pool):
            if not pool.joined:
                pool.stop()

    def fatal(self, reason: str) -> None:
        """A failure the daemon cannot serve through (a worker that cannot start):
        say why, stop. Only the first counts: the other workers fail alike."""
        if self._fatal:
            return
        self._fatal = True
        log.critical("relaygw: {reason}; stopping", reason=reason, event="fatal")
        if self.on_fatal is not None:
            self.on_fatal(reason)


def describe_source(config: Config) -> str:
    """Which configuration this is, for the start-up log line."""
    if config.source_path is not None:
        return str(config.source_path)
    return (f"built-in default (no {DEFAULT_PATH}), data in "
            f"{config.server.spool_dir.parent}")


def build_service(config: Config, reactor: Any, install_signals: bool = True,
                  worker_log: str | None = None, run_as: tuple[int, int] | None = None,
                  on_fatal: Callable[[str], None] | None = None) -> RelayService:
    """``worker_log``: the log format when the log goes to standard output (worker
    processes then write their lines there themselves); None: they send them here.
    ``run_as``: the (uid, gid) twistd drops to; ``on_fatal``: ends the process."""
    relay = RelayService(config, reactor, worker_log, run_as=run_as, on_fatal=on_fatal)
    relay.install_signals = install_signals
    return relay
