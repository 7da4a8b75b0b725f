"""The control socket: how the ``relaygw`` command talks to the running daemon.

A UNIX stream socket at ``<spool_dir>/control.sock``, mode 0600 (in the spool directory,
itself 0700). JSON lines: one request per line, ``{"cmd": "queue.list", "args": {...}}``,
answered in order by one line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "no such message: ABC"}`` (plus ``"unknown": ["ABC"]`` when the
error is unknown queue ids).

Commands and their arguments:

``queue.list``     sender, recipient_domain, route, older_than (all optional filters,
                   see :func:`relaygw.queue.inspect.matches`) → list of summaries
``queue.show``     id, body (bool) → details
``queue.flush``, ``queue.hold``, ``queue.release``, ``queue.delete``, ``queue.bounce``
                   ids (non-empty list), or all (true) with the filters of queue.list
                   (every message that queue.list would show) → ids acted on
``reload``         (none) → {"config": path or null, "problems": [...]}

The server runs in the daemon's reactor (:class:`ControlService`); the client (:func:`call`)
is a plain blocking socket for the command line, which has no reactor.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from relaygw.delivery.courier import MessageContent
from relaygw.observe import fields
from relaygw.queue.inspect import (
    check_route,
    details,
    matches,
    parse_age,
    read_content,
    summarise,
)
from relaygw.queue.manager import QueuedMessage, UnknownMessage
from relaygw.queue.store import StoredMessage

__all__ = ["SOCKET_NAME", "ControlError", "ControlService", "DaemonNotRunning", "call",
           "socket_path"]

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 1024 * 1024  # bytes in one request line
LIST_FILTERS = ("sender", "recipient_domain", "route", "older_than")
ACTIONS = ("queue.flush", "queue.hold", "queue.release", "queue.delete", "queue.bounce")


def socket_path(spool_dir: Path) -> Path:
    return Path(spool_dir) / SOCKET_NAME


class ControlError(Exception):
    """The daemon could not be asked, or gave no usable answer."""


class DaemonNotRunning(ControlError):  # noqa: N818 - reads as the condition it reports
    """No daemon answers on the control socket."""

    def __init__(self, path: Path, stale: bool = False) -> None:
        self.path = Path(path)
        self.stale = stale
        where = (f"nothing answers on the control socket {path}" if stale
                 else f"no control socket at {path}")
        super().__init__(f"the daemon is not running ({where})")


class BadRequestError(Exception):
    """A request the server cannot act on; the message is sent back as the error."""


class _Queue(Protocol):
    """What the control socket needs of the QueueManager (its actions are looked up by
    name: flush, hold, release, delete, bounce)."""

    @property
    def clock(self) -> Any: ...

    def messages(self) -> list[QueuedMessage]: ...

    def message(self, queue_id: str) -> QueuedMessage | None: ...

    def flush(self, ids: list[str] | None = None) -> list[str]: ...


class _Spool(Protocol):
    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]: ...

    def content(self, stored: StoredMessage) -> MessageContent: ...


# -- client ----------------------------------------------------------------------------------


def call(socket_path: Path, cmd: str, args: dict[str, Any] | None = None,
         timeout: float = 30.0) -> dict[str, Any]:
    """Send one request and return the daemon's response dict (``ok`` and ``result`` or
    ``error``). Blocking; ``timeout`` bounds each wait on the socket.

    Raises DaemonNotRunning when the socket is missing or nothing answers on it, and
    ControlError for other failures (permission denied, timeout, no answer).
    """
    path = str(socket_path)
    request = json.dumps({"cmd": cmd, "args": args or {}}, ensure_ascii=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise DaemonNotRunning(socket_path) from None
        except ConnectionRefusedError:
            raise DaemonNotRunning(socket_path, stale=True) from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (run as the user relaygw runs "
                               "as)") from None
        except TimeoutError:
            raise ControlError(f"{path}: the daemon did not accept within {timeout:g}s")\
                from None
        except OSError as e:
            if e.errno in (errno.ENOTSOCK, errno.ECONNREFUSED):
                raise DaemonNotRunning(socket_path, stale=True) from None
            raise ControlError(f"{path}: {e.strerror or e}") from None
        try:
            s.sendall(request.encode("utf-8") + b"\n")
            chunks: list[bytes] = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise ControlError("the daemon closed the connection without answering")
                end = chunk.find(b"\n")
                if end != -1:
                    chunks.append(chunk[:end])
                    break
                chunks.append(chunk)
        except TimeoutError:
            raise ControlError(f"no answer from the daemon within {timeout:g}s") from None
        except OSError as e:
            raise ControlError(f"control socket: {e.strerror or e}") from None
    try:
        response = json.loads(b"".join(chunks))
    except ValueError as e:
        raise ControlError(f"unreadable answer from the daemon: {e}") from None
    if not isinstance(response, dict) or "ok" not in response:
        raise ControlError("unreadable answer from the daemon")
    return response


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the UNIX socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


# -- server ----------------------------------------------------------------------------------


class _ControlProtocol(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self._answered: Deferred = succeed(None)  # answers go out in request order

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.connections.discard(self)

    def lineReceived(self, line: bytes) -> None:
        def answer(_: Any) -> Deferred:
            return self.factory.control.handle_line(line).addCallback(self._send)

        self._answered.addCallback(answer)

    def _send(self, response: dict[str, Any]) -> None:
        try:
            line = json.dumps(response, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            log.error("control: cannot encode a response: {error}", error=str(e))
            line = json.dumps({"ok": False, "error": f"internal error: {e}"}).encode()
        self.sendLine(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._send({"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
        if self.transport is not None:
            self.transport.loseConnection()


class _ControlFactory(Factory):
    protocol = _ControlProtocol
    noisy = False

    def __init__(self, control: ControlService) -> None:
        self.control = control
        self.connections: set[_ControlProtocol] = set()


class ControlService(service.Service):
    """Serves the control protocol on a UNIX socket while the daemon runs.

    ``manager`` is the QueueManager, ``spool`` its Spool (for reading message content in
    its thread pool), ``config_source()`` the configuration in force (routes for the
    ``route`` filter), ``reload()`` re-reads the configuration: Deferred[list[str]] of
    problems, empty when applied. "Now" is the manager's clock.
    """

    name = "control"

    def __init__(self, socket_path: Path, manager: _Queue, spool: _Spool,
                 config_source: Callable[[], Any], reload: Callable[[], Deferred],
                 reactor: Any) -> None:
        self.socket_path = Path(socket_path)
        self.manager = manager
        self.spool = spool
        self.config_source = config_source
        self.reload = reload
        self.reactor = reactor
        self.factory = _ControlFactory(self)
        self.port: Any = None

    # -- life cycle ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        path = self.socket_path
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("control: cannot use {path}: {error}; no control socket",
                      path=str(path), error=e.strerror)
            return
        else:
            if not stat.S_ISSOCK(mode):
                log.error("control: {path} exists and is not a socket; no control socket",
                          path=str(path))
                return
            if _answers(path):
                log.error("control: another relaygw answers on {path}; no control socket "
                          "(mail is still served)", path=str(path))
                return
            log.info("control: removed stale socket {path}", path=str(path))
            path.unlink(missing_ok=True)
        # Twisted chmods the socket to 0600 between bind() and listen(): nobody can connect
        # before that (and the spool directory is 0700 anyway). No umask games: the umask is
        # process-wide and disk threads may be creating files.
        try:
            self.port = self.reactor.listenUNIX(str(path), self.factory, mode=0o600)
        except CannotListenError as e:
            log.error("control: cannot listen on {path}: {error}", path=str(path),
                      error=str(e.socketError))
        else:
            log.info("control socket {path}", path=str(path))

    def stopService(self) -> Deferred | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None  # not ours: leave whatever is at the path alone
        for connection in list(self.factory.connections):
            if connection.transport is not None:
                connection.transport.loseConnection()
        d = maybeDeferred(port.stopListening)

        def remove(_: Any) -> None:
            try:  # Twisted removes it too when the port closes
                self.socket_path.unlink()
            except FileNotFoundError:
                pass

        return d.addCallback(remove)

    # -- requests ------------------------------------------------------------------------

    def handle_line(self, line: bytes) -> Deferred:
        """Deferred[dict]: the response to one request line; never fails."""
        try:
            request = json.loads(line)
        except ValueError as e:
            return succeed({"ok": False, "error": f"not a JSON request: {e}"})
        return self.handle(request)

    def handle(self, request: Any) -> Deferred:
        """Deferred[dict]: the response to one decoded request; never fails."""
        d = maybeDeferred(self._dispatch, request)
        d.addCallbacks(lambda result: {"ok": True, "result": result}, self._error,
                       errbackArgs=(request,))
        return d

    def _error(self, failure: Failure, request: Any) -> dict[str, Any]:
        if isinstance(failure.value, UnknownMessage):
            return {"ok": False, "error": str(failure.value), "unknown": failure.value.ids}
        if failure.check(BadRequestError):
            return {"ok": False, "error": str(failure.value)}
        log.failure("control: request failed request={request}", failure,
                    request=fields.text(json.dumps(request, default=str)))
        return {"ok": False, "error": f"internal error: {failure.getErrorMessage()}"}

    def _dispatch(self, request: Any) -> Any:
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            raise BadRequestError('a request is {"cmd": NAME, "args": {...}}')
        cmd = request["cmd"]
        args = request.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise BadRequestError(f"{cmd}: args must be an object")
        if cmd == "queue.list":
            return self._list(cmd, args)
        if cmd == "queue.show":
            return self._show(cmd, args)
        if cmd in ACTIONS:
            _only(cmd, args, ("ids", "all", *LIST_FILTERS))
            action = getattr(self.manager, cmd.split(".", 1)[1])
            filters = {k: v for k, v in args.items() if k in LIST_FILTERS}
            if args.get("all") is True:
                if args.get("ids"):
                    raise BadRequestError(f"{cmd}: give ids or all, not both")
                # Exactly the messages queue.list shows with the same filters.
                return action([row["id"] for row in self._list(cmd, filters)])
            if filters:
                raise BadRequestError(f"{cmd}: filters need all")
            return action(_ids(cmd, args))
        if cmd == "reload":
            _only(cmd, args, ())
            return self._reload()
        raise BadRequestError(f"unknown command: {cmd}")

    def _now(self) -> float:
        return self.manager.clock.seconds()

    def _list(self, cmd: str, args: dict[str, Any]) -> list[dict[str, Any]]:
        _only(cmd, args, LIST_FILTERS)
        filters = {k: v for k, v in args.items() if v is not None}
        config = self.config_source()
        for key, value in filters.items():
            if key == "older_than":
                if not isinstance(value, str | int | float) or isinstance(value, bool):
                    raise BadRequestError(f"{cmd}: older_than must be a number or a string")
                try:
                    parse_age(value)
                except ValueError as e:
                    raise BadRequestError(f"{cmd}: older_than: {e}") from None
            elif not isinstance(value, str):
                raise BadRequestError(f"{cmd}: {key} must be a string")
            elif key == "route":
                try:
                    check_route(value, config)  # against the configuration in force
                except ValueError as e:
                    raise BadRequestError(str(e)) from None
        now = self._now()
        messages = sorted((m for m in self.manager.messages() if not m.deleted),
                          key=lambda m: (m.stored.envelope.arrived, m.queue_id))
        rows = []
        for message in messages:
            row = summarise(message.stored.envelope, message.state, message.stored.size, now,
                            config)
            if matches(row, **filters):
                rows.append(row)
        return rows

    def _show(self, cmd: str, args: dict[str, Any]) -> Deferred:
        _only(cmd, args, ("id", "body"))
        queue_id = args.get("id")
        if not isinstance(queue_id, str) or not queue_id:
            raise BadRequestError(f"{cmd}: id must be a queue id")
        body = bool(args.get("body", False))
        queued = self.manager.message(queue_id)
        if queued is None or queued.deleted:
            raise UnknownMessage([queue_id])
        stored = queued.stored
        d = self.spool.run(read_content, self.spool.content(stored), body)

        def build(content: tuple[bytes, bytes | None]) -> dict[str, Any]:
            headers, message = content
            # The state as it is now, after the read (an attempt may have ended meanwhile).
            state = (self.manager.message(queue_id) or queued).state
            return details(stored.envelope, state, stored.size, self._now(), headers,
                           message, self.config_source())

        def gone(failure: Failure) -> Failure:
            failure.trap(FileNotFoundError)  # finished while we read
            raise UnknownMessage([queue_id])

        return d.addCallbacks(build, gone)

    def _reload(self) -> Deferred:
        d = maybeDeferred(self.reload)

        def done(problems: list[str]) -> dict[str, Any]:
            source = self.config_source().source_path
            return {"config": None if source is None else str(source),
                    "problems": list(problems)}

        return d.addCallback(done)


def _only(cmd: str, args: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise BadRequestError(f"{cmd}: unknown argument {', '.join(unknown)}")


def _ids(cmd: str, args: dict[str, Any]) -> list[str]:
    ids = args.get("ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise BadRequestError(f"{cmd}: ids must be a non-empty list of queue ids")
    return list(dict.fromkeys(ids))  # each once, in the order given
