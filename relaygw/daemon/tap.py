"""The twistd plugin's module (``twistd relaygw``, ``relaygw run``): options and
``makeService``, a thin shell over the wiring and the service, and the process's
end when start-up fails: one line naming the cause, exit status 1."""

from __future__ import annotations

import atexit
import os
import pwd
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, NoReturn

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from relaygw.config import ConfigError, load
from relaygw.daemon.listeners import ListenError
from relaygw.daemon.service import RelayService, build_service
from relaygw.daemon.wiring import StartupError
from relaygw.observe.logs import configure_twistd

log = Logger(namespace="relaygw.tap")

EXIT_FAILED = 1
_exit_status = 0  # EXIT_FAILED once a fatal failure stopped the daemon


class Options(usage.Options):
    synopsis = "[--config PATH]"
    optParameters = [  # noqa: N815 - Twisted's name
        ["config", "c", None,
         "TOML configuration file (default: $RELAYGW_CONFIG, else /etc/relaygw/relaygw.toml "
         "when it exists, else built-in, data in ./relaygw-data)"],
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
        self.run_as = _run_as(server_options)


def _logs_to_stdout(server_options: Mapping[str, Any]) -> bool:
    """Whether twistd writes the log to standard output, where worker processes can
    write their own lines (they inherit it) instead of sending them here to format."""
    logfile = server_options.get("logfile")
    logger = server_options.get("logger")
    if server_options.get("syslog") or (logger and not logger.startswith("relaygw.observe.")):
        return False
    return logfile == "-" or (bool(server_options.get("nodaemon")) and not logfile)


def _run_as(server_options: Mapping[str, Any]) -> tuple[int, int] | None:
    """The (uid, gid) twistd switches to (-u/-g), as twistd completes them: a uid
    without a gid takes that user's group."""
    uid, gid = server_options.get("uid"), server_options.get("gid")
    if uid is None and gid is None:
        return None
    if uid is None:
        uid = os.geteuid()
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = os.getegid()
    return uid, gid


def _refuse_to_start(problems: list[str]) -> NoReturn:
    print("relaygw: invalid configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    raise SystemExit(EXIT_FAILED)


def _say(line: str) -> None:
    """One line on the standard error relaygw was started with (twistd has replaced
    sys.stderr by the log by now; the log gets its own line)."""
    stream = sys.__stderr__
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):  # a daemon's stderr may be gone
        pass


def _exit_failed() -> None:
    """At interpreter exit, after twistd has cleaned up: exit status 1. twistd's own
    exit status is 0 whenever its reactor stopped, whatever stopped it."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_exit_status)


def exit_status() -> int:
    """0, or EXIT_FAILED after a fatal failure stopped the daemon."""
    return _exit_status


def stop_failed(reason: str) -> None:
    """A running daemon cannot go on (a worker cannot start): say why on stderr (the log
    has it already), stop, and exit with status 1."""
    global _exit_status
    from twisted.internet import reactor

    _say(f"relaygw: {reason}")
    if _exit_status == 0:
        _exit_status = EXIT_FAILED
        atexit.register(_exit_failed)
    if reactor.running:
        reactor.stop()
    else:  # still starting (a worker ended at once): stop as soon as it runs
        reactor.callWhenRunning(reactor.stop)


class _Process(service.MultiService):
    """The daemon as twistd runs it. A start-up failure, before or after the privilege
    drop, ends the process: one line naming the cause, on stderr and in the log, exit
    status 1; otherwise twistd prints a traceback and the thread pools already started
    keep the process alive, listening but never greeting."""

    def __init__(self, relay: RelayService,
                 server_options: MutableMapping[str, Any] | None = None) -> None:
        super().__init__()
        self.relay = relay
        self.server_options = server_options if server_options is not None else {}
        relay.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except (StartupError, ListenError) as e:
            self._failed(str(e))
        except Exception as e:  # a bug: its traceback goes to the log, one line to stderr
            log.failure("start-up failed")
            self._failed(f"cannot start: {type(e).__name__}: {e}", logged=True)

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as e:
            self._failed(str(e))
        except Exception as e:
            log.failure("start-up failed")
            self._failed(f"cannot start: {type(e).__name__}: {e}", logged=True)

    def _failed(self, reason: str, logged: bool = False) -> NoReturn:
        self.relay.abandon()
        for line in reason.splitlines():
            if not logged:
                log.critical("relaygw: {reason}", reason=line, event="startup_failed")
            _say(f"relaygw: {line}")
        # A daemonizing twistd's parent waits for a status from us (its own is written
        # only for an exception, which would also print a traceback): "1 why" makes it
        # print the reason and exit 1.
        pipe = self.server_options.get("statusPipe")
        if pipe is not None:
            self.server_options["statusPipe"] = None
            first = reason.splitlines()[0] if reason else "start-up failed"
            try:
                os.write(pipe, b"1 " + f"relaygw: {first}".encode()[:98])
                os.close(pipe)
            except OSError:
                pass
        raise SystemExit(EXIT_FAILED)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    try:
        relay = build_service(options.config, reactor,
                              worker_log=getattr(options, "worker_log", None),
                              run_as=getattr(options, "run_as", None), on_fatal=stop_failed)
    except StartupError as e:
        for line in str(e).splitlines():
            print(f"relaygw: {line}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None
    return _Process(relay, options.parent)
