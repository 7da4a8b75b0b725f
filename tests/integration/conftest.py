"""The real daemon, started as a user would start it, on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from tests.support.waiting import wait_until  # noqa: F401 - re-exported for older imports

BIN = Path(sys.executable).parent
RELAYGW = str(BIN / "relaygw")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0,
                  implicit_tls: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relaygw exited with {proc.returncode}")
        try:
            # The kernel accepts before start-up is complete; a greeting means it is.
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if implicit_tls:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                    s = ctx.wrap_socket(s)  # noqa: PLW2901
                if s.recv(64).startswith(b"220 "):
                    # End the probe session and wait for relaygw to close it, so its
                    # connection slot is free again before the test's first client.
                    s.sendall(b"QUIT\r\n")
                    while s.recv(4096):
                        pass
                    return
        except OSError:
            pass
        time.sleep(0.05)  # not listening, or not ready to greet yet: poll again
    raise TimeoutError(f"port {port} did not open")


class Daemon:
    """One relaygw process with its own directory, config and ports."""

    def __init__(self, directory: Path, ca: trustme.CA) -> None:
        self.dir = directory
        self.ca = ca
        self.port = free_port()
        self.dead_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = directory / "relaygw.log"
        leaf = ca.issue_cert("relay.test", "127.0.0.1")
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert))
        leaf.private_key_pem.write_to_path(str(self.key))
        self.spool = directory / "spool"

    def write_config(self, body: str, listeners: str | None = None,
                     server_extra: str = "") -> Path:
        if listeners is None:
            listeners = f'[[listeners]]\naddress = "127.0.0.1:{self.port}"\ntls = "starttls"\n'
        if "[[routes]]" not in body:
            # Keep accepted mail in the queue: deliveries go to a port nobody listens on.
            body += (f'[smarthosts.nowhere]\nhosts = ["127.0.0.1:{self.dead_port}"]\n'
                     'tls = "none"\n[[routes]]\naction = "smarthost"\nsmarthost = "nowhere"\n')
        if "[dns]" not in body:
            # Never the system resolver: it would send queries off this machine.
            body += '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 1.0\n'
        workers = os.environ.get("RELAYGW_TEST_WORKERS")
        if workers and "workers" not in server_extra:
            # make test runs the daemon-level suites twice: with the default
            # (workers = "auto") and with RELAYGW_TEST_WORKERS=0 (one process).
            server_extra += f"workers = {workers}\n"
        text = (f'[server]\nhostname = "relay.test"\nspool_dir = "{self.spool}"\n{server_extra}'
                f'[tls]\ncertificate = "{self.cert}"\nprivate_key = "{self.key}"\n'
                f"{listeners}\n{body}")
        path = self.dir / "relaygw.toml"
        path.write_text(text)
        return path

    def start(self, body: str = "", listeners: str | None = None, wait_port: int | None = None,
              server_extra: str = "", env: dict[str, str] | None = None):
        config = self.write_config(body, listeners, server_extra)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([RELAYGW, "run", "--config", str(config)], cwd=self.dir,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        wait_for_port(wait_port or self.port, self.proc,
                      implicit_tls='tls = "implicit"' in (listeners or ""))
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        self.log.close()
        return code

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def queued(self) -> list[str]:
        queue = self.spool / "queue"
        return sorted(p.name for p in queue.iterdir()
                      if not p.name.endswith(".state")) if queue.exists() else []

    def ca_file(self) -> str:
        path = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(path))
        return str(path)


@pytest.fixture(scope="session")
def ca():
    return trustme.CA()


@pytest.fixture
def daemon(tmp_path, ca):
    d = Daemon(tmp_path, ca)
    yield d
    d.stop()


def relaygw_cli(*args: str, input: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([RELAYGW, *args], capture_output=True, text=True, input=input,
                          timeout=60, cwd=cwd, env={**os.environ})


@pytest.fixture
def cli():
    return relaygw_cli


class CaptureHandler:
    """aiosmtpd handler recording every transaction; replies can be scripted."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.rcpt_replies: list[str] = []  # consumed one per RCPT; empty: accept
        self.data_replies: list[str] = []  # consumed one per DATA; empty: accept
        self.on_data = None  # called before answering DATA

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        if self.on_data is not None:
            self.on_data()
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 captured"


class Capture:
    """An aiosmtpd server on loopback, in its own thread."""

    def __init__(self, **kw) -> None:
        from aiosmtpd.controller import Controller

        self.handler = CaptureHandler()
        self.port = free_port()
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     decode_data=False, **kw)
        self.controller.start()

    @property
    def messages(self):
        return self.handler.messages

    def wait_for(self, count: int, timeout: float = 20.0) -> list:
        """Every message captured, once there are ``count`` or ``timeout`` has passed:
        callers check the count (``((a, b, c),) = sink.wait_for(1)``)."""
        deadline = time.monotonic() + timeout
        while len(self.handler.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.handler.messages

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def capture():
    servers = []

    def make(**kw) -> Capture:
        server = Capture(**kw)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
