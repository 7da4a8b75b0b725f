"""Mail submission as real clients do it: SASL in two steps (smtplib, s-nail, a raw TLS
socket), the sender/login binding, users added while the daemon runs, and IPv6 clients."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest

from tests.integration.test_inbound import MESSAGE, queued_message, tls_context, users_file
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

UNTRUSTED = '[access]\ntrusted_networks = []\nrelay_domains = ["relay.example"]\n'
PASSWORD = "correct horse"


def start_with_users(daemon, cli, extra: str = "", **kw) -> str:
    users = users_file(daemon, cli, "alice", PASSWORD)
    daemon.start(UNTRUSTED + f'[auth]\nusers_file = "{users}"\n' + extra, **kw)
    return users


def read_reply(f) -> bytes:
    """One whole reply, every line of it, exactly as sent."""
    out = b""
    while True:
        line = f.readline()
        out += line
        if line[3:4] != b"-":
            return out


def tls_socket(daemon):
    """A raw session under STARTTLS, after EHLO: (socket, its reader)."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    f = sock.makefile("rb")
    assert read_reply(f).startswith(b"220 ")
    sock.sendall(b"EHLO client.example\r\n")
    read_reply(f)
    sock.sendall(b"STARTTLS\r\n")
    assert read_reply(f) == b"220 2.0.0 Ready to start TLS\r\n"
    tls = tls_context(daemon).wrap_socket(sock, server_hostname="relay.test")
    tf = tls.makefile("rb")
    tls.sendall(b"EHLO client.example\r\n")
    assert read_reply(tf).endswith(b"\r\n250 AUTH PLAIN LOGIN\r\n")
    return tls, tf


# -- SASL in two steps --------------------------------------------------------------------


def test_plain_and_login_in_two_steps_byte_for_byte_over_a_socket(daemon, cli):
    start_with_users(daemon, cli)
    tls, f = tls_socket(daemon)
    with tls:
        tls.sendall(b"AUTH PLAIN\r\n")
        assert read_reply(f) == b"334 \r\n"  # RFC 4954: "334" SP, then the empty challenge
        tls.sendall(b"AGFsaWNlAGNvcnJlY3QgaG9yc2U=\r\n")
        assert read_reply(f) == b"235 2.7.0 Authentication successful\r\n"
    tls, f = tls_socket(daemon)
    with tls:
        tls.sendall(b"AUTH LOGIN\r\n")
        assert read_reply(f) == b"334 VXNlcm5hbWU6\r\n"
        tls.sendall(b"YWxpY2U=\r\n")
        assert read_reply(f) == b"334 UGFzc3dvcmQ6\r\n"
        tls.sendall(b"Y29ycmVjdCBob3JzZQ==\r\n")
        assert read_reply(f) == b"235 2.7.0 Authentication successful\r\n"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_without_an_initial_response(daemon, cli, mechanism):
    start_with_users(daemon, cli)
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=10) as smtp:
        smtp.starttls(context=tls_context(daemon))
        smtp.ehlo()
        smtp.user, smtp.password = "alice", PASSWORD
        authobject = getattr(smtp, f"auth_{mechanism.lower()}")
        assert smtp.auth(mechanism, authobject, initial_response_ok=False) == (
            235, b"2.7.0 Authentication successful")
        smtp.sendmail("alice@client.example", ["bob@elsewhere.example"], MESSAGE)
    assert b"with ESMTPSA id " in queued_message(daemon)
    assert wait_until(lambda: re.search(r"auth session=\w+ client=127\.0\.0\.1 user=alice\b",
                                        daemon.logs()))


needs_snail = pytest.mark.skipif(shutil.which("s-nail") is None,
                                 reason="s-nail not installed (Debian package s-nail)")


def s_nail(daemon, user: str, password: str, sender: str, rcpt: str,
           body: str = "sent by s-nail\n") -> subprocess.CompletedProcess:
    """s-nail sending one message through STARTTLS with AUTH PLAIN (its default: the
    two-step form, without an initial response). s-nail matches only DNS names in a
    certificate, not the IP address we connect to, so the daemon's certificate is pinned by
    its SHA-256 fingerprint instead."""
    home = daemon.dir / "snail-home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "LC_ALL": "C.UTF-8", "MAILRC": "/dev/null"}
    der = ssl.PEM_cert_to_DER_cert(daemon.cert.read_text())
    fingerprint = ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())
    return subprocess.run(
        ["s-nail", "-#", "-:/", "-Sv15-compat", "-Sttycharset=utf-8",
         f"-Smta=smtp://{user}:{password.replace(' ', '%20')}@127.0.0.1:{daemon.port}",
         "-Ssmtp-use-starttls", "-Ssmtp-auth=plain",
         "-Stls-fingerprint-digest=sha256", f"-Stls-fingerprint={fingerprint}",
         "-Snosave", "-Ssendwait", "-vv", f"-r{sender}", "-s", "from s-nail", rcpt],
        input=body, capture_output=True, text=True, timeout=60, env=env, cwd=home)


@needs_snail
def test_s_nail_sends_through_starttls_with_auth_plain(daemon, cli):
    start_with_users(daemon, cli)
    result = s_nail(daemon, "alice", PASSWORD, "alice@client.example", "bob@elsewhere.example")
    assert result.returncode == 0, result.stdout + result.stderr
    # Its dialogue (-vv): the two-step PLAIN, the empty challenge with its space.
    assert (">>> AUTH PLAIN\ns-nail: >>> SERVER: 334 \ns-nail: >>> AGFsaWNlAGNvcnJlY3QgaG9yc2U=\n"
            "s-nail: >>> SERVER: 235 2.7.0 Authentication successful\n") in result.stderr, \
        result.stderr
    assert "Unexpected EOF" not in result.stderr
    assert wait_until(lambda: len(daemon.queued()) == 1)
    stored = queued_message(daemon)
    assert b"Subject: from s-nail" in stored and stored.endswith(b"sent by s-nail\r\n")
    assert b"with ESMTPSA id " in stored
    assert re.search(r"auth session=\w+ client=127\.0\.0\.1 user=alice\b", daemon.logs())


# -- sender/login binding -----------------------------------------------------------------

BOUND = '[auth.senders]\nalice = ["alice@client.example", "*@alice.client.example"]\n'


def test_a_bound_user_gets_553_for_another_sender(daemon, cli):
    start_with_users(daemon, cli, BOUND)
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=10) as smtp:
        smtp.starttls(context=tls_context(daemon))
        smtp.ehlo()
        assert smtp.login("alice", PASSWORD)[0] == 235
        assert smtp.mail("ceo@corp.example") == (
            553, b"5.7.1 Sender address <ceo@corp.example> not allowed for user alice")
        assert smtp.mail("Alice@Client.Example") == (
            250, b"2.1.0 Sender <Alice@client.example> OK")
        smtp.rset()
        assert smtp.mail("news@alice.client.example")[0] == 250
        assert smtp.rcpt("bob@elsewhere.example")[0] == 250
        assert smtp.data(MESSAGE)[0] == 250
    assert wait_until(lambda: len(daemon.queued()) == 1)
    assert wait_until(lambda: "ceo@corp.example" in daemon.logs())


@needs_snail
def test_s_nail_as_a_bound_user_with_a_foreign_sender_is_refused(daemon, cli):
    start_with_users(daemon, cli, BOUND)
    result = s_nail(daemon, "alice", PASSWORD, "ceo@corp.example", "bob@elsewhere.example")
    assert result.returncode != 0, result.stderr
    assert ("s-nail: >>> MAIL FROM:<ceo@corp.example>\n"
            "s-nail: >>> SERVER: 553 5.7.1 Sender address <ceo@corp.example> not allowed for "
            "user alice\n") in result.stderr, result.stderr
    assert daemon.queued() == []


# -- users added while the daemon runs ----------------------------------------------------


def test_a_user_added_with_relaygw_passwd_authenticates_without_a_reload(daemon, cli):
    # Two worker processes (unless the suite runs everything in one): each must see it.
    workers = os.environ.get("RELAYGW_TEST_WORKERS")
    users = start_with_users(daemon, cli, '[log]\nformat = "json"\n',
                             server_extra="" if workers else "workers = 2\n")
    mode = os.stat(users).st_mode

    def login(name: str, password: str) -> tuple[int, bytes]:
        """One AUTH PLAIN (smtplib's login() would try LOGIN after a failure)."""
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
            smtp.starttls(context=tls_context(daemon))
            smtp.ehlo()
            smtp.user, smtp.password = name, password
            try:
                return smtp.auth("PLAIN", smtp.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code, e.smtp_error

    assert login("bob", "bob's secret") == (535, b"5.7.8 Authentication credentials invalid")
    result = cli("passwd", "--file", users, "bob", input="bob's secret\n")
    assert (result.returncode, result.stderr) == (0, "")
    assert os.stat(users).st_mode == mode
    for _ in range(4):  # connections go to the workers in turn
        assert login("bob", "bob's secret") == (235, b"2.7.0 Authentication successful")
    assert login("alice", PASSWORD)[0] == 235
    events = [json.loads(line) for line in daemon.logs().splitlines() if line.startswith("{")]
    assert not [e for e in events if e.get("event") == "reload"]
    reread = [e for e in events if "re-read" in e.get("message", "")]
    assert reread and all(e["message"] == f"auth: {users} re-read: 2 user(s)" for e in reread)
    if not workers:
        served = {e.get("worker") for e in events
                  if e.get("event") == "auth" and e.get("user") == "bob"}
        assert served == {0, 1}, events


# -- IPv6 ---------------------------------------------------------------------------------


def ipv6_loopback_port() -> int | None:
    if not socket.has_ipv6:
        return None
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        return None


def test_an_ipv6_client_appears_as_an_ipv6_literal_in_received(daemon):
    port = ipv6_loopback_port()
    if port is None:
        pytest.skip("no IPv6 loopback (::1) on this machine")
    listeners = (f'[[listeners]]\naddress = "127.0.0.1:{daemon.port}"\ntls = "none"\n'
                 f'[[listeners]]\naddress = "[::1]:{port}"\ntls = "none"\n')
    daemon.start(listeners=listeners)
    with smtplib.SMTP("::1", port, local_hostname="client.example", timeout=10) as smtp:
        smtp.sendmail("a@client.example", ["b@elsewhere.example"], MESSAGE)
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="v4.example", timeout=10) as s:
        s.sendmail("a@client.example", ["b@elsewhere.example"], MESSAGE)
    assert wait_until(lambda: len(daemon.queued()) == 2)
    received = sorted(stored(daemon, queue_id).split(b"\r\n", 1)[0]
                      for queue_id in daemon.queued())
    assert received == [b"Received: from client.example ([IPv6:::1])",
                        b"Received: from v4.example ([127.0.0.1])"]


def stored(daemon, queue_id: str) -> bytes:
    """The message bytes of one spool file, after its envelope header."""
    raw = (daemon.spool / "queue" / queue_id).read_bytes()
    header_len = int(raw.split(b"\n")[1])
    start = raw.index(b"\n", raw.index(b"\n") + 1) + 1 + header_len + 1
    return raw[start:]
