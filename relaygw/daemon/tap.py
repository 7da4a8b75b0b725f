"""The twistd plugin's module (``twistd relaygw``, ``relaygw run``): options and
``makeService``, a thin shell over the wiring and the service."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from twisted.application import service
from twisted.python import usage

from relaygw.config import ConfigError, load
from relaygw.daemon.service import build_service
from relaygw.daemon.wiring import StartupError
from relaygw.observe.logs import configure_twistd


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


def _logs_to_stdout(server_options: Mapping[str, Any]) -> bool:
    """Whether twistd writes the log to standard output, where worker processes can
    write their own lines (they inherit it) instead of sending them here to format."""
    logfile = server_options.get("logfile")
    logger = server_options.get("logger")
    if server_options.get("syslog") or (logger and not logger.startswith("relaygw.observe.")):
        return False
    return logfile == "-" or (bool(server_options.get("nodaemon")) and not logfile)


def _refuse_to_start(problems: list[str]) -> NoReturn:
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
