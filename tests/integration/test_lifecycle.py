"""Reload (SIGHUP) and graceful stop (SIGTERM) of the real daemon."""

from __future__ import annotations

import signal
import smtplib
import socket

import pytest

from tests.integration.conftest import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

UNTRUSTED = '[access]\ntrusted_networks = []\nrelay_domains = ["{domains}"]\n'
MESSAGE = b"Subject: x\r\n\r\nbody\r\n"


def rcpt_reply(daemon, rcpt: str, port: int | None = None):
    with smtplib.SMTP("127.0.0.1", port or daemon.port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("a@client.example")
        return smtp.rcpt(rcpt)


def reload(daemon, body: str, listeners: str | None = None) -> None:
    before = daemon.logs().count("reload")
    daemon.write_config(body, listeners)
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: daemon.logs().count("reload") > before)


def test_sighup_applies_a_valid_config_to_new_sessions(daemon):
    daemon.start(UNTRUSTED.format(domains="a.example"))
    assert rcpt_reply(daemon, "x@b.example") == (554, b"5.7.1 Relay access denied")
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as live:
        live.ehlo()
        live.mail("a@client.example")
        assert live.rcpt("x@a.example")[0] == 250
        reload(daemon, UNTRUSTED.format(domains="b.example"))
        assert wait_until(lambda: "applied" in daemon.logs())
        assert live.data(MESSAGE)[0] == 250  # the session in progress goes on
    assert rcpt_reply(daemon, "x@b.example")[0] == 250
    assert rcpt_reply(daemon, "x@a.example") == (554, b"5.7.1 Relay access denied")


def test_sighup_with_an_invalid_config_keeps_the_old_one(daemon):
    daemon.start(UNTRUSTED.format(domains="a.example"))
    reload(daemon, '[delivery]\nmax_connections = "many"\n')
    assert wait_until(lambda: "reload refused" in daemon.logs())
    assert 'delivery.max_connections: must be an integer (got "many")' in daemon.logs()
    assert rcpt_reply(daemon, "x@a.example")[0] == 250
    assert daemon.proc.poll() is None


def test_sighup_adds_and_removes_listeners(daemon):
    daemon.start()
    second = free_port()
    both = (f'[[listeners]]\naddress = "127.0.0.1:{daemon.port}"\n'
            f'[[listeners]]\naddress = "127.0.0.1:{second}"\ntls = "none"\n')
    reload(daemon, "", listeners=both)
    assert wait_until(lambda: f"listening on 127.0.0.1:{second}" in daemon.logs())
    assert rcpt_reply(daemon, "x@anywhere.example", port=second)[0] == 250
    only_second = f'[[listeners]]\naddress = "127.0.0.1:{second}"\ntls = "none"\n'
    reload(daemon, "", listeners=only_second)
    assert wait_until(lambda: f"stopped listening on 127.0.0.1:{daemon.port}" in daemon.logs())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()


def test_sigterm_lets_the_transaction_in_flight_finish(daemon):
    daemon.start()
    smtp = smtplib.SMTP("127.0.0.1", daemon.port, timeout=10)
    smtp.ehlo()
    smtp.mail("a@client.example")
    smtp.rcpt("b@anywhere.example")
    idle = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    assert idle.recv(100).startswith(b"220 ")
    daemon.proc.send_signal(signal.SIGTERM)
    assert idle.recv(100) == b"421 4.3.2 Service shutting down, try again later\r\n"
    assert wait_until(lambda: _refused(daemon.port))  # no new connections
    code, text = smtp.data(MESSAGE)
    assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[1]
    assert smtp.docmd("MAIL", "FROM:<a@client.example>") == (
        421, b"4.3.2 Service shutting down, try again later")
    # twistd ends a clean SIGTERM shutdown by re-raising the signal: -15 is its exit status.
    assert daemon.proc.wait(timeout=30) == -signal.SIGTERM
    assert daemon.queued() == [queue_id]
    assert list((daemon.spool / "tmp").iterdir()) == []


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True
