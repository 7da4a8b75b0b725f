"""End to end through the real daemon: Maildir, smarthosts, failover, retries, bounces."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess

import pytest

from tests.integration.conftest import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

BODY = (b"From: a@local.example\r\nTo: b@remote.example\r\nSubject: relayed\r\n\r\n"
        b"first line\r\n.starts with a dot\r\nlast line\r\n")


def send(daemon, sender="a@local.example", rcpts=("b@remote.example",), body=BODY) -> str:
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail(sender)[0] == 250
        for rcpt in rcpts:
            assert smtp.rcpt(rcpt)[0] == 250, rcpt
        code, text = smtp.data(body)
        assert code == 250, text
        return text.decode().rsplit(" ", 1)[1]


def smarthost(name: str, *ports: int, extra: str = "") -> str:
    hosts = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    return f'[smarthosts.{name}]\nhosts = [{hosts}]\ntls = "none"\n{extra}'


def maildir_route(daemon, domain="local.example") -> str:
    return (f'[[routes]]\nrecipient_domains = ["{domain}"]\naction = "maildir"\n'
            f'maildir = "{daemon.dir}/mail/{{domain}}/{{localpart}}"\n')


FAST_RETRY = "[delivery]\nretry_intervals = [1]\n"


def mailbox(daemon, domain, local):
    new = daemon.dir / "mail" / domain / local / "new"
    return sorted(new.iterdir()) if new.exists() else []


def test_message_to_a_relay_domain_lands_in_the_maildir(daemon):
    daemon.start('[access]\ntrusted_networks = []\nrelay_domains = ["local.example"]\n'
                 + maildir_route(daemon))
    queue_id = send(daemon, sender="x@outside.example", rcpts=("Bob@local.example",))
    (path,) = wait_until(lambda: mailbox(daemon, "local.example", "Bob"))
    data = path.read_bytes()
    # LF line ends, as Postfix's local and virtual write them; every other byte as sent.
    head, received, rest = data.split(b"\n", 2)
    assert (head, received) == (b"Return-Path: <x@outside.example>",
                                b"Delivered-To: <Bob@local.example>")
    stamp = re.fullmatch(
        rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\n"
        rb"\tby relay\.test \(relaygw\) with ESMTP id " + queue_id.encode() + rb"\n"
        rb"\tfor <Bob@local\.example>; [^\n]+\n", rest[:rest.index(b"\nFrom: ") + 1])
    assert stamp, rest
    assert rest[stamp.end():] == BODY.replace(b"\r\n", b"\n")
    assert b"\r" not in data
    assert wait_until(lambda: daemon.queued() == [])
    assert f"attempt id={queue_id} to=<Bob@local.example> route=routes[0]" in daemon.logs()
    assert "status=sent" in daemon.logs()


def test_trusted_client_reaches_the_smarthost_byte_exact(daemon, capture):
    sink = capture()
    daemon.start(smarthost("up", sink.port) + '[[routes]]\naction = "smarthost"\n'
                 'smarthost = "up"\n')
    # A dot right at a 16 KiB boundary is where twisted.mail's stuffing failed.
    filler = b"".join(b"x" * 78 + b"\r\n" for _ in range((16384 - len(BODY)) // 80))
    pad = 16384 - len(BODY) - len(filler)
    body = (BODY + filler + b"y" * (pad - 2) + b"\r\n" + b".\r\n..\r\n.x\r\nend\r\n")
    assert body[16384:16387] == b".\r\n"
    queue_id = send(daemon, rcpts=("b@remote.example", "c@remote.example"), body=body)
    ((mail_from, rcpts, content),) = sink.wait_for(1)
    assert (mail_from, rcpts) == ("a@local.example", ["b@remote.example", "c@remote.example"])
    received, _, rest = content.partition(b"\r\nFrom: ")
    assert received.startswith(b"Received: from client.example ([127.0.0.1])")
    assert queue_id.encode() in received
    assert b"From: " + rest == body
    assert wait_until(lambda: daemon.queued() == [])


def test_dead_first_smarthost_fails_over_to_the_second(daemon, capture):
    sink = capture()
    dead = free_port()
    daemon.start(smarthost("up", dead, sink.port) + '[[routes]]\naction = "smarthost"\n'
                 'smarthost = "up"\n')
    send(daemon)
    assert len(sink.wait_for(1)) == 1
    assert wait_until(lambda: daemon.queued() == [])
    assert f"relay=127.0.0.1[127.0.0.1]:{sink.port}" in daemon.logs()


def test_4xx_smarthost_is_retried_until_it_accepts(daemon, capture):
    sink = capture()
    sink.handler.rcpt_replies = ["451 4.3.0 try again later", "451 4.3.0 try again later"]
    daemon.start(FAST_RETRY + smarthost("up", sink.port)
                 + '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n')
    queue_id = send(daemon)
    assert len(sink.wait_for(1, timeout=30)) == 1
    assert wait_until(lambda: daemon.queued() == [])
    logs = daemon.logs()
    assert logs.count(f"attempt id={queue_id}") == 3
    assert logs.count('status=deferred reply="451 4.3.0 try again later"') == 2


def test_5xx_produces_exactly_one_bounce(daemon, capture):
    sink = capture()
    sink.handler.rcpt_replies = ["550 5.1.1 no such user"]
    daemon.start(FAST_RETRY + smarthost("up", sink.port) + maildir_route(daemon)
                 + '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n')
    queue_id = send(daemon, sender="a@local.example", rcpts=("nobody@remote.example",))
    (dsn_path,) = wait_until(lambda: mailbox(daemon, "local.example", "a"))
    dsn = dsn_path.read_bytes()
    assert dsn.startswith(b"Return-Path: <>\nDelivered-To: <a@local.example>\n")
    assert b"\r" not in dsn
    assert b"Auto-Submitted: auto-replied" in dsn
    assert b"Final-Recipient: rfc822; nobody@remote.example" in dsn
    assert b"Action: failed" in dsn and b"Status: 5.1.1" in dsn
    assert b"Diagnostic-Code: smtp; 550 5.1.1 no such user" in dsn
    assert b"Subject: relayed" in dsn
    assert wait_until(lambda: daemon.queued() == [])
    assert f"bounced id={queue_id}" in daemon.logs()
    assert len(mailbox(daemon, "local.example", "a")) == 1
    assert sink.messages == []


def test_no_bounce_for_a_null_sender(daemon, capture):
    sink = capture()
    sink.handler.rcpt_replies = ["550 5.1.1 no such user"]
    daemon.start(smarthost("up", sink.port) + maildir_route(daemon)
                 + '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n')
    queue_id = send(daemon, sender="", rcpts=("nobody@remote.example",))
    assert wait_until(lambda: daemon.queued() == [])
    assert f"attempt id={queue_id} to=<nobody@remote.example>" in daemon.logs()
    assert "bounced id=" not in daemon.logs()
    assert not (daemon.dir / "mail").exists()


def test_kill_9_between_the_downstream_250_and_the_state_write(daemon, capture):
    sink = capture()
    config = smarthost("up", sink.port) + '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n'
    daemon.start(config)
    proc = daemon.proc
    # Freeze relaygw as the sink is about to answer 250: it can never record the outcome.
    sink.handler.on_data = lambda: os.kill(proc.pid, signal.SIGSTOP)
    queue_id = send(daemon, rcpts=("b@remote.example",))
    assert len(sink.wait_for(1)) == 1
    daemon.stop(signal.SIGKILL)
    sink.handler.on_data = None
    assert daemon.queued() == [queue_id]
    daemon.start(config)
    assert len(sink.wait_for(2)) == 2  # resent once: the one recipient in flight
    assert wait_until(lambda: daemon.queued() == [])
    assert sink.messages[0] == sink.messages[1]


needs_sink = pytest.mark.skipif(shutil.which("smtp-sink") is None,
                                reason="smtp-sink (Debian package postfix) not installed")


@needs_sink
@pytest.mark.parametrize("fault,reply", [
    (["-Q", "."], "421"),          # 421 and hang up after the final dot
    (["-r", "rcpt"], "450"),       # 4xx to every RCPT
    (["-q", "data"], "connection lost"),  # silent hang-up at DATA
])
def test_smtp_sink_faults_are_deferred_and_kept(daemon, tmp_path, fault, reply):
    port = free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", *fault, f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening(port), what=f"smtp-sink listening on port {port}")
        daemon.start(smarthost("up", port) + '[[routes]]\naction = "smarthost"\n'
                     'smarthost = "up"\n')
        queue_id = send(daemon)
        line = wait_until(lambda: next((ln for ln in daemon.logs().splitlines()
                                        if f"attempt id={queue_id}" in ln), None))
        assert "status=deferred" in line and reply in line, line
        assert daemon.queued() == [queue_id]
    finally:
        sink.terminate()
        sink.wait(timeout=10)


@needs_sink
def test_smtp_sink_5xx_at_rcpt_bounces_once(daemon):
    port = free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-f", "rcpt", f"127.0.0.1:{port}",
                             "10"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening(port), what=f"smtp-sink listening on port {port}")
        daemon.start(smarthost("up", port) + maildir_route(daemon)
                     + '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n')
        queue_id = send(daemon)
        (dsn,) = wait_until(lambda: mailbox(daemon, "local.example", "a"))
        assert b"Diagnostic-Code: smtp; 500 5.3.0 Error: command failed" in dsn.read_bytes()
        assert wait_until(lambda: daemon.queued() == [])
        assert f"attempt id={queue_id} to=<b@remote.example>" in daemon.logs()
    finally:
        sink.terminate()
        sink.wait(timeout=10)


@needs_sink
def test_smtp_sink_too_slow_to_answer_data_times_out_and_is_deferred(daemon):
    port = free_port()
    # smtp-sink holds its pipelined replies 5 s at DATA; relaygw waits 1 s for each.
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-w", "5", f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening(port), what=f"smtp-sink listening on port {port}")
        daemon.start(smarthost("up", port)
                     + "[delivery.timeouts]\nmail = 1.0\nrcpt = 1.0\ndata_init = 1.0\n"
                     + '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n')
        queue_id = send(daemon)
        line = wait_until(lambda: next((ln for ln in daemon.logs().splitlines()
                                        if f"attempt id={queue_id}" in ln), None))
        assert "status=deferred" in line and "4.4.2" in line and "timeout" in line, line
        assert daemon.queued() == [queue_id]
    finally:
        sink.terminate()
        sink.wait(timeout=10)


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def dns_server(tmp_path):
    """relaygw's loopback DNS server in its own process, as the daemon would see one."""
    import json
    import sys

    zone = {
        "mx": [["remote.example", 10, "mx1.remote.example"],
               ["remote.example", 20, "mx2.remote.example"]],
        "a": [["mx1.remote.example", "127.0.0.1"], ["mx2.remote.example", "127.0.0.1"],
              ["noMX.example", "127.0.0.1"]],
        "null_mx": ["nomail.example"],
        "servfail": ["broken.example"],
    }
    zone_file = tmp_path / "zone.json"
    zone_file.write_text(json.dumps(zone))
    port_file = tmp_path / "dns.port"
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.dns_server", "--port-file",
                             str(port_file), "--zone-file", str(zone_file)])
    try:
        assert wait_until(port_file.exists, timeout=20)
        yield int(port_file.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def mx_config(daemon, dns_port: int, mx_port: int) -> str:
    return (FAST_RETRY + f'mx_port = {mx_port}\ntls = "opportunistic"\n'
            f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\ntimeout = 2.0\n'
            + maildir_route(daemon) + '[[routes]]\naction = "mx"\n')


def test_direct_mx_delivery_through_dns(daemon, capture, dns_server):
    sink = capture()
    daemon.start(mx_config(daemon, dns_server, sink.port))
    send(daemon, rcpts=("b@remote.example", "c@nomx.example"))
    messages = sink.wait_for(2)
    assert sorted(rcpts for _, rcpts, _ in messages) == [["b@remote.example"],
                                                         ["c@nomx.example"]]
    assert wait_until(lambda: daemon.queued() == [])
    assert "relay=mx1.remote.example[127.0.0.1]" in daemon.logs()


@pytest.mark.parametrize("domain,status", [("nomail.example", b"5.1.10"),
                                           ("nxdomain.example", b"5.1.2")])
def test_dns_permanent_failures_bounce(daemon, capture, dns_server, domain, status):
    sink = capture()
    daemon.start(mx_config(daemon, dns_server, sink.port))
    send(daemon, rcpts=(f"x@{domain}",))
    (dsn_path,) = wait_until(lambda: mailbox(daemon, "local.example", "a"))
    assert b"Status: " + status in dsn_path.read_bytes()
    assert wait_until(lambda: daemon.queued() == [])


def test_dns_servfail_is_deferred(daemon, capture, dns_server):
    sink = capture()
    daemon.start(mx_config(daemon, dns_server, sink.port))
    queue_id = send(daemon, rcpts=("x@broken.example",))
    line = wait_until(lambda: next((ln for ln in daemon.logs().splitlines()
                                    if f"attempt id={queue_id}" in ln), None))
    assert "status=deferred" in line and "4.4.3" in line, line
    assert daemon.queued() == [queue_id]


@pytest.mark.parametrize("ending", ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\r", "\r.\r\n"])
def test_normalised_smuggling_attempt_reaches_the_next_hop_as_one_message(daemon, capture,
                                                                           ending):
    sink = capture()
    daemon.start(smarthost("up", sink.port) + '[[routes]]\naction = "smarthost"\n'
                 'smarthost = "up"\n', server_extra='bare_newlines = "normalize"\n')
    smuggled = ("MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\n"
                "Subject: spoofed\r\n\r\nsmuggled\r\n")
    body = ("Subject: outer\r\n\r\nhello" + ending + smuggled).encode()
    send(daemon, body=body)
    ((mail_from, rcpts, content),) = sink.wait_for(1)
    assert (mail_from, rcpts) == ("a@local.example", ["b@remote.example"])
    assert b"\r\nMAIL FROM:<evil@x.example>\r\n" in content  # data, not a command
    assert b"\n" not in content.replace(b"\r\n", b"")  # only CRLF went out
    # Removed from the queue: its one transaction is over, and a smuggled second one
    # would have reached the sink inside it, before the reply to the dot.
    assert wait_until(lambda: daemon.queued() == [])
    assert len(sink.handler.messages) == 1
