"""Metrics, health and JSON logs of the real daemon."""

from __future__ import annotations

import json
import smtplib
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import free_port
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
