"""Fixtures and helpers for the fault-injection tests: the real daemon on loopback."""

from __future__ import annotations

import asyncio
import os
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import (  # noqa: F401
    RELAYGW,
    Capture,
    CaptureHandler,
    ca,
    capture,
    daemon,
    relaygw_cli,
    wait_for_port,
)

FAST_RETRY = "[delivery]\nretry_intervals = [1]\n"


def smarthost(name: str, *ports: int, tls: str = "none", extra: str = "") -> str:
    hosts = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    return f'[smarthosts.{name}]\nhosts = [{hosts}]\ntls = "{tls}"\n{extra}'


def route_to(name: str) -> str:
    return f'[[routes]]\naction = "smarthost"\nsmarthost = "{name}"\n'


def message(subject: str = "relayed", size: int = 0, msgid: str | None = None) -> bytes:
    head = (f"From: a@local.example\r\nTo: b@remote.example\r\nSubject: {subject}\r\n"
            f"Message-ID: <{msgid or subject}@client.example>\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    body = line * (size // len(line)) if size else b""
    return head + b"first line\r\n.starts with a dot\r\n" + body + b"last line\r\n"


def send(port: int, body: bytes, sender: str = "a@local.example",
         rcpts=("b@remote.example",), source: str | None = None) -> tuple[int, bytes]:
    """One transaction; returns the reply to the end of DATA."""
    kw = {"source_address": (source, 0)} if source else {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30,
                      **kw) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(sender)
        assert code == 250, text
        for rcpt in rcpts:
            code, text = smtp.rcpt(rcpt)
            assert code == 250, text
        return smtp.data(body)


def payload(content: bytes) -> bytes:
    """The message as the client sent it: what follows relaygw's Received: header."""
    received, sep, rest = content.partition(b"\r\nFrom: ")
    assert sep and received.startswith(b"Received: "), content[:200]
    return b"From: " + rest


def spool_files(spool: Path, sub: str) -> list[str]:
    d = spool / sub
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


class DelayHandler(CaptureHandler):
    """A capture handler that holds its DATA reply without blocking other sessions."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.in_data = 0

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.in_data += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await super().handle_DATA(server, session, envelope)
        finally:
            self.in_data -= 1


def with_handler(server: Capture, handler: CaptureHandler) -> Capture:
    """Swap the handler of a running capture server (new sessions use it)."""
    server.handler = handler
    server.controller.handler = handler
    return server


def cli(relay, *args: str) -> subprocess.CompletedProcess:
    return relaygw_cli(*args, "--config", str(relay.dir / "relaygw.toml"))


@pytest.fixture
def tmpfs_spool(daemon):  # noqa: F811
    """Mount a 4 MiB tmpfs on the daemon's spool directory; unmounted in teardown."""
    spool = daemon.spool
    spool.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(spool)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {result.stderr.strip()}")
    try:
        yield spool
    finally:
        daemon.stop()  # the daemon keeps files open on the mount
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


def start(relay, body: str = "", server: str = ""):
    """``daemon.start(body)`` with extra ``[server]`` keys (TOML allows one [server] table)."""
    return relay.start(body, server_extra=server)
