"""The control protocol, in process: the request handler over a real QueueManager and
on-disk spool, and the UNIX socket with the blocking client."""

from __future__ import annotations

import email
import json
import os
import random
import socket
import stat
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from relaygw.config import parse_config
from relaygw.daemon.control import (
    ControlError,
    ControlService,
    DaemonNotRunning,
    call,
    socket_path,
)
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.queue.inspect import iso
from relaygw.queue.manager import QueueManager
from relaygw.queue.store import new_queue_id
from relaygw.results import transient
from relaygw.testing import SynchronousSpool

BODY = b"Subject: test\r\nFrom: a@s.example\r\n\r\nhello\r\n"


class Courier:
    """Every attempt fails transiently unless told otherwise; records its jobs. With
    ``hold``, an attempt stays in flight until ``finish`` gives its result."""

    def __init__(self, fail=True):
        self.jobs = []
        self.contents = []  # message bytes as the courier saw them
        self.fail = fail
        self.remote = None  # the host the failures come from
        self.hold = False
        self.pending = []

    def deliver(self, job):
        self.jobs.append(job)
        self.contents.append(job.content.read_all())
        if self.hold:
            d = Deferred()
            self.pending.append((d, len(job.decisions)))
            return d
        if self.fail:
            return succeed([transient("4.4.1", "connection refused", remote=self.remote)]
                           * len(job.decisions))
        from relaygw.results import delivered

        return succeed([delivered("250 ok")] * len(job.decisions))

    def finish(self, result):
        d, count = self.pending.pop(0)
        d.callback([result] * count)


class World:
    def __init__(self, tmp_path, reactor=None):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = SynchronousSpool(tmp_path / "spool")
        self.spool.recover()
        self.smarthost = Courier()
        self.mx = Courier(fail=False)
        self.manager = QueueManager(self.spool, self.config,
                                    {"smarthost": self.smarthost, "mx": self.mx},
                                    self.clock, rng=random.Random(7))
        self.reloads = []
        self.reload_problems: list[str] = []
        self.control = ControlService(socket_path(self.spool.directory), self.manager,
                                      self.spool, self.config, self.reload, reactor)

    def config(self):
        return parse_config({
            "server": {"hostname": "relay.test"},
            "listeners": [{"address": "127.0.0.1:0"}],
            "smarthosts": {"up": {"hosts": ["127.0.0.1:2626"], "tls": "none"}},
            "delivery": {"retry_intervals": [60, 300]},
            "routes": [
                {"recipient_domains": ["corp.example"], "action": "smarthost",
                 "smarthost": "up"},
                {"action": "mx"},
            ],
        }, Path("/nonexistent"), source_path=Path("/etc/relaygw.toml"))

    def reload(self):
        self.reloads.append(True)
        return succeed(self.reload_problems)

    def accept(self, sender="a@s.example", rcpts=("b@corp.example",)):
        env = Envelope(queue_id=new_queue_id(), sender=sender,
                       recipients=tuple(EnvelopeRecipient(r) for r in rcpts),
                       arrived=self.clock.seconds(), client_ip="127.0.0.1",
                       helo="client.example")
        writer = self.spool.new_message(env)
        writer.write(BODY)
        writer.commit()
        self.manager.enqueued(writer.stored)
        return env.queue_id

    def ask(self, cmd, **args):
        results = []
        self.control.handle({"cmd": cmd, "args": args}).addBoth(results.append)
        (result,) = results
        return result

    def queued(self):
        return sorted(p.name for p in self.spool.queue_dir.iterdir()
                      if not p.name.endswith(".state"))


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_list_reports_each_message_with_recipient_states(world):
    world.mx.fail = True
    first = world.accept()
    world.clock.advance(20)
    second = world.accept(sender="x@other.example", rcpts=("y@far.example",))
    world.clock.advance(20)
    answer = world.ask("queue.list")
    assert answer["ok"] is True
    rows = answer["result"]
    assert [r["id"] for r in rows] == [first, second]
    assert rows[0] == {
        "id": first, "arrived": "2023-11-14T22:13:20Z", "age": 40, "size": len(BODY),
        "sender": "a@s.example", "held": False,
        "recipients": [{"address": "b@corp.example", "state": "deferred", "attempts": 1,
                        "next_attempt": iso(world.spool._load(first).state.recipients[0]
                                            .next_attempt),
                        "last_reply": "4.4.1 connection refused", "route": "routes[0]"}],
    }
    assert rows[1]["sender"] == "x@other.example" and rows[1]["age"] == 20
    assert rows[1]["recipients"][0]["route"] == "routes[1]"


def test_list_filters_run_in_the_daemon_with_its_config(world):
    world.mx.fail = True
    first = world.accept()
    world.clock.advance(3600)
    second = world.accept(sender="x@other.example", rcpts=("y@far.example",))

    def ids(**filters):
        answer = world.ask("queue.list", **filters)
        assert answer["ok"], answer
        return [r["id"] for r in answer["result"]]

    assert ids() == [first, second]
    assert ids(sender="*@OTHER.example") == [second]
    assert ids(recipient_domain="corp.example") == [first]
    assert ids(route="routes[1]") == [second]
    assert ids(route="0") == [first]
    assert ids(older_than="30m") == [first]
    assert ids(older_than=7200) == []
    assert ids(sender=None) == [first, second]  # null filters are no filters


def test_show_has_envelope_history_and_headers_or_the_whole_message(world):
    queue_id = world.accept()
    answer = world.ask("queue.show", id=queue_id)
    assert answer["ok"], answer
    shown = answer["result"]
    assert shown["id"] == queue_id and shown["helo"] == "client.example"
    assert shown["client_ip"] == "127.0.0.1"
    assert shown["headers"] == "Subject: test\r\nFrom: a@s.example\r\n"
    assert shown["message"] is None
    (rcpt,) = shown["recipients"]
    assert rcpt["attempts"] == 1 and rcpt["last_reply"] == "4.4.1 connection refused"
    assert rcpt["last_attempt"] == "2023-11-14T22:13:20Z"
    assert world.ask("queue.show", id=queue_id, body=True)["result"]["message"] == BODY.decode()


def test_unknown_ids_are_named_and_nothing_is_done(world):
    queue_id = world.accept()
    for cmd in ("queue.hold", "queue.release", "queue.delete", "queue.bounce", "queue.flush"):
        assert world.ask(cmd, ids=[queue_id, "NOPE"]) == {
            "ok": False, "error": "no such message: NOPE", "unknown": ["NOPE"]}
    assert world.ask("queue.show", id="NOPE") == {
        "ok": False, "error": "no such message: NOPE", "unknown": ["NOPE"]}
    assert world.queued() == [queue_id]
    assert world.spool._load(queue_id).state.held is False


def test_hold_and_release_are_saved_and_take_effect_at_once(world):
    queue_id = world.accept()
    assert world.ask("queue.hold", ids=[queue_id, queue_id]) == {"ok": True,
                                                                 "result": [queue_id]}
    assert world.spool._load(queue_id).state.held is True
    assert world.ask("queue.list")["result"][0]["recipients"][0]["state"] == "held"
    world.clock.advance(3600)  # the retry would have come: held, it does not
    assert len(world.smarthost.jobs) == 1
    assert world.ask("queue.flush", all=True)["result"] == [queue_id]
    assert len(world.smarthost.jobs) == 1  # flush leaves held mail held
    assert world.ask("queue.release", ids=[queue_id])["result"] == [queue_id]
    assert world.spool._load(queue_id).state.held is False
    world.clock.advance(0)
    assert len(world.smarthost.jobs) == 2  # overdue: attempted as soon as it is released


def test_flush_attempts_now(world):
    queue_id = world.accept()
    assert len(world.smarthost.jobs) == 1
    assert world.ask("queue.flush", ids=[queue_id]) == {"ok": True, "result": [queue_id]}
    assert len(world.smarthost.jobs) == 2
    assert world.ask("queue.flush", all=True) == {"ok": True, "result": [queue_id]}
    assert len(world.smarthost.jobs) == 3
    assert world.spool._load(queue_id).state.recipients[0].attempts == 3


def test_delete_drops_without_a_bounce(world):
    queue_id = world.accept()
    assert world.ask("queue.delete", ids=[queue_id]) == {"ok": True, "result": [queue_id]}
    assert world.queued() == []
    assert world.mx.jobs == []
    assert world.ask("queue.list") == {"ok": True, "result": []}


def test_bounce_fails_the_message_and_sends_a_dsn(world):
    queue_id = world.accept()
    assert world.ask("queue.bounce", ids=[queue_id]) == {"ok": True, "result": [queue_id]}
    (job,) = world.mx.jobs  # the DSN, delivered by its route
    assert job.envelope.sender == "" and job.decisions[0].recipient == "a@s.example"
    (dsn,) = world.mx.contents
    assert b"Status: 5.0.0" in dsn and b"Subject: test" in dsn
    assert world.queued() == []


def parse_dsn(dsn: bytes) -> tuple[str, str, dict[str, str]]:
    """A one-recipient DSN: its subject, its human part as one line, and the recipient's
    delivery-status fields, unfolded."""
    message = email.message_from_bytes(dsn)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, headers = message.get_payload()
    assert (text.get_content_type(), status.get_content_type(),
            headers.get_content_type()) == ("text/plain", "message/delivery-status",
                                             "text/rfc822-headers")
    human = " ".join(text.get_payload(decode=True).decode().split())
    _, recipient = status.get_payload()
    return (message["Subject"], human,
            {name: " ".join(value.split()) for name, value in recipient.items()})


ADMIN_BOUNCE_FIELDS = {
    "Final-Recipient": "rfc822; b@corp.example", "Action": "failed", "Status": "5.0.0",
    "Diagnostic-Code": "x-relaygw; 5.0.0 returned to the sender by the mail administrator"}


def test_an_operators_bounce_names_the_administrator_and_no_remote_host(world):
    world.smarthost.remote = "mx.corp.example[192.0.2.25]:25"
    queue_id = world.accept()
    assert world.manager.message(queue_id).state.recipients[0].remote_host == (
        "mx.corp.example[192.0.2.25]:25")  # the attempt that deferred it
    assert world.ask("queue.bounce", ids=[queue_id])["result"] == [queue_id]
    (dsn,) = world.mx.contents
    subject, human, fields = parse_dsn(dsn)
    assert subject == "Undelivered Mail Returned to Sender"
    assert human.endswith("<b@corp.example>: delivery failed: 5.0.0 returned to the sender "
                          "by the mail administrator")
    assert "said" not in human and "mx.corp.example" not in human
    assert fields == ADMIN_BOUNCE_FIELDS  # no Remote-MTA
    assert b"192.0.2.25" not in dsn


def test_a_bounce_during_the_attempt_stands_with_its_reason(world):
    world.smarthost.hold = True  # the attempt stays in flight until released
    queue_id = world.accept()
    assert world.ask("queue.bounce", ids=[queue_id])["result"] == [queue_id]
    assert world.mx.jobs == []  # no DSN before the attempt ends
    world.smarthost.finish(transient("4.4.1", "connection refused",
                                     remote="mx.corp.example[192.0.2.25]:25"))
    (dsn,) = world.mx.contents
    _, human, fields = parse_dsn(dsn)
    assert fields == ADMIN_BOUNCE_FIELDS
    assert "connection refused" not in human and "mx.corp.example" not in human
    assert world.queued() == []


def accept_three(world):
    """Three messages, each deferred once: A a@s.example -> b@corp.example (routes[0]),
    B x@other.example -> y@corp.example (routes[0]), C c@s.example -> z@far.example
    (routes[1], whose courier fails too here)."""
    world.mx.fail = True
    first = world.accept()
    world.clock.advance(100)
    second = world.accept(sender="x@other.example", rcpts=("y@corp.example",))
    third = world.accept(sender="c@s.example", rcpts=("z@far.example",))
    return first, second, third


@pytest.mark.parametrize("filters", [
    {"sender": "a@*"}, {"recipient_domain": "corp.example", "sender": "*@s.example"},
    {"route": "routes[0]", "older_than": "50"}, {"route": "0", "sender": "A@S.EXAMPLE"}])
def test_actions_on_all_messages_the_filters_select(world, filters):
    first, _, _ = accept_three(world)
    assert world.ask("queue.hold", all=True, **filters)["result"] == [first]
    assert [row["held"] for row in world.ask("queue.list")["result"]] == [True, False, False]
    assert world.ask("queue.release", all=True, **filters)["result"] == [first]
    assert world.ask("queue.delete", all=True, **filters)["result"] == [first]
    assert first not in world.queued() and len(world.queued()) == 2


def test_all_without_filters_is_every_message_and_none_matching_is_nothing(world):
    first, second, third = accept_three(world)
    assert world.ask("queue.hold", all=True)["result"] == [first, second, third]
    assert world.ask("queue.bounce", all=True, sender="nobody@*")["result"] == []
    assert world.ask("queue.flush", all=True, route="none")["result"] == []
    assert world.ask("queue.bounce", all=True, route="1")["result"] == [third]
    (dsn,) = [q for q in world.queued() if q not in (first, second)]  # C's, to c@s.example
    assert world.ask("queue.delete", all=True)["result"] == [first, second, dsn]
    assert world.queued() == []


@pytest.mark.parametrize("cmd", ["queue.list", "queue.flush", "queue.hold", "queue.release",
                                 "queue.delete", "queue.bounce"])
@pytest.mark.parametrize(("route", "error"), [
    ("routes[2]", "no such route: routes[2] (the configuration has routes[0] to routes[1])"),
    ("7", "no such route: 7 (the configuration has routes[0] to routes[1])"),
    ("smarthost", 'not a route: smarthost (give routes[N], N, or "none")'),
])
def test_a_route_the_configuration_does_not_have_is_an_error(world, cmd, route, error):
    queue_id = world.accept()
    args = {"route": route} if cmd == "queue.list" else {"all": True, "route": route}
    assert world.ask(cmd, **args) == {"ok": False, "error": error}
    assert world.ask("queue.list")["result"][0]["held"] is False  # nothing was done
    assert world.queued() == [queue_id]


def test_filters_without_all_are_refused(world):
    queue_id = world.accept()
    assert world.ask("queue.delete", ids=[queue_id], sender="*") == {
        "ok": False, "error": "queue.delete: filters need all"}
    assert world.queued() == [queue_id]


def test_reload_calls_the_daemon_and_reports_problems(world):
    assert world.ask("reload") == {"ok": True, "result": {"config": "/etc/relaygw.toml",
                                                          "problems": []}}
    world.reload_problems = ["routes[0].action: unknown"]
    assert world.ask("reload")["result"]["problems"] == ["routes[0].action: unknown"]
    assert len(world.reloads) == 2


@pytest.mark.parametrize(("request_", "error"), [
    ("not a dict", 'a request is {"cmd": NAME, "args": {...}}'),
    ({"args": {}}, 'a request is {"cmd": NAME, "args": {...}}'),
    ({"cmd": "queue.purge"}, "unknown command: queue.purge"),
    ({"cmd": "queue.list", "args": []}, "queue.list: args must be an object"),
    ({"cmd": "queue.list", "args": {"colour": "red"}}, "queue.list: unknown argument colour"),
    ({"cmd": "queue.list", "args": {"older_than": "soon"}},
     "queue.list: older_than: not an age: 'soon' (use seconds or a number with s, m, h or d)"),
    ({"cmd": "queue.list", "args": {"sender": 3}}, "queue.list: sender must be a string"),
    ({"cmd": "queue.show", "args": {}}, "queue.show: id must be a queue id"),
    ({"cmd": "queue.flush", "args": {}}, "queue.flush: ids must be a non-empty list of queue ids"),
    ({"cmd": "queue.flush", "args": {"all": True, "ids": ["A"]}},
     "queue.flush: give ids or all, not both"),
    ({"cmd": "queue.bounce", "args": {"all": True, "colour": "red"}},
     "queue.bounce: unknown argument colour"),
    ({"cmd": "queue.hold", "args": {"all": True, "sender": 3}},
     "queue.hold: sender must be a string"),
    ({"cmd": "queue.hold", "args": {"ids": "A"}},
     "queue.hold: ids must be a non-empty list of queue ids"),
    ({"cmd": "queue.delete", "args": {"ids": []}},
     "queue.delete: ids must be a non-empty list of queue ids"),
    ({"cmd": "reload", "args": {"now": True}}, "reload: unknown argument now"),
])
def test_bad_requests_are_answered_with_an_error(world, request_, error):
    results = []
    world.control.handle(request_).addBoth(results.append)
    assert results == [{"ok": False, "error": error}]


def test_a_line_that_is_not_json(world):
    results = []
    world.control.handle_line(b"{nope").addBoth(results.append)
    assert results[0]["ok"] is False
    assert results[0]["error"].startswith("not a JSON request: ")


def test_an_internal_error_is_reported_not_raised(world, monkeypatch):
    def broken(ids):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(world.manager, "hold", broken)
    assert world.ask("queue.hold", ids=["A"]) == {"ok": False,
                                                  "error": "internal error: disk on fire"}


# -- the socket -------------------------------------------------------------------------------


def raw_exchange(path, data: bytes, lines: int) -> list[dict]:
    """Send raw bytes on one connection; read ``lines`` answer lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        buf = b""
        while buf.count(b"\n") < lines:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


@pytest_twisted.inlineCallbacks
def test_round_trip_over_the_socket(tmp_path):
    from twisted.internet import reactor

    world = World(tmp_path, reactor)
    queue_id = world.accept()
    path = world.control.socket_path
    world.control.startService()
    try:
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        answer = yield deferToThread(call, path, "queue.list", {})
        assert answer["ok"] and [r["id"] for r in answer["result"]] == [queue_id]
        answer = yield deferToThread(call, path, "queue.hold", {"ids": ["NOPE"]})
        assert answer == {"ok": False, "error": "no such message: NOPE", "unknown": ["NOPE"]}
        answer = yield deferToThread(call, path, "queue.show", {"id": queue_id, "body": True})
        assert answer["result"]["message"] == BODY.decode()
        # Pipelined requests on one connection are answered in order.
        answers = yield deferToThread(
            raw_exchange, path,
            b'{"cmd": "queue.hold", "args": {"ids": ["%s"]}}\n{"cmd": "queue.list"}\n'
            b"garbage\n" % queue_id.encode(), 3)
        assert answers[0] == {"ok": True, "result": [queue_id]}
        assert answers[1]["result"][0]["held"] is True
        assert answers[2]["ok"] is False
        # A request line without an end is cut off.
        answers = yield deferToThread(raw_exchange, path, b"x" * (1024 * 1024 + 10), 1)
        assert answers == [{"ok": False, "error": "request longer than 1048576 bytes"}]
    finally:
        yield world.control.stopService()
    assert not path.exists()
    with pytest.raises(DaemonNotRunning, match=r"the daemon is not running \(no control "
                                               r"socket at .*control.sock\)"):
        call(path, "queue.list", {})


@pytest_twisted.inlineCallbacks
def test_a_stale_socket_is_replaced(tmp_path):
    from twisted.internet import reactor

    world = World(tmp_path, reactor)
    path = world.control.socket_path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # left behind, as by a crash: nothing listens
    with pytest.raises(DaemonNotRunning, match="nothing answers on the control socket"):
        call(path, "queue.list", {})
    world.control.startService()
    try:
        answer = yield deferToThread(call, path, "queue.list", {})
        assert answer == {"ok": True, "result": []}
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        yield world.control.stopService()
    assert not path.exists()


@pytest_twisted.inlineCallbacks
def test_a_socket_another_daemon_answers_on_is_left_alone(tmp_path):
    from twisted.internet import reactor

    world = World(tmp_path, reactor)
    path = world.control.socket_path
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        other.bind(str(path))
        other.listen(1)
        world.control.startService()
        assert world.control.port is None  # refused to take over
        yield world.control.stopService()
        assert path.exists()  # and did not remove the other daemon's socket
    finally:
        other.close()


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path):
    world = World(tmp_path, reactor=None)  # never reaches listenUNIX
    path = world.control.socket_path
    path.write_text("not a socket")
    world.control.startService()
    assert world.control.port is None
    assert world.control.stopService() is None
    assert path.read_text() == "not a socket"
    with pytest.raises(DaemonNotRunning):
        call(path, "queue.list", {})


def test_call_without_permission_is_a_control_error(tmp_path, monkeypatch):
    def refuse(self, address):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(ControlError, match="permission denied"):
        call(tmp_path / "control.sock", "queue.list", {})


# -- the command line, in process ---------------------------------------------------------------


def relaygw(*argv):
    """Parse like ``relaygw`` does once the queue commands are added; run the handler."""
    import argparse

    from relaygw.ops.queue_commands import add_commands

    parser = argparse.ArgumentParser(prog="relaygw")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def write_config(tmp_path):
    path = tmp_path / "relaygw.toml"
    path.write_text('[server]\nhostname = "relay.test"\nspool_dir = "spool"\n'
                    '[[listeners]]\naddress = "127.0.0.1:2525"\n'
                    '[smarthosts.up]\nhosts = ["127.0.0.1:2626"]\ntls = "none"\n'
                    '[[routes]]\nrecipient_domains = ["corp.example"]\naction = "smarthost"\n'
                    'smarthost = "up"\n[[routes]]\naction = "mx"\n')
    return str(path)


@pytest_twisted.inlineCallbacks
def test_the_command_line_through_the_socket(tmp_path, capsys):
    from twisted.internet import reactor

    world = World(tmp_path, reactor)
    world.mx.fail = True
    config = write_config(tmp_path)
    first = world.accept()
    second = world.accept(sender="", rcpts=("x@far.example",))
    world.control.startService()
    try:
        code = yield deferToThread(relaygw, "queue", "list", "-c", config)
        out, err = capsys.readouterr()
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0] == f"{'ID':<{len(first)}}     AGE  SIZE  SENDER"
        assert lines[1] == f"{first}      0s    {len(BODY)}  <a@s.example>"
        assert lines[2].startswith("    b@corp.example  deferred  next 2023-11-14T22:1")
        assert lines[2].endswith("Z  4.4.1 connection refused")
        assert lines[3] == f"{second}      0s    {len(BODY)}  <>"
        assert lines[5:] == ["2 messages"]

        code = yield deferToThread(relaygw, "queue", "list", "-c", config, "--json",
                                   "--sender", "<>")
        out, _ = capsys.readouterr()
        assert code == 0 and [r["id"] for r in json.loads(out)] == [second]

        code = yield deferToThread(relaygw, "queue", "hold", first, second, "-c", config)
        assert (code, capsys.readouterr().out) == (0, f"held {first}\nheld {second}\n")
        code = yield deferToThread(relaygw, "queue", "bounce", "NOPE", "-c", config)
        assert (code, capsys.readouterr().err) == (1, "relaygw: no such message: NOPE\n")
        code = yield deferToThread(relaygw, "queue", "show", first, "-c", config)
        out = capsys.readouterr().out
        assert code == 0 and "held:       yes" in out
        assert out.endswith("headers:\nSubject: test\nFrom: a@s.example\n")
        code = yield deferToThread(relaygw, "reload", "-c", config)
        assert (code, capsys.readouterr().out) == (0, "reloaded /etc/relaygw.toml\n")
    finally:
        yield world.control.stopService()


def test_the_command_line_without_a_daemon(tmp_path, capsys):
    world = World(tmp_path)
    config = write_config(tmp_path)
    first = world.accept()
    assert relaygw("queue", "list", "-c", config, "--json") == 0
    out, err = capsys.readouterr()
    assert err == "relaygw is not running: reading the spool read-only\n"
    (row,) = json.loads(out)
    assert row["id"] == first and row["recipients"][0]["state"] == "deferred"
    assert row["recipients"][0]["route"] == "routes[0]"  # from the config given
    assert relaygw("queue", "show", first, "--body", "-c", config) == 0
    assert capsys.readouterr().out.endswith("message:\nSubject: test\nFrom: a@s.example\n\n"
                                            "hello\n")
    sock = world.spool.directory / "control.sock"
    for argv in (("queue", "flush", "--all"), ("queue", "delete", first), ("reload",)):
        assert relaygw(*argv, "-c", config) == 1
        assert capsys.readouterr() == ("", "relaygw: the daemon is not running "
                                           f"(no control socket at {sock})\n")


def test_an_invalid_config_is_reported(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[delivery]\nmax_connections = "many"\n')
    assert relaygw("queue", "list", "-c", str(path)) == 1
    assert 'delivery.max_connections: must be an integer (got "many")' in (
        capsys.readouterr().err)
