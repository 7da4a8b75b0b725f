"""An SMTP worker process: serves the sessions the main process hands it.

With ``[server] workers = N`` the main process keeps the listening sockets, the
connection caps, the queue and delivery; N of these processes run the SMTP
sessions, so accepting mail is not bound to one CPU core. A worker spools each
message itself (fsync before the 250, as always) and only then tells the main
process the message's envelope, so the main process never re-reads it; if that
report is lost with a crashed main process, the message is on disk and the next
start-up finds it, as after any crash.

The channel to the main process is a UNIX stream socket (fd 3); its messages
are listed in ``relaygw.daemon.workers.channel``.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import pickle
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import DeferredList
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw.config import Config
from relaygw.daemon import wiring
from relaygw.daemon.gc_tuning import quiet_garbage_collector
from relaygw.daemon.workers.channel import EXIT_CONFIG, MAX_LINE, ChannelFactory
from relaygw.observe.logs import FORMATS, message_text, observer_for, quiet
from relaygw.observe.null import NullMetrics
from relaygw.queue.service import FREE_SPACE_INTERVAL
from relaygw.queue.store import StoredMessage

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.worker")

CHANNEL_FD = 3
PR_SET_PDEATHSIG = 1


def encode_event(event: LogEvent) -> bytes:
    """A log event as one JSON line: what the main process's observers need.

    The message is formatted here: a value's text form (a quoted reply, an address
    in brackets; ``relaygw.observe.fields``) is lost once it is a JSON string, so
    the main process is given the text, as ``{log_text}``, beside the plain fields.
    """
    out: dict[str, Any] = {}
    for key, value in event.items():
        if key in ("log_logger", "log_source", "log_failure", "log_io", "log_trace",
                   "log_format", "log_text"):
            continue
        if key == "log_level":
            out[key] = getattr(value, "name", "info")
        elif value is None or isinstance(value, str | int | float | bool):
            out[key] = value
        else:
            out[key] = str(value)
    out["log_format"] = "{log_text}"
    out["log_text"] = message_text(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        try:
            out["log_failure_text"] = failure.getTraceback()
        except Exception:  # a Failure that cannot render must not lose the event
            out["log_failure_text"] = repr(failure.value)
    return json.dumps(out, ensure_ascii=True, separators=(",", ":"), default=str).encode()


class ForwardedMetrics(NullMetrics):
    """The inbound counters, reported to the main process that serves /metrics.

    Connection counts are the main process's own (it accepts and hands over).
    """

    def __init__(self, send: Callable[[bytes, bytes], None]) -> None:
        self._send = send

    def _event(self, name: str, *args: Any) -> None:
        self._send(b"m", json.dumps([name, args], separators=(",", ":")).encode())

    def message_accepted(self, size: int) -> None:
        self._event("message_accepted", size)

    def message_rejected(self, stage: str, code: int, enhanced: str | None) -> None:
        self._event("message_rejected", stage, code, enhanced)

    def tls_inbound(self, version: str | None) -> None:
        self._event("tls_inbound", version)


@implementer(IFileDescriptorReceiver)
class _Channel(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.fds: deque[int] = deque()

    def connectionMade(self) -> None:
        self.worker.channel_up(self)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.fds.append(descriptor)

    def lineReceived(self, line: bytes) -> None:
        kind, _, rest = line.partition(b" ")
        if kind == b"K":
            self.worker.configure(base64.b64decode(rest))
        elif kind == b"C":
            conn_id, listener, family = rest.split(b" ")
            fd = self.fds.popleft() if self.fds else -1
            self.worker.adopt(int(conn_id), listener.decode(), int(family), fd)
        elif kind == b"D":
            self.worker.drain()
        elif kind == b"R":
            self.worker.retire()

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        if self.transport is not None and self.connected:
            self.transport.write(kind + b" " + payload + b"\n")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        while self.fds:
            os.close(self.fds.popleft())
        self.worker.main_gone()


@implementer(ILogObserver)
class _ForwardLog:
    """Log events go to the main process, which writes the daemon's one log."""

    def __init__(self) -> None:
        self.channel: _Channel | None = None

    def __call__(self, event: LogEvent) -> None:
        if self.channel is not None and self.channel.connected:
            self.channel.send(b"L", encode_event(event))
        else:  # before the channel is up or after it is gone: stderr, as a last resort
            sys.stderr.write(encode_event(event).decode() + "\n")


@implementer(ILogObserver)
class _Direct:
    """Writes log lines to the standard output shared with the main process, tagged
    with the worker's index (a field in JSON lines). Lines with a traceback can be
    longer than a pipe writes in one piece (PIPE_BUF), so those go to the main
    process, which writes them whole."""

    def __init__(self, observer: ILogObserver, index: int, forward: _ForwardLog) -> None:
        self.observer = observer
        self.index = index
        self.forward = forward

    def __call__(self, event: LogEvent) -> None:
        if "log_failure" in event and self.forward.channel is not None:
            self.forward(event)
            return
        event["worker"] = self.index
        self.observer(event)


class Worker:
    """One worker's sessions, spool writer and channel."""

    def __init__(self, index: int, reactor: Any, logger: _ForwardLog) -> None:
        self.index = index
        self.reactor = reactor
        self.logger = logger
        self.config: Config | None = None
        self.channel: _Channel | None = None
        self.draining = False
        self.retiring = False
        self.exit_code = 0
        self._exited = False
        self.sessions: dict[str, wiring.Sessions] = {}  # by listener address
        self.spool_pool = wiring.spool_pool()
        self.auth_pool = wiring.auth_pool()
        self._free_space = LoopingCall(self._refresh_free_space)
        self._free_space.clock = reactor

    def start(self, channel_fd: int) -> None:
        """Connect to the main process; its first message is the configuration."""
        self.reactor.adoptStreamConnection(channel_fd, socket.AF_UNIX,
                                           ChannelFactory(lambda: _Channel(self)))
        os.close(channel_fd)

    def configure(self, snapshot: bytes) -> None:
        """Build the sessions for the main process's configuration, then say ready."""
        if self.config is not None:
            return
        # From our parent over our own socketpair: trusted as the parent is.
        setup = pickle.loads(snapshot)  # noqa: S301
        assert isinstance(setup, wiring.WorkerSetup)
        self.config = setup.config
        try:
            self.spool, self.sessions = wiring.build_worker_front(
                setup, self.reactor, spool_threads=self.spool_pool,
                auth_threads=self.auth_pool, metrics=ForwardedMetrics(self._send),
                hand_off=self._queued, on_session_end=self._closed)
        except wiring.StartupError as e:
            reason = " / ".join(str(e).splitlines())
            log.error("worker {index} cannot start: {error}", index=self.index, error=reason)
            # The main process stops the daemon with this reason rather than start
            # workers that fail the same way, again and again.
            self._send(b"F", reason.encode("utf-8", "backslashreplace"))
            self.exit_code = EXIT_CONFIG
            self.draining = True
            self._exit()
            return
        self.spool_pool.start()
        self.auth_pool.start()
        self._free_space.start(FREE_SPACE_INTERVAL, now=True)
        quiet_garbage_collector()
        self._send(b"H", str(os.getpid()).encode())

    def _refresh_free_space(self) -> None:
        self.spool.refresh_free_space().addErrback(
            lambda f: log.failure("spool: cannot read free space", f))

    def _send(self, kind: bytes, payload: bytes = b"") -> None:
        if self.channel is not None:
            self.channel.send(kind, payload)

    def channel_up(self, channel: _Channel) -> None:
        self.channel = channel
        self.logger.channel = channel

    def adopt(self, conn_id: int, listener: str, family: int, fd: int) -> None:
        try:
            sessions = self.sessions.get(listener)
            if fd < 0 or sessions is None or self.draining or self.retiring:
                raise ValueError(f"cannot take connection {conn_id} for {listener}")
            sessions.factory.next_tag = conn_id  # given back to _closed when it ends
            self.reactor.adoptStreamConnection(fd, family, sessions.outer)
        except Exception:
            log.failure("worker {index}: connection hand-over failed", index=self.index)
            self._send(b"A", b"%d" % conn_id)
            self._send(b"X", b"%d" % conn_id)
        else:
            self._send(b"A", b"%d" % conn_id)
        finally:
            if fd >= 0:
                os.close(fd)

    def _closed(self, conn_id: object) -> None:
        assert isinstance(conn_id, int)  # the tag adopt() gave the session
        self._send(b"X", b"%d" % conn_id)
        if self.retiring and not self.draining and not self._sessions():
            self._exit()

    def _sessions(self) -> int:
        return sum(len(s.factory.sessions) for s in self.sessions.values())

    def retire(self) -> None:
        """A reload replaced this worker: the sessions go on to their end, then exit."""
        self.retiring = True
        if not self._sessions() and not self.draining:
            self.draining = True
            self._exit()

    def _queued(self, stored: StoredMessage) -> None:
        self._send(b"Q", stored.encode())

    def drain(self) -> None:
        """Finish the open sessions (up to the shutdown grace), then exit."""
        if self.draining:
            return
        self.draining = True
        grace = self.config.server.shutdown_grace if self.config is not None else 0.0
        done = [s.factory.drain(grace) for s in self.sessions.values()]
        DeferredList(done, consumeErrors=True).addBoth(lambda _: self._exit())

    def main_gone(self) -> None:
        """The main process is gone (it crashed, or was killed): so are we, at once,
        as one process would be. Clients that had no 250 send again; finishing
        sessions now would queue mail that no running main process knows of."""
        self.logger.channel = None
        self.channel = None
        if not self.draining:
            self.draining = True
            self._exit()

    def _exit(self) -> None:
        if self._exited:
            return
        self._exited = True
        if self._free_space.running:
            self._free_space.stop()
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        # Joins the spool threads: a commit in progress finishes first.
        self.spool_pool.stop()
        self.auth_pool.stop()
        self.reactor.stop()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the main process dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the channel's end tells us instead
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relaygw-worker",
                                     description="relaygw SMTP worker (started by relaygw)")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--fd", type=int, default=CHANNEL_FD)
    parser.add_argument("--log-stdout", choices=FORMATS, default=None,
                        help="write log lines to standard output (shared with the main "
                             "process) in this format, instead of sending them to it")
    args = parser.parse_args(argv)
    _die_with_parent(os.getppid())
    logger = _ForwardLog()
    observer: ILogObserver = logger
    if args.log_stdout is not None:
        observer = _Direct(observer_for(args.log_stdout, sys.stdout), args.index, logger)
    globalLogBeginner.beginLoggingTo([quiet(observer)], discardBuffer=True,
                                     redirectStandardIO=False)
    from twisted.internet import reactor as global_reactor

    # The global reactor's declared type is a narrow interface; it is a full reactor.
    reactor: Any = global_reactor
    worker = Worker(args.index, reactor, logger)
    # The main process decides about reloads; a terminal's signals to the whole
    # process group mean "stop", which for a worker is: finish the sessions.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # SIGUSR1 reopens the main process's log file; to a worker (a signal to the whole
    # group) it means nothing, rather than its default: the end of the process.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: reactor.callFromThread(worker.drain))
    worker.start(args.fd)
    reactor.run(installSignalHandlers=False)
    return worker.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
