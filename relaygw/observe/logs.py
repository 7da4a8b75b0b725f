"""Log output formats: Twisted's text lines, or one JSON object per line.

The events are the same in both formats: ``twisted.logger`` events whose
keyword fields carry the data (``queue_id``, ``client``, ``rcpt``, ...) and whose
``event`` field names the kind (connect, accepted, attempt, bounced, ...).

JSON lines, deliberately not RFC 7464: Twisted's ``jsonFileLogObserver`` writes
JSON text sequences, each record led by an ASCII RS (``\\x1e``) and carrying
Twisted's internal keys; log shippers (Vector, Fluent Bit, Loki, journald
tooling) want plain newline-delimited JSON with flat, stable field names.

The observers made here keep secrets out: a field named like one (``redact``)
never reaches the output, not even through a format string that names it.
twistd's own text observer (what "text" to a file or syslog means under twistd)
has no such guard; there the code's rule holds alone: never pass a password to a
log call.

Every observer made here, and twistd's own when ``configure_twistd`` chose it, also
drops Twisted's own chatter (``is_noise``): ports starting and closing, "Main loop
terminated.", factories starting and stopping. relaygw logs what an operator needs
of these itself ("listening on", "control socket").

Use with twistd:
    ``twistd --logger relaygw.observe.logs.json_logger -n relaygw ...``   (stdout)
or let ``[log] format`` / ``--log-format`` choose: the plugin's options call
``configure_twistd`` before twistd sets up logging.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import string
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

FORMATS = ("text", "json")
REDACTED = "[redacted]"
# A field whose name contains one of these never appears in a log line.
SECRET_WORDS = ("password", "passwd", "secret", "credential", "authorization")
# Always set by json_line; a keyword field of the same name is dropped.
FIXED_FIELDS = ("time", "level", "namespace", "event", "message")
# Bookkeeping keys of events that come through twisted.python.log (legacy), where
# "message" is a tuple of strings and "why" the text of log.err.
_LEGACY_KEYS = frozenset(("message", "time", "system", "isError", "format", "why", "failure",
                          "logLevel", "printed"))


@functools.lru_cache(maxsize=4096)  # field names repeat: every event asks about each
def is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` without any field named like a secret (password, secret, credentials, ...)."""
    return {key: value for key, value in fields.items() if not is_secret(key)}


# -- Twisted's noise ----------------------------------------------------------------------------

# Format strings of Twisted's own lines (new-style events), whatever their namespace.
_NOISE_FORMATS = frozenset((
    "Main loop terminated.",
    "reactor class: {reactor}.",
    "Starting factory {factory!r}",
    "Stopping factory {factory!r}",
))
# Lines of twisted.python.log (legacy events): listening ports, client protocols.
_NOISE_TEXT = re.compile(
    r"\S.* starting on \S.*"
    r"|\((?:TCP |UDP |UNIX |UNIX Datagram )?Port \S.* Closed\)"
    r"|(?:Starting|Stopping) protocol \S.*", re.DOTALL)


def is_noise(event: LogEvent) -> bool:
    """Whether ``event`` is one of Twisted's own lines that say nothing to an operator."""
    log_format = event.get("log_format")
    if isinstance(log_format, str) and log_format in _NOISE_FORMATS:
        return True
    if event.get("log_namespace") != "log_legacy" or "log_failure" in event \
            or event.get("isError"):
        return False
    text = event.get("log_text")
    if not isinstance(text, str):
        message = event.get("message")
        if not isinstance(message, tuple) or not message:
            return False
        text = " ".join(str(m) for m in message)
    return _NOISE_TEXT.fullmatch(text) is not None


def _masked(event: LogEvent) -> LogEvent:
    """The event with secret-named fields replaced, so formatting cannot reveal them."""
    if not any(is_secret(key) for key in event):
        return event
    return {key: REDACTED if is_secret(key) else value for key, value in event.items()}


def message_text(event: LogEvent) -> str:
    """The event's message as the text and JSON lines show it, secrets masked."""
    return format_event(_masked(event))


# -- formatting: Twisted's output, faster ------------------------------------------------------
#
# twisted.logger formats every event through string.Formatter with a wrapper object
# per field, which costs more than the rest of logging a line. The formats relaygw
# logs are plain "{name}" fields, so each format string is parsed once and such
# events are formatted directly; anything else ("{a.b}", "{f()}", "{x:>5}",
# conversions, missing fields, failures) is left to Twisted. Either way the text
# is exactly Twisted's (the tests compare the two).

_PARSED_LIMIT = 512  # distinct format strings kept parsed (relaygw has a few dozen)
_Parsed = tuple[tuple[str, str | None], ...]
_parsed: dict[str, _Parsed | None] = {}


def _parse(log_format: str) -> _Parsed | None:
    """(literal, field name or None) pairs, or None when a field is not a plain name."""
    try:
        parts = list(string.Formatter().parse(log_format))
    except ValueError:
        return None
    out = []
    for literal, name, spec, conversion in parts:
        if name is not None and (not name.isidentifier() or spec or conversion):
            return None
        out.append((literal, name))
    return tuple(out)


def format_event(event: LogEvent) -> str:
    """What ``twisted.logger.formatEvent`` returns for ``event``."""
    log_format = event.get("log_format")
    if type(log_format) is not str or "log_flattened" in event:
        return formatEvent(event)
    if log_format in _parsed:
        parsed = _parsed[log_format]
    else:
        parsed = _parse(log_format)
        if len(_parsed) < _PARSED_LIMIT:
            _parsed[log_format] = parsed
    if parsed is None:
        return formatEvent(event)
    pieces = []
    try:
        for literal, name in parsed:
            pieces.append(literal)
            if name is not None:
                pieces.append(format(event[name], ""))
    except BaseException:  # a missing field, a value that cannot format: Twisted's text
        return formatEvent(event)
    return "".join(pieces)


_stamp: tuple[int, str] = (-1, "")


def _format_time(when: float | None) -> str:
    """``twisted.logger.formatTime`` in its default format (RFC 3339, whole seconds),
    computed once per second."""
    global _stamp
    if when is None:
        return "-"
    second = int(when)
    # Near the end of a second, fromtimestamp may round up into the next one.
    if when < 0 or when - second >= 0.999999:
        return formatTime(when)
    if _stamp[0] != second:
        _stamp = (second, formatTime(when))
    return _stamp[1]


def classic_text(event: LogEvent) -> str | None:
    """What ``textFileLogObserver`` writes for ``event``: ``"{time} [{system}] {message}"``
    and a newline, continuation lines indented with a tab."""
    if "log_failure" in event:
        return formatEventAsClassicLogText(event, formatTime=formatTime)
    text = format_event(event)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    else:
        try:
            system = str(system)
        except Exception:
            system = "UNFORMATTABLE"
    line = f"{_format_time(event.get('log_time'))} [{system}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def _plain(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _iso_utc(timestamp: float) -> str:
    text = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def event_as_dict(event: LogEvent) -> dict[str, Any]:
    """The flat JSON object for one event (see the module docstring for the fields)."""
    event = _masked(event)
    level = event.get("log_level")
    kind = event.get("event")
    out: dict[str, Any] = {
        "time": _iso_utc(event.get("log_time") or time.time()),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace") or "-",
        "event": kind if isinstance(kind, str) and kind else "log",
        "message": format_event(event),
    }
    legacy = "isError" in event and isinstance(event.get("message"), tuple)
    for key, value in event.items():
        if key.startswith("log_") or key in FIXED_FIELDS or is_secret(key) \
                or (legacy and key in _LEGACY_KEYS):
            continue
        if not _plain(value):
            continue  # objects, tuples, bytes: the message text shows them
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # NaN and Infinity are not JSON
        out[key] = value
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["error"] = f"{getattr(failure.type, '__name__', failure.type)}: " \
                       f"{failure.getErrorMessage()}"
        try:
            out["traceback"] = failure.getTraceback()
        except Exception:  # a Failure that cannot render must not lose the event
            pass
    return out


def json_line(event: LogEvent) -> str:
    # ensure_ascii: client-supplied text may hold lone surrogates, and stdout may be ASCII.
    return json.dumps(event_as_dict(event), ensure_ascii=True, separators=(",", ":"),
                      default=str) + "\n"


@implementer(ILogObserver)
class _Quiet:
    """Passes on every event but Twisted's noise."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        if not is_noise(event):
            self.observer(event)


def quiet(observer: ILogObserver) -> ILogObserver:
    """``observer`` without Twisted's noise lines (``is_noise``)."""
    return _Quiet(observer)


def json_observer(stream: IO[str]) -> ILogObserver:
    """Writes each event to ``stream`` as one JSON object on one line, and flushes."""
    return _Quiet(FileLogObserver(stream, json_line))


@implementer(ILogObserver)
class _Redacting:
    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        if not is_noise(event):
            self.observer(_masked(event))


def observer_for(format: str, stream: IO[str]) -> ILogObserver:
    """"text": Twisted's classic text lines; "json": JSON lines. Secrets are masked in both,
    and Twisted's noise is left out."""
    if format == "json":
        return json_observer(stream)
    if format == "text":
        return _Redacting(FileLogObserver(stream, classic_text))
    raise ValueError(f"log format must be one of {', '.join(FORMATS)} (got {format!r})")


def json_logger() -> ILogObserver:
    """For ``twistd --logger relaygw.observe.logs.json_logger``: JSON lines on stdout, no config."""
    return json_observer(sys.stdout)


class ReopenableLogFile:
    """A log file that ``reopen`` opens again at its path: logrotate moves the file,
    then SIGUSR1 makes relaygw write to a new one there. It never rotates by itself
    (twistd's own log file renames itself every megabyte, which fights logrotate).
    Lines are written whole under a lock: threads log too."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()
        self._file = self._open()
        _log_files.append(self)

    def _open(self) -> IO[str]:
        # 0640: log lines carry addresses. O_APPEND: whole lines, even beside another writer.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> None:
        with self._lock:
            self._file.write(text)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def reopen(self) -> None:
        """Continue in a file opened afresh at the path; on failure, in the old one."""
        with self._lock:
            try:
                new = self._open()
            except OSError as e:
                self._file.write(f"relaygw: cannot reopen the log file {self.path}: "
                                 f"{e.strerror or e}; logging goes on here\n")
                self._file.flush()
                return
            old, self._file = self._file, new
            old.close()

    def close(self) -> None:
        with self._lock:
            self._file.close()
        if self in _log_files:
            _log_files.remove(self)


_log_files: list[ReopenableLogFile] = []


def reopen_log_files() -> None:
    """Reopen every log file (SIGUSR1, after logrotate moved them); none: nothing."""
    for log_file in _log_files:
        log_file.reopen()


# Where twistd would have written its text log: (--logfile, --nodaemon), recorded by
# configure_twistd. Module state because twistd's --logger is a dotted name it imports
# and calls without arguments, and its logging is process-wide anyway.
_twistd_destination: tuple[str | None, bool] = (None, True)


def _twistd_stream() -> IO[str]:
    """Where twistd would have written its text log: stdout with -n, else --logfile or
    twistd.log, opened here so that SIGUSR1 reopens it."""
    logfile, nodaemon = _twistd_destination
    if logfile == "-" or (nodaemon and not logfile):
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")  # twistd's own words
        return sys.stdout
    return ReopenableLogFile(logfile or "twistd.log")  # type: ignore[return-value]


def twistd_json_logger() -> ILogObserver:
    """The ``--logger`` that ``configure_twistd`` names for JSON lines where twistd would
    have written text."""
    return json_observer(_twistd_stream())


def twistd_text_logger() -> ILogObserver:
    """The ``--logger`` that ``configure_twistd`` names for text: twistd's own line
    format, through the cheaper formatter here (and with secrets masked), to stdout or
    to a log file that SIGUSR1 reopens."""
    return observer_for("text", _twistd_stream())


# The twistd options its own observer is made from, recorded by configure_twistd.
_twistd_options: Mapping[str, Any] = {}


def twistd_own_logger() -> ILogObserver:
    """The ``--logger`` that ``configure_twistd`` names for text to a file or syslog:
    the observer twistd itself would make (its format, its SIGUSR1 rotation, syslog),
    made the way twistd makes it, without Twisted's noise."""
    from twisted.scripts.twistd import _SomeApplicationRunner

    own = _SomeApplicationRunner.loggerFactory(_twistd_options)._getLogObserver()
    if not ILogObserver.providedBy(own):  # syslog's observer is a legacy one
        own = LegacyLogObserverWrapper(own)
    return quiet(own)


def configure_twistd(server_options: MutableMapping[str, Any], format: str) -> None:
    """Make twistd log ``format``; call from the plugin's ``postOptions``.

    twistd options come before the plugin name, so they are parsed by then, and
    twistd imports its ``logger`` option (a dotted name) only afterwards, so
    setting it here takes effect. A ``--logger`` on the command line wins. A log
    file, text or JSON, is relaygw's own (SIGUSR1 reopens it, for logrotate); text
    to syslog keeps twistd's own observer, only without Twisted's noise.
    """
    global _twistd_destination, _twistd_options
    if format not in FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)} "
                               f"(got {format!r})")
    if server_options.get("logger"):
        return
    if format == "text":
        if not server_options.get("syslog"):
            _twistd_destination = (server_options.get("logfile"),
                                   bool(server_options.get("nodaemon")))
            server_options["logger"] = f"{__name__}.twistd_text_logger"
        else:
            _twistd_options = server_options
            server_options["logger"] = f"{__name__}.twistd_own_logger"
        return
    if server_options.get("syslog"):
        raise usage.UsageError("JSON logs cannot go to --syslog; use --logfile or -n")
    _twistd_destination = (server_options.get("logfile"), bool(server_options.get("nodaemon")))
    server_options["logger"] = f"{__name__}.twistd_json_logger"

