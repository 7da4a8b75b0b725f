"""`relaygw queue ...` and `relaygw reload` against the real daemon, over its control socket,
and against its spool when it is stopped."""

from __future__ import annotations

import email
import email.policy
import json
import os
import smtplib
import stat
from pathlib import Path

import pytest

from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

BODY = (b"From: a@local.example\r\nTo: b@remote.example\r\nSubject: queued for later\r\n\r\n"
        b"the body text\r\n")


def config(daemon, maildir: bool = False) -> str:
    """Everything goes to a dead smarthost (so it stays queued): routes[0] for
    second.example, routes[1] for the rest; with ``maildir``, a Maildir route for
    local.example comes first."""
    text = f'[smarthosts.nowhere]\nhosts = ["127.0.0.1:{daemon.dead_port}"]\ntls = "none"\n'
    if maildir:
        text += (f'[[routes]]\nrecipient_domains = ["local.example"]\naction = "maildir"\n'
                 f'maildir = "{daemon.dir}/mail/{{domain}}/{{localpart}}"\n')
    text += ('[[routes]]\nrecipient_domains = ["second.example"]\naction = "smarthost"\n'
             'smarthost = "nowhere"\n'
             '[[routes]]\naction = "smarthost"\nsmarthost = "nowhere"\n')
    return text


def send(daemon, sender: str, rcpts: tuple[str, ...], body: bytes = BODY) -> str:
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert smtp.rcpt(rcpt)[0] == 250, rcpt
        code, text = smtp.data(body)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


def attempts(daemon) -> int:
    return daemon.logs().count("attempt id=")


def start_with_two(daemon, maildir: bool = False) -> tuple[str, str]:
    """The daemon with two messages that failed their first attempt: A from a@local.example
    to b@remote.example (routes[1]), B from c@other.example to d@second.example
    (routes[0])."""
    daemon.start(config(daemon, maildir))
    first = send(daemon, "a@local.example", ("b@remote.example",))
    second = send(daemon, "c@other.example", ("d@second.example",))
    assert wait_until(lambda: daemon.logs().count("status=deferred") >= 2)
    return first, second


def run(cli, daemon, *args: str):
    return cli(*args, "--config", str(daemon.dir / "relaygw.toml"))


def listed(cli, daemon, *filters: str) -> list[dict]:
    result = run(cli, daemon, "queue", "list", "--json", *filters)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ids(cli, daemon, *filters: str) -> list[str]:
    return [row["id"] for row in listed(cli, daemon, *filters)]


def states(cli, daemon) -> dict[str, list[str]]:
    return {row["id"]: [r["state"] for r in row["recipients"]]
            for row in listed(cli, daemon)}


def snapshot(directory: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            out[str(path.relative_to(directory))] = (path.read_bytes() if path.is_file()
                                                     else None)
    return out


def test_list_shows_every_queued_message_with_its_state(daemon, cli):
    first, second = start_with_two(daemon)
    sock = daemon.spool / "control.sock"
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

    result = run(cli, daemon, "queue", "list")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "AGE", "SIZE", "SENDER"]
    assert lines[-1] == "2 messages"
    (row_a,) = [i for i, line in enumerate(lines) if line.startswith(first)]
    assert lines[row_a].endswith("<a@local.example>")
    assert lines[row_a + 1].startswith("    b@remote.example  ")
    address, state, next_attempt, last_error = lines[row_a + 1].strip().split("  ")
    assert (state, next_attempt[:5], last_error[:6]) == ("deferred", "next ", "4.4.1 ")
    assert any(line.startswith(second) and line.endswith("<c@other.example>") for line in lines)

    rows = listed(cli, daemon)
    assert [r["id"] for r in rows] == [first, second]
    assert rows[0]["sender"] == "a@local.example"
    assert rows[0]["held"] is False
    assert rows[0]["size"] > len(BODY)  # with the Received: header the relay added
    (rcpt_a,) = rows[0]["recipients"]
    assert rcpt_a["address"] == "b@remote.example"
    assert rcpt_a["state"] == "deferred" and rcpt_a["attempts"] == 1
    assert rcpt_a["route"] == "routes[1]" and rcpt_a["last_reply"].startswith("4.4.1")
    assert rcpt_a["next_attempt"].endswith("Z")
    assert rows[1]["recipients"][0]["route"] == "routes[0]"


def test_list_filters(daemon, cli):
    first, second = start_with_two(daemon)
    assert ids(cli, daemon, "--sender", "a@*") == [first]
    assert ids(cli, daemon, "--sender", "*@OTHER.EXAMPLE") == [second]
    assert ids(cli, daemon, "--recipient-domain", "second.example") == [second]
    assert ids(cli, daemon, "--recipient-domain", "nowhere.example") == []
    assert ids(cli, daemon, "--route", "routes[0]") == [second]
    assert ids(cli, daemon, "--route", "1") == [first]
    assert ids(cli, daemon, "--older-than", "0") == [first, second]
    assert ids(cli, daemon, "--older-than", "1h") == []
    assert ids(cli, daemon, "--sender", "c@*", "--route", "1") == []
    bad = run(cli, daemon, "queue", "list", "--older-than", "soon")
    assert bad.returncode == 2 and "not an age" in bad.stderr


def test_show_has_the_envelope_and_headers_and_with_body_the_message(daemon, cli):
    first, _ = start_with_two(daemon)
    result = run(cli, daemon, "queue", "show", first)
    assert result.returncode == 0, result.stderr
    assert f"id:         {first}" in result.stdout
    assert "sender:     <a@local.example>" in result.stdout
    assert "client:     client.example [127.0.0.1]:" in result.stdout
    assert "  b@remote.example: deferred, 1 attempt, next " in result.stdout
    assert "Subject: queued for later" in result.stdout
    assert "the body text" not in result.stdout

    shown = json.loads(run(cli, daemon, "queue", "show", first, "--json").stdout)
    assert shown["id"] == first and shown["sender"] == "a@local.example"
    assert shown["helo"] == "client.example" and shown["client_ip"] == "127.0.0.1"
    assert shown["recipients"][0]["address"] == "b@remote.example"
    assert shown["recipients"][0]["last_attempt"].endswith("Z")
    assert "Subject: queued for later\r\n" in shown["headers"]
    assert shown["message"] is None

    full = json.loads(run(cli, daemon, "queue", "show", first, "--body", "--json").stdout)
    assert full["message"].endswith(BODY.decode())
    text = run(cli, daemon, "queue", "show", first, "--body").stdout
    assert text.endswith("Subject: queued for later\n\nthe body text\n")


def test_unknown_ids_are_errors_naming_them(daemon, cli):
    first, _ = start_with_two(daemon)
    for args in (("show", "NOPE"), ("hold", first, "NOPE"), ("release", "NOPE"),
                 ("delete", "NOPE"), ("bounce", "NOPE"), ("flush", "NOPE")):
        result = run(cli, daemon, "queue", *args)
        assert result.returncode == 1, args
        assert result.stderr == "relaygw: no such message: NOPE\n", args
        assert result.stdout == ""
    assert states(cli, daemon)[first] == ["deferred"]  # nothing was held


def test_hold_release_and_flush(daemon, cli):
    first, second = start_with_two(daemon)
    result = run(cli, daemon, "queue", "hold", first)
    assert (result.returncode, result.stdout) == (0, f"held {first}\n")
    assert states(cli, daemon) == {first: ["held"], second: ["deferred"]}
    state = json.loads((daemon.spool / "queue" / f"{first}.state").read_text())
    assert state["held"] is True  # durable

    before = attempts(daemon)
    result = run(cli, daemon, "queue", "flush", "--all")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == sorted([f"flushed {first}",
                                                         f"flushed {second}"])
    assert wait_until(lambda: attempts(daemon) == before + 1)  # B only: A is held
    assert daemon.logs().count(f"attempt id={first}") == 1

    result = run(cli, daemon, "queue", "release", first, "--json")
    assert (result.returncode, json.loads(result.stdout)) == (0, [first])
    state = json.loads((daemon.spool / "queue" / f"{first}.state").read_text())
    assert state["held"] is False
    # The flush made it due while it was held: released, it is attempted at once.
    assert wait_until(lambda: daemon.logs().count(f"attempt id={first}") == 2)
    assert wait_until(lambda: states(cli, daemon)[first] == ["deferred"])

    before = attempts(daemon)
    result = run(cli, daemon, "queue", "flush", first)
    assert (result.returncode, result.stdout) == (0, f"flushed {first}\n")
    assert wait_until(lambda: attempts(daemon) == before + 1)
    assert daemon.logs().count(f"attempt id={first}") == 3
    assert wait_until(lambda: listed(cli, daemon)[0]["recipients"][0]["attempts"] == 3)

    usage = run(cli, daemon, "queue", "flush")
    assert usage.returncode == 2 and "give message ids or --all" in usage.stderr


def test_delete_drops_the_message_without_a_bounce(daemon, cli):
    first, second = start_with_two(daemon)
    result = run(cli, daemon, "queue", "delete", first)
    assert (result.returncode, result.stdout) == (0, f"deleted {first}\n")
    assert wait_until(lambda: daemon.queued() == [second])
    assert not (daemon.spool / "queue" / f"{first}.state").exists()
    assert ids(cli, daemon) == [second]
    assert wait_until(lambda: f"removed id={first} (deleted by operator)" in daemon.logs())
    assert "bounced id=" not in daemon.logs()


def test_bounce_sends_the_sender_a_dsn(daemon, cli):
    first, second = start_with_two(daemon, maildir=True)
    result = run(cli, daemon, "queue", "bounce", first)
    assert (result.returncode, result.stdout) == (0, f"bounced {first}\n")
    new = daemon.dir / "mail" / "local.example" / "a" / "new"
    (dsn_path,) = wait_until(lambda: sorted(new.iterdir()) if new.exists() else [])
    dsn = dsn_path.read_bytes()
    assert b"Return-Path: <>" in dsn
    assert b"multipart/report" in dsn and b"report-type=delivery-status" in dsn
    assert b"Final-Recipient: rfc822; b@remote.example" in dsn
    assert b"Subject: queued for later" in dsn  # the original headers come back
    assert first.encode() in dsn
    assert wait_until(lambda: daemon.queued() == [second])
    assert ids(cli, daemon) == [second]


def test_actions_on_all_messages_the_filters_select(daemon, cli):
    first, second = start_with_two(daemon)
    third = send(daemon, "e@local.example", ("f@second.example",))
    assert wait_until(lambda: daemon.logs().count("status=deferred") >= 3)

    result = run(cli, daemon, "queue", "hold", "--all", "--route", "routes[0]")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"held {second}\nheld {third}\n"
    assert states(cli, daemon) == {first: ["deferred"], second: ["held"], third: ["held"]}
    result = run(cli, daemon, "queue", "release", "--all", "--sender", "*@LOCAL.example",
                 "--json")
    assert (result.returncode, json.loads(result.stdout)) == (0, [first, third])
    assert states(cli, daemon)[third] == ["deferred"]
    result = run(cli, daemon, "queue", "flush", "--all", "--recipient-domain", "remote.example")
    assert (result.returncode, result.stdout) == (0, f"flushed {first}\n")
    assert wait_until(lambda: daemon.logs().count(f"attempt id={first}") == 2)
    result = run(cli, daemon, "queue", "delete", "--all", "--older-than", "1h")
    assert (result.returncode, result.stdout) == (0, "nothing deleted: no queued message "
                                                     "matches\n")
    result = run(cli, daemon, "queue", "delete", "--all", "--sender", "c@*", "--route", "0")
    assert (result.returncode, result.stdout) == (0, f"deleted {second}\n")
    assert wait_until(lambda: daemon.queued() == sorted([first, third]))
    result = run(cli, daemon, "queue", "delete", "--all")  # postsuper -d ALL
    assert result.returncode == 0
    assert sorted(result.stdout.splitlines()) == sorted([f"deleted {first}",
                                                         f"deleted {third}"])
    assert wait_until(lambda: daemon.queued() == [])
    result = run(cli, daemon, "queue", "hold", "--all")
    assert (result.returncode, result.stdout) == (0, "nothing held: the queue is empty\n")
    assert "bounced id=" not in daemon.logs()


def test_ids_and_all_and_filters_are_used_as_meant(daemon, cli):
    first, _ = start_with_two(daemon)
    for args in (("hold",), ("bounce", first, "--all"), ("delete", first, "--sender", "a@*")):
        usage = run(cli, daemon, "queue", *args)
        assert usage.returncode == 2, args
        assert usage.stderr.splitlines()[-1].endswith(
            "give message ids or --all" if "--sender" not in args
            else "filters select messages only with --all"), usage.stderr
    assert states(cli, daemon)[first] == ["deferred"]


def test_a_route_the_configuration_does_not_have_is_an_error(daemon, cli):
    first, second = start_with_two(daemon)
    for command in ("list", "flush", "hold", "release", "delete", "bounce"):
        extra = () if command == "list" else ("--all",)
        for route, error in (("routes[2]", "no such route: routes[2] (the configuration has "
                                           "routes[0] to routes[1])"),
                             ("5", "no such route: 5 (the configuration has routes[0] to "
                                   "routes[1])"),
                             ("nowhere", 'not a route: nowhere (give routes[N], N, or '
                                         '"none")')):
            result = run(cli, daemon, "queue", command, *extra, "--route", route)
            assert (result.returncode, result.stdout) == (1, ""), (command, route)
            assert result.stderr == f"relaygw: {error}\n", (command, route)
    assert states(cli, daemon) == {first: ["deferred"], second: ["deferred"]}
    assert ids(cli, daemon, "--route", "none") == []
    daemon.stop()  # read-only from the spool: checked against the file's configuration
    result = run(cli, daemon, "queue", "list", "--route", "routes[2]")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("relaygw is not running: reading the spool read-only\n"
                             "relaygw: no such route: routes[2] (the configuration has "
                             "routes[0] to routes[1])\n")


def test_an_administrators_bounce_says_so_without_a_remote_host(daemon, cli):
    first, second = start_with_two(daemon, maildir=True)
    remote = f"127.0.0.1[127.0.0.1]:{daemon.dead_port}"
    shown = json.loads(run(cli, daemon, "queue", "show", first, "--json").stdout)
    assert shown["recipients"][0]["remote_host"] == remote  # the attempt that deferred it
    result = run(cli, daemon, "queue", "bounce", "--all", "--route", "routes[2]")
    assert (result.returncode, result.stdout) == (0, f"bounced {first}\n")
    new = daemon.dir / "mail" / "local.example" / "a" / "new"
    (dsn_path,) = wait_until(lambda: sorted(new.iterdir()) if new.exists() else [])
    dsn = dsn_path.read_bytes()
    message = email.message_from_bytes(dsn, policy=email.policy.default)
    assert (message["Return-Path"], message["To"]) == ("<>", "a@local.example")
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message.get_content_type() == "multipart/report"
    text, status, headers = message.iter_parts()
    human = " ".join(text.get_content().split())
    assert human.endswith("<b@remote.example>: delivery failed: 5.0.0 returned to the sender "
                          "by the mail administrator")
    assert " said" not in human and "127.0.0.1" not in human
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert {k: " ".join(v.split()) for k, v in per_recipient.items()} == {
        "Final-Recipient": "rfc822; b@remote.example", "Action": "failed", "Status": "5.0.0",
        "Diagnostic-Code": "x-relaygw; 5.0.0 returned to the sender by the mail "
                           "administrator"}
    assert "Subject: queued for later" in headers.get_content()
    assert b"Remote-MTA" not in dsn and str(daemon.dead_port).encode() not in dsn
    assert wait_until(lambda: daemon.queued() == [second])


def test_reload(daemon, cli):
    start_with_two(daemon)
    path = daemon.dir / "relaygw.toml"
    result = run(cli, daemon, "reload")
    assert (result.returncode, result.stdout) == (0, f"reloaded {path}\n")
    assert wait_until(lambda: "reload: " in daemon.logs() and "applied" in daemon.logs())
    path.write_text(path.read_text() + '[delivery]\nmax_connections = "many"\n')
    result = run(cli, daemon, "reload")
    assert result.returncode == 1
    assert result.stderr == ('relaygw: reload: delivery.max_connections: must be an integer '
                             '(got "many")\n')
    assert daemon.proc.poll() is None
    assert json.loads(run(cli, daemon, "reload", "--json").stdout) == {
        "config": str(path),
        "problems": ['delivery.max_connections: must be an integer (got "many")']}


def test_without_the_daemon_list_reads_the_spool_read_only(daemon, cli):
    first, second = start_with_two(daemon)
    run(cli, daemon, "queue", "hold", second)
    daemon.stop()  # SIGTERM: a graceful stop (twistd then exits with the signal)
    sock = daemon.spool / "control.sock"
    assert not sock.exists()
    before = snapshot(daemon.spool)

    result = run(cli, daemon, "queue", "list")
    assert result.returncode == 0
    assert result.stderr == "relaygw is not running: reading the spool read-only\n"
    assert first in result.stdout and second in result.stdout
    assert result.stdout.splitlines()[-1] == "2 messages"
    rows = listed(cli, daemon)
    assert [(r["id"], [x["state"] for x in r["recipients"]]) for r in rows] == [
        (first, ["deferred"]), (second, ["held"])]
    assert ids(cli, daemon, "--route", "routes[1]") == [first]
    shown = json.loads(run(cli, daemon, "queue", "show", first, "--body", "--json").stdout)
    assert shown["message"].endswith(BODY.decode())
    missing = run(cli, daemon, "queue", "show", "NOPE")
    assert (missing.returncode, missing.stderr.splitlines()[-1]) == (
        1, "relaygw: no such message: NOPE")

    for args in (("queue", "hold", first), ("queue", "release", second),
                 ("queue", "flush", "--all"), ("queue", "delete", first),
                 ("queue", "bounce", first), ("reload",)):
        result = run(cli, daemon, *args)
        assert result.returncode == 1, args
        assert result.stderr == ("relaygw: the daemon is not running "
                                 f"(no control socket at {sock})\n"), args
        assert result.stdout == ""
    assert snapshot(daemon.spool) == before  # byte for byte
