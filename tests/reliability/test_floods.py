"""Connection floods from one address and mail loops (too many Received: headers)."""

from __future__ import annotations

import smtplib
import socket
import urllib.request

import pytest

from tests.integration.conftest import free_port
from tests.reliability.conftest import message, spool_files, start
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def greeting(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def _connections_open(metrics_port: int) -> float | None:
    """relaygw_connections_open summed over listeners, from /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as page:
            text = page.read().decode()
    except OSError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("relaygw_connections_open{"))


def test_flood_from_one_address_does_not_lock_out_another(daemon):
    metrics_port = free_port()
    start(daemon, f'[metrics]\naddress = "127.0.0.1:{metrics_port}"\n',
          server="max_connections_per_client = 5\n")
    # The start-up probe's slot is released (in worker mode, once its worker reports).
    wait_until(lambda: _connections_open(metrics_port) == 0, what="no connection open")
    socks = []
    try:
        replies = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            socks.append(s)
            replies.append(greeting(s))
        assert all(r.startswith(b"220 ") for r in replies[:5]), replies[:5]
        assert replies[5:] == [b"421 4.7.0 Too many connections from your address\r\n"] * 15
        # The refused ones are closed by relaygw.
        for s in socks[5:]:
            assert s.recv(64) == b""
        # Another loopback address is still served while the five stay open.
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10,
                                      source_address=("127.0.0.2", 0)) as other:
            assert greeting(other).startswith(b"220 ")
        with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                          timeout=30, source_address=("127.0.0.2", 0)) as smtp:
            smtp.ehlo()
            assert smtp.mail("a@local.example")[0] == 250
            assert smtp.rcpt("b@remote.example")[0] == 250
            code, text = smtp.data(message("from 127.0.0.2"))
            assert code == 250, text
        assert wait_until(lambda: len(daemon.queued()) == 1)
        for s in socks[:5]:  # the first five are still alive
            s.sendall(b"NOOP\r\n")
            assert greeting(s).startswith(b"250 ")
    finally:
        for s in socks:
            s.close()


def test_sixty_received_headers_get_554_5_4_6_and_nothing_is_queued(daemon):
    daemon.start()
    hops = b"".join(f"Received: from hop{i}.example by hop{i + 1}.example; "
                    f"Sun, 29 Nov 2026 08:00:{i:02d} +0000\r\n".encode() for i in range(60))
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@local.example")[0] == 250
        assert smtp.rcpt("b@remote.example")[0] == 250
        code, text = smtp.data(hops + message("loop"))
        assert (code, text[:5]) == (554, b"5.4.6"), (code, text)
        assert smtp.noop()[0] == 250  # the session goes on
    assert daemon.queued() == []
    assert spool_files(daemon.spool, "tmp") == []
