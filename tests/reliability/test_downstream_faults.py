"""Downstream faults through the real daemon: bad TLS, lost connections, 421 after DATA."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

from tests.reliability.conftest import (
    FAST_RETRY,
    cli,
    message,
    payload,
    route_to,
    send,
    smarthost,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def attempts(daemon, queue_id: str) -> list[str]:
    return [ln for ln in daemon.logs().splitlines() if f"attempt id={queue_id}" in ln]


def removed(daemon, queue_id: str) -> None:
    """Waits for the daemon to log that the message is done and gone from the spool."""
    wait_until(lambda: f"removed id={queue_id} (done)" in daemon.logs(), timeout=30,
               what=f"the removal of {queue_id} logged", detail=daemon.logs)


def queue_id_of(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[1]


def tls_context(ca, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


def test_certificate_for_the_wrong_name_is_deferred_4_7_5_never_plaintext(daemon, capture, ca):
    # STARTTLS is offered but not required, so a plaintext fallback would be captured.
    sink = capture(tls_context=tls_context(ca, "wrong.example"), require_starttls=False)
    daemon.start(FAST_RETRY + smarthost("up", sink.port, tls="verify",
                                        extra=f'ca_file = "{daemon.ca_file()}"\n')
                 + route_to("up"))
    code, text = send(daemon.port, message("wrong name"))
    assert code == 250, text
    queue_id = queue_id_of(text)
    lines = wait_until(lambda: attempts(daemon, queue_id)[1:], timeout=20,
                       what="a second attempt logged", detail=daemon.logs)
    for line in lines:
        assert "status=deferred" in line and "4.7.5" in line, line
    assert daemon.queued() == [queue_id]
    assert sink.messages == []
    assert "Traceback" not in daemon.logs()


def test_smarthost_without_starttls_and_tls_require_is_deferred(daemon, capture):
    sink = capture()  # no tls_context: STARTTLS is not offered
    daemon.start(FAST_RETRY + smarthost("up", sink.port, tls="require") + route_to("up"))
    code, text = send(daemon.port, message("no starttls"))
    assert code == 250, text
    queue_id = queue_id_of(text)
    lines = wait_until(lambda: attempts(daemon, queue_id)[1:], timeout=20,
                       what="a second attempt logged", detail=daemon.logs)
    for line in lines:
        assert "status=deferred" in line and 'reply="4.7.' in line, line
    assert daemon.queued() == [queue_id]
    assert sink.messages == []


class DropMidData:
    """A raw SMTP peer that answers up to 354, reads part of the message, then hangs up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.sessions = 0
        self.body_bytes_seen = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.sessions += 1
                try:
                    self._session(conn)
                except OSError:
                    pass

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        conn.sendall(b"220 drop.test ESMTP\r\n")
        buf = b""
        while True:
            while b"\r\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            line, buf = buf.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-drop.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                seen = len(buf)
                while seen < 2048:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    seen += len(chunk)
                self.body_bytes_seen += seen
                conn.shutdown(socket.SHUT_RDWR)
                return
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def drop_server():
    server = DropMidData()
    yield server
    server.close()


def test_connection_dropped_mid_data_is_deferred_then_delivered_once(daemon, capture,
                                                                     drop_server):
    sink = capture()
    # retry_intervals long: the fix is applied by reload + flush, not by the timer.
    slow = "[delivery]\nretry_intervals = [600]\n"
    daemon.start(slow + smarthost("up", drop_server.port) + route_to("up"))
    body = message("dropped", size=64 * 1024)
    code, text = send(daemon.port, body)
    assert code == 250, text
    queue_id = queue_id_of(text)
    (line,) = wait_until(lambda: attempts(daemon, queue_id), timeout=20)
    assert "status=deferred" in line and 'reply="4.' in line, line
    assert drop_server.body_bytes_seen > 0
    assert daemon.queued() == [queue_id]

    daemon.write_config(slow + smarthost("up", sink.port) + route_to("up"))
    result = cli(daemon, "reload")
    assert result.returncode == 0, result.stderr
    result = cli(daemon, "queue", "flush", "--all")
    assert result.returncode == 0, result.stderr
    assert queue_id in result.stdout
    ((mail_from, rcpts, content),) = sink.wait_for(1)
    assert (mail_from, rcpts) == ("a@local.example", ["b@remote.example"])
    assert payload(content) == body
    # Removed from the spool once its last attempt has ended: no attempt of it can start
    # after this line, and every one that ended has its copy in the sink already.
    removed(daemon, queue_id)
    assert daemon.queued() == []
    assert len(sink.messages) == 1
    assert drop_server.sessions == 1
    assert len(attempts(daemon, queue_id)) == 2


def test_421_after_data_is_deferred_then_delivered_once(daemon, capture):
    sink = capture()
    sink.handler.data_replies = ["421 4.3.0 try later"]
    daemon.start(FAST_RETRY + smarthost("up", sink.port) + route_to("up"))
    body = message("four twenty one")
    code, text = send(daemon.port, body)
    assert code == 250, text
    queue_id = queue_id_of(text)
    ((_, _, content),) = sink.wait_for(1, timeout=30)
    assert payload(content) == body
    removed(daemon, queue_id)  # its last attempt has ended; no other can start
    assert daemon.queued() == []
    lines = attempts(daemon, queue_id)
    assert len(lines) == 2, lines
    assert "status=deferred" in lines[0] and "421 4.3.0 try later" in lines[0], lines[0]
    assert "status=sent" in lines[1], lines[1]
    assert len(sink.messages) == 1
