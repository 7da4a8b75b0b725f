"""The main process's side of the SMTP workers (``[server] workers = N``).

The main process keeps the listening sockets: it accepts, applies the
connection caps (so they stay daemon-wide), and hands each client socket to the
least busy ready worker over that worker's UNIX socket (SCM_RIGHTS). Workers
report back which connections ended, the messages they queued (the envelope,
so the queue manager takes them without re-reading), their metrics events and
their log events (so the daemon keeps one log). ``relaygw.daemon.workers.channel``
lists the messages.

A worker that dies is started again (after a pause that grows while it keeps
dying); its connections are released. A reload starts a new set of workers
with the new configuration and lets the old ones finish their sessions, as
Postfix does with its smtpd processes. While no worker is ready the listening
sockets are not read: the kernel's backlog holds new clients until one is.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import pwd
import socket
import sys
from collections.abc import Callable
from typing import Any, cast

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IUNIXTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from relaygw.config import ListenerConfig
from relaygw.daemon.listeners import BindingService, ListenError
from relaygw.daemon.workers.channel import (
    EXIT_CONFIG,
    MAX_LINE,
    METRIC_EVENTS,
    ChannelFactory,
)
from relaygw.observe import fields
from relaygw.observe.null import NullMetrics
from relaygw.queue.store import StoredMessage
from relaygw.smtp.replies import Reply
from relaygw.smtp.server import ConnectionCounter

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.handoff")

ACCEPT_BATCH = 64  # connections taken per readable event, so one port cannot starve the rest
BACKLOG = 511
RESPAWN_FIRST = 0.5  # seconds before a dead worker is started again; doubles while it keeps dying
RESPAWN_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that lived this long resets the pause
KILL_MARGIN = 5.0  # seconds past the shutdown grace before a worker is killed
REASON_WAIT = 1.0  # seconds a worker's channel may outlive it, for its last lines
# Flow control: when this many accepted messages wait for a delivery attempt to finish
# while deliveries are finishing (the relay is slower than its clients, not stuck), new
# connections wait in the listen backlog until the queue is down to FLOW_LOW. Without
# it, a long burst accepted faster than it can be relayed piles up in memory (the
# queue's entries); with it, acceptance settles at the delivery rate. When no attempt
# has finished for FLOW_STALL seconds (a smarthost that hangs), accepting goes on: the
# mail is safe on disk and waiting helps nobody.
FLOW_HIGH = 1000
FLOW_LOW = 500
FLOW_STALL = 1.0
FLOW_POLL = 0.1  # seconds between checks while paused
NO_WORKER = Reply(421, "4.3.0", "Service temporarily unavailable, try again later", close=True)


class WorkerSpawnError(Exception):
    """A worker process cannot be started; the message names the key and the reason."""


def _why(e: OSError) -> str:
    why = e.strerror or str(e)
    if isinstance(e, PermissionError) and os.geteuid() != 0:
        try:
            why += f" (relaygw runs as {pwd.getpwuid(os.geteuid()).pw_name})"
        except KeyError:
            why += f" (relaygw runs as uid {os.geteuid()})"
    return why


class HandoffListener(BindingService):
    """One listening socket whose clients go to the workers."""

    def __init__(self, reactor: Any, listener: ListenerConfig, pool: WorkerPool) -> None:
        self.reactor = reactor
        self.listener = listener
        self.address = listener.address
        self.pool = pool
        self.port: socket.socket | None = None  # None: not listening (healthz reports it)
        self._reading = False

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # binds, if privilegedStartService has not
        self.pool.listeners.add(self)
        self.pool.update_reading()

    def stopService(self) -> None:
        super().stopService()
        self.pool.listeners.discard(self)
        self.pause()
        if self.port is not None:
            port, self.port = self.port, None
            port.close()

    def bind(self) -> None:
        host, port = self.listener.host, self.listener.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise ListenError(f"cannot listen on {self.address}: "
                              f"{e.strerror or e}") from None
        self.port = sock

    # -- reactor reader -------------------------------------------------------

    def resume(self) -> None:
        if self.port is not None and not self._reading:
            self._reading = True
            self.reactor.addReader(self)

    def pause(self) -> None:
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)

    def fileno(self) -> int:
        return self.port.fileno() if self.port is not None else -1

    def logPrefix(self) -> str:
        return f"relaygw-listener-{self.address}"

    def connectionLost(self, reason: Failure) -> None:
        self._reading = False

    def doRead(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.port is None:
                return
            try:
                conn, addr = self.port.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the client waits in the backlog.
                log.error("accept on {address} failed: {error}", address=self.address,
                          error=e.strerror or str(e))
                return
            self.pool.dispatch(self, conn, addr[0])
            if not self._reading:  # the last worker went away meanwhile
                return


class _WorkerChannel(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def connectionMade(self) -> None:
        # The first line a worker reads: the configuration it is to serve.
        assert self.transport is not None
        self.transport.write(b"K " + base64.b64encode(self.worker.snapshot) + b"\n")

    def lineReceived(self, line: bytes) -> None:
        try:
            self.worker.received(line)
        except Exception:
            log.failure("worker {index}: bad message from the worker", index=self.worker.index)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.error("worker {index}: message over {n} bytes dropped", index=self.worker.index,
                  n=MAX_LINE)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        worker = self.worker
        worker.channel = None
        if worker.reason_awaited is not None:
            was_ready, worker.reason_awaited = worker.reason_awaited, None
            worker.pool._cannot_start(worker, was_ready)


class _WorkerProcess(ProcessProtocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def processEnded(self, reason: Failure) -> None:
        worker = self.worker
        if worker.process is None:
            # It ended inside spawnProcess (Twisted reaps at once): let _spawn finish
            # recording it and connecting its channel first.
            worker.pool.reactor.callLater(0, worker.pool.worker_ended, worker, reason)
            return
        worker.pool.worker_ended(worker, reason)


class _Worker:
    """The main process's record of one worker process."""

    def __init__(self, pool: WorkerPool, index: int, generation: int,
                 addresses: frozenset[str], snapshot: bytes) -> None:
        self.pool = pool
        self.index = index
        self.generation = generation
        self.addresses = addresses  # the listeners its configuration has
        self.snapshot = snapshot  # its generation's configuration (see WorkerPool)
        self.channel: _WorkerChannel | None = None
        self.process: Any = None
        self.pid: int | None = None
        self.ready = False
        self.retired = False  # draining after a reload or at shutdown: no new clients
        self.started = pool.reactor.seconds()
        self.conns: dict[int, tuple[str, str, socket.socket | None]] = {}
        self.exited: Deferred = Deferred()
        self.cannot_start: str | None = None  # its reason, from an F line
        # Ended with EXIT_CONFIG before its F line was read: (was it ready), until the
        # channel's end, which comes after every line the worker wrote.
        self.reason_awaited: bool | None = None

    def open_channel(self) -> _WorkerChannel:
        self.channel = _WorkerChannel(self)
        return self.channel

    @property
    def accepting(self) -> bool:
        return self.ready and not self.retired and self.channel is not None

    def hand_over(self, conn_id: int, listener: str, conn: socket.socket, host: str) -> None:
        assert self.channel is not None and self.channel.transport is not None
        # A socketpair end: a UNIX transport (a cast, not an adaptation: no runtime check).
        transport = cast(IUNIXTransport, self.channel.transport)
        self.conns[conn_id] = (listener, host, conn)
        transport.sendFileDescriptor(conn.fileno())
        transport.write(b"C %d %s %d\n" % (conn_id, listener.encode(),
                                                        conn.family))

    def send(self, line: bytes) -> None:
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.write(line + b"\n")

    def received(self, line: bytes) -> None:
        kind, _, rest = line.partition(b" ")
        pool = self.pool
        if kind == b"A":  # adopted: the worker has its own copy now
            entry = self.conns.get(int(rest))
            if entry is not None and entry[2] is not None:
                entry[2].close()
                self.conns[int(rest)] = (entry[0], entry[1], None)
        elif kind == b"X":
            pool.release(self, int(rest))
        elif kind == b"Q":
            pool.on_queued(StoredMessage.decode(rest))
            pool.check_flow()
        elif kind == b"m":
            name, args = json.loads(rest)
            if name in METRIC_EVENTS:
                getattr(pool.metrics, name)(*args)
        elif kind == b"L":
            pool.log_event(self, rest)
        elif kind == b"H":
            pool.worker_ready(self)
        elif kind == b"F":
            self.cannot_start = rest.decode("utf-8", "replace")

    def release_all(self) -> None:
        for conn_id in list(self.conns):
            self.pool.release(self, conn_id)


class WorkerPool(service.Service):
    """Starts, feeds, restarts and stops the SMTP worker processes."""

    def __init__(self, reactor: Any, count: int, addresses: frozenset[str],
                 counter: ConnectionCounter,
                 on_queued: Callable[[StoredMessage], None],
                 metrics: NullMetrics | None = None,
                 grace: float = 30.0, command: list[str] | None = None,
                 log_format: str | None = None,
                 on_worker_died: Callable[[], None] | None = None,
                 backlog: Callable[[], tuple[int, int]] | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.reactor = reactor
        self.count = count
        self.addresses = addresses
        # What workers start with: the configuration in force and the users it
        # read, never the file on disk, which may have changed since.
        self.snapshot = b""
        self.counter = counter
        self.on_queued = on_queued
        self.metrics = metrics if metrics is not None else NullMetrics()
        self.grace = grace
        self.command = command or [sys.executable, "-m", "relaygw.daemon.workers.process"]
        self.log_format = log_format  # set: workers write their log lines to our stdout
        self.on_worker_died = on_worker_died
        self.backlog = backlog  # (attempts in flight, attempts finished so far)
        # A worker that cannot start for a configuration reason would fail the same way
        # at every respawn: the daemon stops instead, with this reason.
        self.on_fatal = on_fatal
        self._served = False  # some worker has been ready since start-up
        self._flow_paused = False
        self._finished_seen = -1
        self._progress_at = 0.0
        self._flow_poll: Any = None
        self.listeners: set[HandoffListener] = set()
        self.workers: list[_Worker] = []
        self.generation = 0
        self._next_conn = 0
        self._turn = 0
        self._pause: dict[int, float] = {}  # index -> next respawn pause
        self._respawns: dict[int, Any] = {}  # index -> pending DelayedCall
        self._stopping = False
        self._generation_ready: Deferred | None = None

    # -- lifecycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._start_generation()

    def _start_generation(self) -> Deferred:
        """Deferred[bool]: True once all the new workers are ready, False if one of
        them ended before it was (it is started again meanwhile)."""
        if self._generation_ready is not None:  # superseded before it was ready
            previous, self._generation_ready = self._generation_ready, None
            previous.callback(False)
        self.generation += 1
        self._generation_ready = Deferred()
        ready = self._generation_ready
        for index in range(self.count):
            self._spawn(index, self.generation)
        return ready

    def restart(self, count: int, addresses: frozenset[str], snapshot: bytes) -> Deferred:
        """New workers with the configuration now in force; the old ones finish
        their sessions once the new ones are all ready (see worker_ready).
        Deferred[bool] as for _start_generation."""
        self.count = count
        self.addresses = addresses
        self.snapshot = snapshot
        self._cancel_respawns()
        try:
            return self._start_generation()
        except WorkerSpawnError as e:
            log.error("{reason}; the previous workers keep serving", reason=str(e),
                      event="worker_cannot_start")
            self._generation_done(False)
            return succeed(False)

    def _cancel_respawns(self) -> None:
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()

    def _generation_done(self, ok: bool) -> None:
        if self._generation_ready is not None:
            ready, self._generation_ready = self._generation_ready, None
            ready.callback(ok)

    def _spawn(self, index: int, generation: int) -> None:
        worker = _Worker(self, index, generation, self.addresses, self.snapshot)
        main_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            args = [*self.command, "--index", str(index), "--fd", "3"]
            if self.log_format is not None:
                args += ["--log-stdout", self.log_format]
            try:
                worker.process = self.reactor.spawnProcess(
                    _WorkerProcess(worker), self.command[0], args, env=dict(os.environ),
                    childFDs={1: 1, 2: 2, 3: worker_end.fileno()})
            except OSError as e:
                raise WorkerSpawnError(f"server.workers: cannot start a worker process "
                                       f"({self.command[0]}): {_why(e)}") from None
            self.reactor.adoptStreamConnection(main_end.fileno(), socket.AF_UNIX,
                                               ChannelFactory(worker.open_channel))
        finally:
            main_end.close()
            worker_end.close()
        worker.pid = worker.process.pid
        self.workers.append(worker)
        log.info("worker {index} started pid={pid}", index=index, pid=worker.pid,
                 event="worker_started")

    def worker_ready(self, worker: _Worker) -> None:
        worker.ready = True
        self._served = True
        current = [w for w in self.workers if w.generation == worker.generation]
        if worker.generation == self.generation and all(w.ready for w in current) \
                and len(current) >= self.count:
            for old in self.workers:
                if old.generation < worker.generation and not old.retired:
                    self._retire(old)
            self._generation_done(True)
        self.update_reading()

    def _retire(self, worker: _Worker, drain: bool = False) -> None:
        """No new clients for ``worker``. Its sessions go on to their natural end
        (after a reload), or finish their transactions within the grace (shutdown)."""
        worker.retired = True
        worker.send(b"D" if drain else b"R")

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        was_ready, worker.ready = worker.ready, False
        if worker in self.workers:
            self.workers.remove(worker)
        worker.release_all()
        code = getattr(reason.value, "exitCode", None)
        signal_number = getattr(reason.value, "signal", None)
        expected = worker.retired or self._stopping
        config_exit = not expected and code == EXIT_CONFIG \
            and worker.generation == self.generation
        # A worker that cannot start said why in its last line, perhaps not read yet:
        # its channel then stays open until that line and the end of it come in.
        awaiting = config_exit and worker.cannot_start is None and worker.channel is not None
        if worker.channel is not None and worker.channel.transport is not None \
                and not awaiting:
            worker.channel.transport.loseConnection()
        if expected and code == 0:
            log.info("worker {index} exited", index=worker.index, event="worker_exited")
        else:
            log.error("worker {index} pid={pid} ended unexpectedly: exit_code={exit_code} "
                      "signal={signal}", index=worker.index, pid=worker.pid,
                      exit_code=fields.text(code), signal=fields.text(signal_number),
                      event="worker_died")
        worker.exited.callback(None)
        self.update_reading()
        if not expected and self.on_worker_died is not None:
            self.on_worker_died()
        if config_exit:
            if awaiting:
                worker.reason_awaited = was_ready
                self.reactor.callLater(REASON_WAIT, self._reason_not_said, worker)
            else:
                self._cannot_start(worker, was_ready)
            return
        if not expected and worker.generation == self.generation:
            if not was_ready:
                self._generation_done(False)
            self._schedule_respawn(worker)

    def _reason_not_said(self, worker: _Worker) -> None:
        """The channel of a worker that ended with EXIT_CONFIG did not end: go on
        without its reason."""
        if worker.reason_awaited is not None:
            was_ready, worker.reason_awaited = worker.reason_awaited, None
            if worker.channel is not None and worker.channel.transport is not None:
                worker.channel.transport.loseConnection()
            self._cannot_start(worker, was_ready)

    def _cannot_start(self, worker: _Worker, was_ready: bool) -> None:
        """No respawn: it would fail the same way. At start-up (or a respawn) the daemon
        stops with the reason; a reload's new worker fails the reload, and the previous
        workers keep serving."""
        reason = (f"worker {worker.index} cannot start: "
                  f"{worker.cannot_start or f'exit code {EXIT_CONFIG}'}")
        reloading = self._generation_ready is not None and self._served
        if reloading:
            log.error("{reason}; the previous workers keep serving", reason=reason,
                      event="worker_cannot_start")
            if not was_ready:
                self._generation_done(False)
            return
        if self.on_fatal is not None:
            self.on_fatal(reason)
        else:
            log.error("{reason}; not started again", reason=reason, event="worker_cannot_start")

    def _schedule_respawn(self, worker: _Worker) -> None:
        lived = self.reactor.seconds() - worker.started
        pause = RESPAWN_FIRST if lived >= STABLE_AFTER else self._pause.get(worker.index,
                                                                            RESPAWN_FIRST)
        self._pause[worker.index] = min(pause * 2, RESPAWN_MAX)

        def respawn() -> None:
            self._respawns.pop(worker.index, None)
            if not self._stopping and worker.generation == self.generation:
                try:
                    self._spawn(worker.index, self.generation)
                except WorkerSpawnError as e:
                    if self.on_fatal is not None:
                        self.on_fatal(str(e))
                    else:
                        log.error("{reason}", reason=str(e), event="worker_cannot_start")

        self._respawns[worker.index] = self.reactor.callLater(pause, respawn)

    def stopService(self) -> Deferred:
        """Let every worker finish its sessions (the shutdown grace), then return."""
        super().stopService()
        self._stopping = True
        if self._flow_poll is not None and self._flow_poll.active():
            self._flow_poll.cancel()
        self._cancel_respawns()
        waits = []
        for worker in list(self.workers):
            self._retire(worker, drain=True)
            waits.append(worker.exited)
        if not waits:
            return succeed(None)
        killer = self.reactor.callLater(self.grace + KILL_MARGIN, self._kill_all)

        def done(_: Any) -> None:
            if killer.active():
                killer.cancel()

        return DeferredList(waits).addBoth(done)

    def _kill_all(self) -> None:
        for worker in self.workers:
            log.warn("worker {index} did not finish within the grace period; killing it",
                     index=worker.index)
            try:
                worker.process.signalProcess("KILL")
            except Exception:  # it ended meanwhile
                pass

    # -- connections ------------------------------------------------------------

    def check_flow(self) -> None:
        """Pause accepting while too much accepted mail waits for delivery."""
        if self.backlog is None:
            return
        waiting, finished = self.backlog()
        now = self.reactor.seconds()
        if finished != self._finished_seen:
            self._finished_seen, self._progress_at = finished, now
        moving = now - self._progress_at < FLOW_STALL
        if not self._flow_paused and waiting >= FLOW_HIGH and moving:
            self._flow_paused = True
            log.info("accepting paused: {n} messages wait for delivery", n=waiting,
                     event="flow_paused")
            self._flow_poll = self.reactor.callLater(FLOW_POLL, self._poll_flow)
            self.update_reading()
        elif self._flow_paused and (waiting <= FLOW_LOW or not moving):
            self._flow_paused = False
            log.info("accepting resumed: {n} messages wait for delivery", n=waiting,
                     event="flow_resumed")
            self.update_reading()

    def _poll_flow(self) -> None:
        self._flow_poll = None
        self.check_flow()
        if self._flow_paused and not self._stopping:
            self._flow_poll = self.reactor.callLater(FLOW_POLL, self._poll_flow)

    def serves(self, address: str) -> bool:
        """Whether a ready worker takes clients of the listener at ``address``."""
        return any(w.accepting and address in w.addresses for w in self.workers)

    def update_reading(self) -> None:
        """Read a listening socket only while a worker can take its clients."""
        for listener in self.listeners:
            if not self._stopping and not self._flow_paused and self.serves(listener.address):
                listener.resume()
            else:
                listener.pause()

    def _choose(self, address: str) -> _Worker | None:
        ready = [w for w in self.workers if w.accepting and address in w.addresses]
        if not ready:
            return None
        self._turn += 1
        least = min(len(w.conns) for w in ready)
        candidates = [w for w in ready if len(w.conns) == least]
        return candidates[self._turn % len(candidates)]

    def dispatch(self, listener: HandoffListener, conn: socket.socket, host: str) -> None:
        refusal = self.counter.acquire(host)
        if refusal is not None:
            self.metrics.connection_refused(
                "max_connections" if self.counter.total >= self.counter.max_total
                else "max_connections_per_client")
            log.info("connection refused client={client} reply={reply}", client=host,
                     reply=fields.text(str(refusal)), event="refused")
            _refuse(conn, refusal)
            return
        worker = self._choose(listener.address)
        if worker is None:
            self.counter.release(host)
            _refuse(conn, NO_WORKER)
            self.update_reading()
            return
        self._next_conn += 1
        try:
            worker.hand_over(self._next_conn, listener.address, conn, host)
        except Exception:
            log.failure("hand-over to worker {index} failed", index=worker.index)
            worker.conns.pop(self._next_conn, None)
            self.counter.release(host)
            conn.close()
            return
        self.metrics.connection_opened(listener.address, listener.listener.tls == "implicit")

    def release(self, worker: _Worker, conn_id: int) -> None:
        entry = worker.conns.pop(conn_id, None)
        if entry is None:
            return
        listener, host, conn = entry
        if conn is not None:
            conn.close()
        self.counter.release(host)
        self.metrics.connection_closed(listener)

    # -- logs -------------------------------------------------------------------

    def log_event(self, worker: _Worker, raw: bytes) -> None:
        event = json.loads(raw)
        if not isinstance(event, dict):
            return
        level = event.get("log_level")
        try:
            event["log_level"] = LogLevel.levelWithName(level) if level else LogLevel.info
        except Exception:
            event["log_level"] = LogLevel.info
        failure_text = event.pop("log_failure_text", None)
        if failure_text:
            event["traceback"] = failure_text
            event["log_format"] = (event.get("log_format") or "") + "\n{traceback}"
        event["worker"] = worker.index
        globalLogPublisher(event)


def _refuse(conn: socket.socket, reply: Reply) -> None:
    """Say the reply and close: a fresh socket's send buffer always takes one line."""
    try:
        conn.setblocking(False)
        conn.send(reply.to_bytes())
    except OSError:
        pass
    finally:
        conn.close()
