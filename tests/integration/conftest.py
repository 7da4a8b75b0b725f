"""The real daemon, started as a user would start it, on loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

BIN = Path(sys.executable).parent
RELAYGW = str(BIN / "relaygw")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relaygw exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


class Daemon:
    """One relaygw process with its own directory, config and ports."""

    def __init__(self, directory: Path, ca: trustme.CA) -> None:
        self.dir = directory
        self.ca = ca
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = directory / "relaygw.log"
        leaf = ca.issue_cert("relay.test", "127.0.0.1")
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert))
        leaf.private_key_pem.write_to_path(str(self.key))
        self.spool = directory / "spool"

    def write_config(self, body: str, listeners: str | None = None) -> Path:
        if listeners is None:
            listeners = f'[[listeners]]\naddress = "127.0.0.1:{self.port}"\ntls = "starttls"\n'
        text = (f'[server]\nhostname = "relay.test"\nspool_dir = "{self.spool}"\n'
                f'[tls]\ncertificate = "{self.cert}"\nprivate_key = "{self.key}"\n'
                f"{listeners}\n{body}")
        path = self.dir / "relaygw.toml"
        path.write_text(text)
        return path

    def start(self, body: str = "", listeners: str | None = None, wait_port: int | None = None):
        config = self.write_config(body, listeners)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([RELAYGW, "run", "--config", str(config)], cwd=self.dir,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(wait_port or self.port, self.proc)
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
        return sorted(p.name for p in queue.iterdir()) if queue.exists() else []

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
