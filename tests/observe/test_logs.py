"""Tests for relaygw.observe.logs: JSON lines with stable fields, the text format, redaction,
and the twistd hooks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from twisted.application.app import AppLogger
from twisted.application.service import ServiceMaker
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher, textFileLogObserver
from twisted.logger._legacy import publishToNewObserver
from twisted.python import usage
from twisted.python.log import textFromEventDict
from twisted.python.reflect import namedAny
from twisted.scripts import twistd

import relaygw.observe.logs
from relaygw.observe import fields
from relaygw.observe.logs import (
    configure_twistd,
    event_as_dict,
    is_noise,
    json_logger,
    json_observer,
    observer_for,
    redact,
)
from tests.support.log_lines import assert_json_has_the_text_fields, split_text_line

SMTP = "relaygw.smtp.server"
MAILLOG = "relaygw.maillog"


def emitted(namespace: str, emit: Any) -> list[dict[str, Any]]:
    """Runs ``emit(logger)`` against a JSON observer; each line parsed, times checked."""
    stream = io.StringIO()
    log = Logger(namespace=namespace, observer=LogPublisher(json_observer(stream)))
    before = time.time()
    emit(log)
    after = time.time()
    text = stream.getvalue()
    assert "\x1e" not in text  # JSON lines, not RFC 7464 sequences
    assert text.endswith("\n")
    out = []
    for line in text.splitlines():
        obj = json.loads(line)
        stamp = obj.pop("time")
        assert stamp.endswith("Z") and len(stamp) == len("2024-05-01T12:00:00.123Z")
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        assert before - 0.001 <= when <= after
        out.append(obj)
    return out


# -- representative events, exactly -----------------------------------------------------------

def test_inbound_session_events() -> None:
    # The calls of relaygw.smtp.server and relaygw.receive.cleanup, as written there.
    def emit(log: Logger) -> None:
        log.info("connect session={session} client={client} port={port} tls={tls}",
                 session="5e55104a11ce", client="192.0.2.7", port=40000, tls=fields.NONE,
                 event="connect")
        log.info("auth session={session} client={client} user={user}", session="5e55104a11ce",
                 client="192.0.2.7", user=fields.text("alice"), event="auth")
        log.info("rejected session={session} client={client} helo={helo} from={sender} "
                 "to={rcpt} stage={stage} reply={reply}", session="5e55104a11ce",
                 client="192.0.2.7", helo=fields.text("client.example"),
                 sender=fields.address("a@example.org"), rcpt=fields.address("c@elsewhere.example"),
                 stage="rcpt", reply=fields.text("554 5.7.1 Relay access denied"),
                 event="rejected")
        log.info("accepted id={queue_id} session={session} from={sender} size={size} "
                 "nrcpt={nrcpt} message_id={message_id} client={client} tls={tls} auth={auth}",
                 queue_id="4XYZ0001", session="5e55104a11ce", sender=fields.address(""),
                 size=2048, nrcpt=2, message_id=fields.text("<1@client.example>"),
                 client="192.0.2.7", tls=fields.tls("TLSv1.3 TLS_AES_256_GCM_SHA384"),
                 auth=fields.text("alice"), event="accepted")
        log.info("disconnect session={session} client={client} tls={tls} auth={auth}",
                 session="5e55104a11ce", client="192.0.2.7", tls=fields.tls(None),
                 auth=fields.text(None), event="disconnect")
        log.info("timeout session={session} client={client}", session="5e55104a11ce",
                 client="192.0.2.7", event="timeout")

    assert emitted(SMTP, emit) == [
        {"level": "info", "namespace": SMTP, "event": "connect",
         "message": "connect session=5e55104a11ce client=192.0.2.7 port=40000 tls=none",
         "session": "5e55104a11ce", "client": "192.0.2.7", "port": 40000, "tls": "none"},
        {"level": "info", "namespace": SMTP, "event": "auth",
         "message": "auth session=5e55104a11ce client=192.0.2.7 user=alice",
         "session": "5e55104a11ce", "client": "192.0.2.7", "user": "alice"},
        {"level": "info", "namespace": SMTP, "event": "rejected",
         "message": "rejected session=5e55104a11ce client=192.0.2.7 helo=client.example "
                    "from=<a@example.org> to=<c@elsewhere.example> stage=rcpt "
                    'reply="554 5.7.1 Relay access denied"',
         "session": "5e55104a11ce", "client": "192.0.2.7", "helo": "client.example",
         "sender": "a@example.org", "rcpt": "c@elsewhere.example", "stage": "rcpt",
         "reply": "554 5.7.1 Relay access denied"},
        {"level": "info", "namespace": SMTP, "event": "accepted",
         "message": "accepted id=4XYZ0001 session=5e55104a11ce from=<> size=2048 nrcpt=2 "
                    "message_id=<1@client.example> client=192.0.2.7 "
                    "tls=TLSv1.3/TLS_AES_256_GCM_SHA384 auth=alice",
         "queue_id": "4XYZ0001", "session": "5e55104a11ce", "sender": "", "size": 2048,
         "nrcpt": 2, "message_id": "<1@client.example>", "client": "192.0.2.7",
         "tls": "TLSv1.3/TLS_AES_256_GCM_SHA384", "auth": "alice"},
        {"level": "info", "namespace": SMTP, "event": "disconnect",
         "message": "disconnect session=5e55104a11ce client=192.0.2.7 tls=none auth=none",
         "session": "5e55104a11ce", "client": "192.0.2.7", "tls": "none", "auth": "none"},
        {"level": "info", "namespace": SMTP, "event": "timeout",
         "message": "timeout session=5e55104a11ce client=192.0.2.7",
         "session": "5e55104a11ce", "client": "192.0.2.7"},
    ]


def test_maillog_events() -> None:
    # The calls of relaygw.queue.manager, as written there.
    def emit(maillog: Logger) -> None:
        maillog.info(
            "attempt id={queue_id} to={rcpt} route={route} relay={relay} tls={tls} "
            "delay={delay} duration={duration} status={status} reply={reply}",
            queue_id="4XYZ0001", rcpt=fields.address("b@example.net"),
            route=fields.text("routes[1]"), relay=fields.text("mx.example.net[192.0.2.25]:25"),
            tls=fields.tls("TLSv1.3"), delay=round(1.23456, 2), duration=round(0.5, 2),
            status="sent", reply=fields.text("250 2.0.0 Ok"), event="attempt")
        maillog.info("bounced id={queue_id} dsn_id={dsn_id} from={sender} rcpts={rcpts}",
                     queue_id="4XYZ0001", dsn_id="4XYZ0002", sender=fields.address("a@example.org"),
                     rcpts=fields.addresses(["c@example.net", "d@example.net"]), event="bounced")
        maillog.info("removed id={queue_id} ({why})", queue_id="4XYZ0001", why="done",
                     event="removed")

    assert emitted(MAILLOG, emit) == [
        {"level": "info", "namespace": MAILLOG, "event": "attempt",
         "message": "attempt id=4XYZ0001 to=<b@example.net> route=routes[1] "
                    "relay=mx.example.net[192.0.2.25]:25 tls=TLSv1.3 delay=1.23 "
                    'duration=0.5 status=sent reply="250 2.0.0 Ok"',
         "queue_id": "4XYZ0001", "rcpt": "b@example.net", "route": "routes[1]",
         "relay": "mx.example.net[192.0.2.25]:25", "tls": "TLSv1.3", "delay": 1.23,
         "duration": 0.5, "status": "sent", "reply": "250 2.0.0 Ok"},
        {"level": "info", "namespace": MAILLOG, "event": "bounced",
         "message": "bounced id=4XYZ0001 dsn_id=4XYZ0002 from=<a@example.org> "
                    "rcpts=c@example.net,d@example.net",
         "queue_id": "4XYZ0001", "dsn_id": "4XYZ0002", "sender": "a@example.org",
         "rcpts": "c@example.net,d@example.net"},
        {"level": "info", "namespace": MAILLOG, "event": "removed",
         "message": "removed id=4XYZ0001 (done)", "queue_id": "4XYZ0001", "why": "done"},
    ]


def test_every_text_pair_is_a_json_field_with_the_same_value() -> None:
    events: list[dict[str, Any]] = []
    log = Logger(namespace=SMTP, observer=events.append)
    log.info("rejected session={session} client={client} helo={helo} from={sender} "
             "rcpts={rcpts} stage={stage} reply={reply}", session="0123456789ab",
             client="2001:db8::7", helo=fields.text("[IPv6:2001:db8::7]"),
             sender=fields.address('"john doe"@example.org'),
             rcpts=fields.addresses(["b@example.net", "c@example.net"]), stage="data",
             reply=fields.text('554 5.4.6 Too many hops "loop"\\ \r\n'), event="rejected")
    text, json_out = io.StringIO(), io.StringIO()
    for event in events:
        observer_for("text", text)(dict(event))
        observer_for("json", json_out)(dict(event))
    (line,) = text.getvalue().splitlines()
    (record,) = [json.loads(x) for x in json_out.getvalue().splitlines()]
    _, message = split_text_line(line)
    assert message == record["message"]
    assert message == (
        'rejected session=0123456789ab client=2001:db8::7 helo=[IPv6:2001:db8::7] '
        'from="<\\"john doe\\"@example.org>" rcpts=b@example.net,c@example.net stage=data '
        'reply="554 5.4.6 Too many hops \\"loop\\"\\\\ \\r\\n"')
    assert assert_json_has_the_text_fields(record) == {
        "session": "0123456789ab", "client": "2001:db8::7", "helo": "[IPv6:2001:db8::7]",
        "from": '<"john doe"@example.org>', "rcpts": "b@example.net,c@example.net",
        "stage": "data", "reply": '554 5.4.6 Too many hops "loop"\\ \r\n'}
    assert record["sender"] == '"john doe"@example.org'


def test_plain_log_lines_failures_and_odd_values() -> None:
    def emit(log: Logger) -> None:
        log.warn("tls: using self-signed {cert}", cert="/spool/tls/cert.pem")
        log.info("odd {path} {pair}", path=Path("/x"), pair=("a", 1), raw=b"\x00",
                 ratio=float("nan"), limit=float("inf"), time="not mine",
                 message="nor this", namespace="nor this", event=5)
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            log.failure("spool write failed id={queue_id}", queue_id="4XYZ0003")

    warn, odd, failure = emitted("relaygw.daemon.service", emit)
    assert warn == {"level": "warn", "namespace": "relaygw.daemon.service", "event": "log",
                    "message": "tls: using self-signed /spool/tls/cert.pem",
                    "cert": "/spool/tls/cert.pem"}
    # Objects, tuples and bytes only in the message; NaN and infinity as strings; the
    # fixed names are never overwritten; a non-string event is no event.
    assert odd == {"level": "info", "namespace": "relaygw.daemon.service", "event": "log",
                   "message": "odd /x ('a', 1)", "ratio": "nan", "limit": "inf"}
    traceback = failure.pop("traceback")
    assert failure == {"level": "critical", "namespace": "relaygw.daemon.service", "event": "log",
                       "message": "spool write failed id=4XYZ0003", "queue_id": "4XYZ0003",
                       "error": "OSError: [Errno 28] No space left on device"}
    assert traceback.startswith("Traceback (most recent call last):")
    assert "No space left on device" in traceback


def test_one_line_per_event_even_with_newlines_and_non_ascii() -> None:
    def emit(log: Logger) -> None:
        log.info("reply={reply}", reply="550 5.1.1 no\r\nsuch user", event="rejected")
        log.info("from=<{sender}>", sender="jörg@bücher.example\udcff", event="accepted")

    stream = io.StringIO()
    emit(Logger(namespace=SMTP, observer=LogPublisher(json_observer(stream))))
    lines = stream.getvalue().split("\n")
    assert len(lines) == 3 and lines[2] == ""
    assert lines[0].isascii() and lines[1].isascii()
    assert json.loads(lines[0])["reply"] == "550 5.1.1 no\r\nsuch user"
    assert json.loads(lines[1])["sender"] == "jörg@bücher.example\udcff"


def test_legacy_events() -> None:
    events: list[dict[str, Any]] = []
    legacy = {"message": ("twistd 26.10 starting up.",), "time": 1700000000.5,
              "system": "-", "isError": 0}
    publishToNewObserver(events.append, legacy, textFromEventDict)
    assert event_as_dict(events[0]) == {
        "time": "2023-11-14T22:13:20.500Z", "level": "info", "namespace": "log_legacy",
        "event": "log", "message": "twistd 26.10 starting up."}


def test_fixed_time_and_level() -> None:
    event = {"log_format": "hello {who}", "who": "world", "log_time": 0.0001,
             "log_level": LogLevel.error, "log_namespace": "x", "log_logger": object()}
    assert event_as_dict(event) == {"time": "1970-01-01T00:00:00.000Z", "level": "error",
                                    "namespace": "x", "event": "log", "message": "hello world",
                                    "who": "world"}


# -- secrets ---------------------------------------------------------------------------------

def test_redact() -> None:
    fields = {"user": "alice", "password": "p", "Password": "p", "smarthost_password": "p",
              "secret": "s", "client_secret": "s", "credentials": "c", "authorization": "a",
              "Authorization": "a", "passwd": "p", "queue_id": "Q"}
    assert redact(fields) == {"user": "alice", "queue_id": "Q"}
    assert fields["password"] == "p"  # a copy; the event itself is untouched


def careless_auth_events(log: Logger) -> None:
    """What server.py logs on AUTH, plus the mistakes redaction must catch."""
    log.info("auth client={client} user={user}", client="192.0.2.7", user="alice",
             event="auth")
    log.info("auth failed client={client} user={user} password={password}",
             client="192.0.2.7", user="alice", password="hunter2", event="auth")
    log.info("sasl {credentials}", credentials="AGFsaWNlAGh1bnRlcjI=", secret="hunter2",
             authorization="Basic aHVudGVyMg==")
    log.info("{missing} {password}", password="hunter2")  # unformattable: shows the event


def test_auth_events_never_carry_the_password_in_json() -> None:
    stream = io.StringIO()
    careless_auth_events(Logger(namespace=SMTP, observer=LogPublisher(json_observer(stream))))
    text = stream.getvalue()
    for secret in ("hunter2", "AGFsaWNlAGh1bnRlcjI=", "aHVudGVyMg=="):
        assert secret not in text
    ok, failed, sasl, broken = [json.loads(line) for line in text.splitlines()]
    assert "password" not in ok and "password" not in failed
    assert failed["message"] == "auth failed client=192.0.2.7 user=alice password=[redacted]"
    assert failed["user"] == "alice"
    assert sasl["message"] == "sasl [redacted]"
    assert not {"credentials", "secret", "authorization"} & set(sasl)
    assert broken["message"].startswith("Unable to format event")


def test_auth_events_never_carry_the_password_in_text() -> None:
    stream = io.StringIO()
    careless_auth_events(Logger(namespace=SMTP,
                                observer=LogPublisher(observer_for("text", stream))))
    text = stream.getvalue()
    for secret in ("hunter2", "AGFsaWNlAGh1bnRlcjI=", "aHVudGVyMg=="):
        assert secret not in text
    assert "auth client=192.0.2.7 user=alice\n" in text
    assert "password=[redacted]" in text


# -- the text format and the switch ----------------------------------------------------------

def test_text_format_is_twisteds() -> None:
    ours, theirs = io.StringIO(), io.StringIO()
    event = {"log_format": "accepted id={queue_id}", "queue_id": "Q1", "log_time": 1e9,
             "log_level": LogLevel.info, "log_namespace": SMTP}
    observer_for("text", ours)(dict(event))
    textFileLogObserver(theirs)(dict(event))
    assert ours.getvalue() == theirs.getvalue()
    assert ours.getvalue().endswith(" [relaygw.smtp.server#info] accepted id=Q1\n")


def test_observer_for() -> None:
    stream = io.StringIO()
    observer = observer_for("json", stream)
    assert ILogObserver.providedBy(observer)
    assert ILogObserver.providedBy(observer_for("text", stream))
    observer({"log_format": "x", "log_time": 1.0, "log_level": LogLevel.info, "event": "e"})
    assert json.loads(stream.getvalue())["event"] == "e"
    with pytest.raises(ValueError, match=r"log format must be one of text, json \(got 'xml'\)"):
        observer_for("xml", stream)


def test_json_logger_writes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    observer = json_logger()
    assert ILogObserver.providedBy(observer)
    observer({"log_format": "hi {n}", "n": 1, "log_time": 1.0, "log_level": LogLevel.info,
              "log_namespace": "t"})
    assert json.loads(capsys.readouterr().out) == {
        "time": "1970-01-01T00:00:01.000Z", "level": "info", "namespace": "t",
        "event": "log", "message": "hi 1", "n": 1}


def test_json_logger_under_twistd_applogger() -> None:
    # twistd --logger relaygw.observe.logs.json_logger, in a child so the global log stays ours.
    code = (
        "from twisted.application import app, service\n"
        "from twisted.logger import Logger\n"
        "from twisted.python import log as legacy\n"
        "import relaygw.observe.logs\n"
        "logger = app.AppLogger({'logger': relaygw.observe.logs.json_logger})\n"
        "logger.start(service.Application('relaygw'))\n"
        "Logger(namespace='relaygw.maillog').info('removed id={queue_id} ({why})',"
        " queue_id='Q1', why='done', event='removed')\n"
        "legacy.msg('legacy hello')\n"
        "logger.stop()\n"
    )
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["message"].startswith("twistd ")
    removed = next(line for line in lines if line["event"] == "removed")
    assert (removed["queue_id"], removed["why"]) == ("Q1", "done")
    assert any(line["message"] == "legacy hello" for line in lines)
    assert lines[-1]["message"] == "Server Shut Down."


# -- configure_twistd ------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _restore_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relaygw.observe.logs, "_twistd_destination", (None, True))


def server_options(**given: Any) -> dict[str, Any]:
    return {"logger": None, "logfile": None, "nodaemon": False, "syslog": False, **given}


def factory_of(options: dict[str, Any]) -> Any:
    assert options["logger"] == "relaygw.observe.logs.twistd_json_logger"
    return namedAny(options["logger"])  # what twistd's ServerOptions.postOptions does


def test_configure_twistd_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    for given in ({"nodaemon": True}, {"nodaemon": True, "logfile": "-"}):
        options = server_options(**given)
        configure_twistd(options, "json")
        observer = factory_of(options)()
        observer({"log_format": "x", "log_time": 1.0, "log_level": LogLevel.info})
        assert json.loads(capsys.readouterr().out)["message"] == "x"


def test_configure_twistd_json_to_the_logfile(tmp_path: Path) -> None:
    path = tmp_path / "relaygw.log"
    options = server_options(logfile=str(path))
    configure_twistd(options, "json")
    observer = factory_of(options)()
    try:
        observer({"log_format": "to file", "log_time": 1.0, "log_level": LogLevel.info})
        observer({"log_format": "Main loop terminated.", "log_time": 1.0,
                  "log_level": LogLevel.info, "log_namespace": "twisted.internet.base"})
    finally:
        observer.observer._outFile.close()
    assert [json.loads(line)["message"] for line in path.read_text().splitlines()] == ["to file"]


def test_configure_twistd_text_to_syslog_is_twistds_own_observer_without_the_noise(
        ) -> None:
    options = server_options(syslog=True)
    configure_twistd(options, "text")
    assert options == server_options(syslog=True,
                                     logger="relaygw.observe.logs.twistd_own_logger")


def test_configure_twistd_leaves_explicit_loggers_alone() -> None:
    options = server_options(logger="relaygw.observe.logs.json_logger")
    configure_twistd(options, "json")
    assert options["logger"] == "relaygw.observe.logs.json_logger"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_log_file_moved_away_is_reopened_at_its_path(tmp_path: Path,
                                                       log_format: str) -> None:
    path = tmp_path / "relaygw.log"
    options = server_options(logfile=str(path))
    configure_twistd(options, log_format)
    observer = namedAny(options["logger"])()
    try:
        observer({"log_format": "before", "log_time": 1.0, "log_level": LogLevel.info})
        path.rename(tmp_path / "relaygw.log.1")  # what logrotate does, then it signals
        observer({"log_format": "moved", "log_time": 2.0, "log_level": LogLevel.info})
        relaygw.observe.logs.reopen_log_files()
        observer({"log_format": "after", "log_time": 3.0, "log_level": LogLevel.info})
    finally:
        observer_file(observer).close()
    assert [message_of(line, log_format)
            for line in (tmp_path / "relaygw.log.1").read_text().splitlines()] == [
        "before", "moved"]
    assert [message_of(line, log_format) for line in path.read_text().splitlines()] == [
        "after"]
    assert path.stat().st_mode & 0o777 == 0o640
    assert relaygw.observe.logs._log_files == []


def test_a_log_file_that_cannot_be_reopened_keeps_the_old_one(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    log_file = relaygw.observe.logs.ReopenableLogFile(str(directory / "relaygw.log"))
    try:
        log_file.write("one\n")
        (directory / "relaygw.log").rename(tmp_path / "moved.log")
        directory.rmdir()  # nowhere to make the new file
        log_file.reopen()
        log_file.write("two\n")
    finally:
        log_file.close()
    assert (tmp_path / "moved.log").read_text() == (
        f"one\nrelaygw: cannot reopen the log file {directory / 'relaygw.log'}: "
        "No such file or directory; logging goes on here\ntwo\n")


def observer_file(observer: Any) -> Any:
    while not hasattr(observer, "_outFile"):
        observer = observer.observer  # the secret-masking wrapper
    return observer._outFile


def message_of(line: str, log_format: str) -> str:
    if log_format == "json":
        return json.loads(line)["message"]
    return line.split("] ", 1)[1]


def test_configure_twistd_refusals() -> None:
    with pytest.raises(usage.UsageError, match=r"--log-format must be one of text, json"):
        configure_twistd(server_options(), "xml")
    with pytest.raises(usage.UsageError, match="JSON logs cannot go to --syslog"):
        configure_twistd(server_options(syslog=True), "json")
    options = server_options(logfile="-")  # a daemon cannot log to stdout
    configure_twistd(options, "json")
    with pytest.raises(SystemExit):
        factory_of(options)()


class _PluginOptions(usage.Options):
    """What tap.Options does with --log-format."""

    optParameters = [["log-format", None, None, "text or json"]]  # noqa: N815

    def postOptions(self) -> None:  # noqa: N802
        configure_twistd(self.parent if self.parent is not None else {},
                         self["log-format"] or "text")


Options = _PluginOptions  # this module doubles as the plugin's module for ServiceMaker


@pytest.mark.parametrize(("argv", "factory"), [
    (["--nodaemon", "relaygw", "--log-format", "json"], "twistd_json_logger"),
    (["--logfile", "relaygw.log", "relaygw", "--log-format", "json"], "twistd_json_logger"),
    (["--nodaemon", "relaygw"], "twistd_text_logger"),  # text on stdout: the fast formatter
    # A text log file is relaygw's too: SIGUSR1 reopens it (twistd's own renames itself).
    (["--logfile", "relaygw.log", "relaygw"], "twistd_text_logger"),
    # Text to syslog: twistd's own observer, less the noise.
    (["--syslog", "relaygw"], "twistd_own_logger"),
    (["--nodaemon", "--logger", "relaygw.observe.logs.json_logger", "relaygw",
      "--log-format", "json"], "json_logger"),
])
def test_configure_twistd_through_twistds_own_option_parsing(argv: list[str],
                                                             factory: str | None) -> None:
    plugin = ServiceMaker("relaygw", __name__, "test", "relaygw")

    class ServerOptions(twistd.ServerOptions):
        def _getPlugins(self, interface: Any) -> list[Any]:  # noqa: N802
            return [plugin]

    options = ServerOptions()
    options.parseOptions(argv)
    chosen = AppLogger(options)._observerFactory
    if factory is None:
        assert chosen is None
    else:
        assert chosen is getattr(relaygw.observe.logs, factory)
    with pytest.raises(usage.UsageError, match="JSON logs cannot go to --syslog"):
        ServerOptions().parseOptions(["--syslog", "relaygw", "--log-format", "json"])


# -- the fast formatting is Twisted's formatting ---------------------------------------------

class _Odd:
    def __format__(self, spec: str) -> str:
        return f"odd<{spec}>"


class _Broken:
    def __str__(self) -> str:
        raise RuntimeError("no text")

    __format__ = object.__format__


def _failure() -> Any:
    from twisted.python.failure import Failure

    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        return Failure()


FORMAT_CASES = [
    {"log_format": "accepted id={queue_id} from=<{sender}> size={size} tls={tls}",
     "queue_id": "Q1", "sender": "", "size": 12, "tls": None},
    {"log_format": "no fields at all"},
    {"log_format": ""},
    {"log_format": "{{braces}} {x} }}{{", "x": 1.5},
    {"log_format": "multi\nline {x}\nend", "x": "a\nb"},
    {"log_format": "{missing} here"},
    {"log_format": "{x!r} {y:>5} {z.real} {f()} {0}", "x": "a", "y": 7, "z": 3, "f": lambda: 9},
    {"log_format": "{x}", "x": _Odd()},
    {"log_format": "{x}", "x": _Broken()},
    {"log_format": "unbalanced {x"},
    {"log_format": b"bytes {x}", "x": 1},
    {"log_format": 5},
    {"log_format": "x", "log_failure": _failure()},
    {"log_format": "", "log_failure": _failure()},
    {"message": ("legacy",), "isError": 0},
    {"log_format": "{x}", "x": "ünïcode \udc80"},
]


@pytest.mark.parametrize("case", FORMAT_CASES)
@pytest.mark.parametrize("extra", [
    {"log_time": 1e9 + 0.25, "log_level": LogLevel.info, "log_namespace": SMTP},
    {"log_time": 1e9 + 0.9999996, "log_level": LogLevel.warn, "log_namespace": "x"},
    {"log_time": 1.0, "log_system": "sys"},
    {"log_system": _Broken()},
    {"log_namespace": None},
    {},
])
def test_fast_formatting_matches_twisted(case: dict, extra: dict) -> None:
    from twisted.logger import formatEvent

    from relaygw.observe.logs import classic_text, format_event

    event = {**case, **extra}
    assert format_event(dict(event)) == formatEvent(dict(event))
    for _ in range(2):  # parsed once, then from the cache
        ours, theirs = io.StringIO(), io.StringIO()
        observer_for("text", ours)(dict(event))
        textFileLogObserver(theirs)(dict(event))
        assert ours.getvalue() == theirs.getvalue()
    assert classic_text(dict(event)) == (theirs.getvalue() or None)


def test_time_stamps_follow_the_clock_across_seconds() -> None:
    from twisted.logger import formatTime

    from relaygw.observe.logs import _format_time

    for when in (1e9, 1e9 + 0.5, 1e9 + 1.0, 1e9 + 0.9999999, 1e9 + 61.2, 1e9 + 0.1, None, -1.5):
        assert _format_time(when) == formatTime(when)


# -- Twisted's noise -------------------------------------------------------------------------

def _twisted_chatter() -> list[dict[str, Any]]:
    """The lines Twisted itself logs while relaygw starts and stops, made by Twisted's code."""
    from twisted.application.app import AppLogger
    from twisted.internet import protocol, tcp, unix
    from twisted.logger import capturedLogs
    from twisted.python import log as legacy

    with capturedLogs() as events:
        AppLogger({})._initialLog()  # "twistd ... starting up." and "reactor class: ..."
        Logger(namespace="twisted.internet.base").info("Main loop terminated.")
        factory = protocol.Factory()
        factory.noisy = True
        factory.doStart()
        factory.doStop()
        port = tcp.Port(0, factory, interface="127.0.0.1")
        port._realPortNumber = 2525
        legacy.msg(f"{port._getLogPrefix(factory)} starting on 2525")  # tcp.Port.startListening
        port._logConnectionLostMsg()
        unix.Port("/spool/control.sock", factory)._logConnectionLostMsg()
        legacy.msg("_ControlFactory starting on '/spool/control.sock'")
        legacy.msg("Starting protocol <twisted.internet.protocol.Protocol object>")
        Logger(namespace="twisted.internet.base").info("Received SIGTERM, shutting down.")
        Logger(namespace="relaygw.tap").info("listening on {address} tls={tls} auth={auth}",
                                             address="127.0.0.1:2525", tls="starttls",
                                             auth="optional")
        # A relaygw line and a Twisted error that look like the noise stay.
        Logger(namespace="relaygw.control").info("Main loop terminated. {x}", x=1)
        legacy.msg("Site starting on 8080", isError=1)
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            legacy.err(None, "Port 25 starting on fire")
    return events


def test_twisteds_noise_is_left_out_of_text_and_json_lines() -> None:
    events = _twisted_chatter()
    text, json_out = io.StringIO(), io.StringIO()
    for event in events:
        observer_for("text", text)(dict(event))
        observer_for("json", json_out)(dict(event))
    messages = [split_text_line(line)[1] for line in text.getvalue().splitlines()
                if not line.startswith("\t")]
    assert [json.loads(line)["message"].split("\n")[0]
            for line in json_out.getvalue().splitlines()] == messages
    assert [m for m in messages if not m.startswith("twistd ")] == [
        "Received SIGTERM, shutting down.",
        "listening on 127.0.0.1:2525 tls=starttls auth=optional",
        "Main loop terminated. 1",
        "Site starting on 8080",
        "Port 25 starting on fire",
    ]
    assert messages[0].startswith("twistd ") and messages[0].endswith(" starting up.")
    assert [is_noise(e) for e in events].count(True) == 9


def test_noise_is_recognised_by_twisteds_formats_and_legacy_texts_only() -> None:
    assert is_noise({"log_format": "Main loop terminated.", "log_namespace": "x"})
    assert is_noise({"log_format": "{log_text}", "log_text": "(UDP Port 53 Closed)",
                     "log_namespace": "log_legacy"})
    assert is_noise({"message": ("Site starting on 9325",), "log_namespace": "log_legacy"})
    assert not is_noise({"log_format": "{log_text}", "log_text": "(UDP Port 53 Closed)",
                         "log_namespace": "relaygw.smtp.server"})
    assert not is_noise({"message": ("Site starting on 9325",), "isError": 1,
                         "log_namespace": "log_legacy"})
    assert not is_noise({"message": (), "log_namespace": "log_legacy"})
    assert not is_noise({"log_format": "Main loop terminated twice."})
