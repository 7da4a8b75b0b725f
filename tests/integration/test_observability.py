"""Metrics, health and JSON logs of the real daemon."""

from __future__ import annotations

import json
import re
import smtplib
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import free_port
from tests.support.log_lines import (
    assert_json_has_the_text_fields,
    pairs,
    python_reprs,
    split_text_line,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

MESSAGE = b"Subject: x\r\n\r\nbody\r\n"


def send(daemon, rcpt="b@anywhere.example"):
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("a@client.example")
        assert smtp.rcpt(rcpt)[0] == 250
        code, text = smtp.data(MESSAGE)
        assert code == 250
        return text.decode().rsplit(" ", 1)[1]


def scrape(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_and_health_endpoints(daemon):
    port = free_port()
    daemon.start(f'[metrics]\naddress = "127.0.0.1:{port}"\n')
    send(daemon)
    samples = wait_until(lambda: (s := scrape(port)).get(
        ("relaygw_deliveries_total", (("enhanced_class", "4"), ("route", "routes[0]"),
                                      ("status", "deferred")))) and s)
    assert samples[("relaygw_messages_accepted_total", ())] == 1
    assert samples[("relaygw_queue_messages", ())] == 1
    assert samples[("relaygw_connections_total",
                    (("listener", f"127.0.0.1:{daemon.port}"), ("tls", "false")))] == 2  # probe + 1
    health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert (health.status, health.read()) == (200, b"ok\n")


def json_lines(text: str) -> list[dict]:
    """Every complete line (the daemon may be writing the last one)."""
    complete = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in complete]


def test_json_log_lines_carry_stable_fields(daemon):
    daemon.start('[log]\nformat = "json"\n')
    queue_id = send(daemon)
    lines = wait_until(lambda: [r for r in json_lines(daemon.logs()) if r["event"] == "attempt"])
    records = json_lines(daemon.logs())  # every complete line parses as JSON
    accepted = next(r for r in records if r["event"] == "accepted")
    assert accepted["queue_id"] == queue_id and accepted["sender"] == "a@client.example"
    assert accepted["nrcpt"] == 1 and accepted["level"] == "info"
    attempt = lines[0]
    assert attempt["queue_id"] == queue_id and attempt["status"] == "deferred"
    assert attempt["rcpt"] == "b@anywhere.example" and attempt["route"] == "routes[0]"
    assert {"time", "namespace", "message"} <= attempt.keys()


# -- one message's log, parsed ---------------------------------------------------------------

# What Twisted itself would print at start and stop (and what relaygw leaves out).
TWISTED_NOISE = re.compile(r"starting on|Port .* Closed|Main loop terminated|"
                           r"Starting factory|Stopping factory|reactor class")
MESSAGE_ID = "<20261203.one@client.example>"


def relay_one_message(daemon, capture, log_format: str):
    """Start the daemon with a sink as smarthost, send one message through it, stop."""
    sink = capture()
    daemon.start(f'[log]\nformat = "{log_format}"\n'
                 f'[smarthosts.sink]\nhosts = ["127.0.0.1:{sink.port}"]\ntls = "none"\n'
                 '[[routes]]\naction = "smarthost"\nsmarthost = "sink"\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        smtp.starttls()
        smtp.ehlo("client.example")
        assert smtp.mail("alice@client.example")[0] == 250
        assert smtp.rcpt("bob@anywhere.example")[0] == 250
        code, text = smtp.data(f"Message-ID: {MESSAGE_ID}\r\nSubject: one\r\n\r\nbody\r\n"
                               .encode())
        assert code == 250
        queue_id = text.decode().rsplit(" ", 1)[1]
    ((_, rcpts, _),) = sink.wait_for(1)
    assert rcpts == ["bob@anywhere.example"]
    wait_until(lambda: f"removed id={queue_id} (done)" in daemon.logs(), detail=daemon.logs)
    daemon.stop()  # its stop lines are in the log too
    return queue_id, daemon.logs()


def test_one_messages_json_log_links_session_and_queue_id(daemon, capture):
    queue_id, logs = relay_one_message(daemon, capture, "json")
    records = json_lines(logs)
    assert len(records) == len(logs.splitlines())  # every line is a JSON object
    for record in records:
        assert_json_has_the_text_fields(record)  # the text's pairs are fields, same values
        assert python_reprs(record["message"]) == [], record
        assert not TWISTED_NOISE.search(record["message"]), record
    by_event = {}
    for record in records:
        by_event.setdefault(record["event"], []).append(record)
    (accepted,) = by_event["accepted"]
    session = accepted["session"]
    assert re.fullmatch(r"[0-9a-f]{12}", session)
    assert (accepted["queue_id"], accepted["message_id"], accepted["sender"]) == (
        queue_id, MESSAGE_ID, "alice@client.example")
    assert accepted["tls"].startswith("TLSv1.") and " " not in accepted["tls"]
    assert accepted["auth"] == "none"
    # connect and disconnect of that session (the start-up probe had a session of its own).
    assert [r["event"] for r in records if r.get("session") == session] == [
        "connect", "accepted", "disconnect"]
    assert len({r["session"] for r in by_event["connect"]}) == len(by_event["connect"])
    (attempt,) = by_event["attempt"]
    (removed,) = by_event["removed"]
    assert (attempt["queue_id"], attempt["status"], attempt["rcpt"]) == (
        queue_id, "sent", "bob@anywhere.example")
    assert attempt["reply"] == "250 2.0.0 captured" and attempt["tls"] == "none"
    assert (removed["queue_id"], removed["why"]) == (queue_id, "done")
    # Every maillog and delivery line is about this message.
    about_messages = [r for r in records
                      if r["namespace"] in ("relaygw.maillog", "relaygw.delivery.relay")]
    assert about_messages and all(r["queue_id"] == queue_id for r in about_messages)


def test_one_messages_text_log_has_no_reprs_and_no_twisted_noise(daemon, capture):
    queue_id, logs = relay_one_message(daemon, capture, "text")
    messages = [split_text_line(line) for line in logs.splitlines()]
    for _, message in messages:
        assert python_reprs(message) == [], message
        assert not TWISTED_NOISE.search(message), message
    mine = [(system, pairs(message)) for system, message in messages
            if pairs(message).get("id") == queue_id]
    assert [(system, fields.get("message_id")) for system, fields in mine] == [
        ("relaygw.smtp.server#info", MESSAGE_ID),  # accepted
        ("relaygw.maillog#info", None),  # attempt
        ("relaygw.maillog#info", None),  # removed
    ]
    session = mine[0][1]["session"]
    session_lines = [m.split(" ", 1)[0] for _, m in messages if f"session={session} " in m]
    assert session_lines == ["connect", "accepted", "disconnect"]
    assert mine[1][1]["status"] == "sent" and mine[1][1]["reply"] == "250 2.0.0 captured"
