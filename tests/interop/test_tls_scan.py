"""testssl.sh against relaygw's STARTTLS and implicit-TLS listeners: protocols and ciphers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.integration.conftest import free_port
from tests.interop.conftest import require_tool, without_dns

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Weak protocols and cipher classes: the finding testssl must report for each.
EXPECTED = {
    "SSLv2": "not offered",
    "SSLv3": "not offered",
    "TLS1": "not offered",
    "TLS1_1": "not offered",
    "TLS1_2": "offered",
    "cipherlist_NULL": "not offered",
    "cipherlist_aNULL": "not offered",  # anonymous (no authentication)
    "cipherlist_EXPORT": "not offered",
    "cipherlist_LOW": "not offered",  # 64-bit, DES, RC2, RC4
    "cipherlist_3DES_IDEA": "not offered",
    "cipherlist_STRONG": "offered",  # AEAD
    "RC4": "not vulnerable",  # -4: every RC4 suite tried one by one
}
BAD_SEVERITIES = {"MEDIUM", "HIGH", "CRITICAL", "WARN", "FATAL"}


def run_testssl(daemon, target: list[str], name: str) -> dict:
    """Run testssl -p -s -4 on ``target``; the scan result from its JSON report."""
    binary = require_tool("testssl", "testssl.sh")
    out = daemon.dir / f"testssl-{name}.json"
    argv = [binary, "--quiet", "--nodns", "none", "--warnings", "off", "--color", "0",
            "--connect-timeout", "10", "--openssl-timeout", "10",
            "-p", "-s", "-4", "-oJ", str(out), *target]
    # testssl probes its openssl with `s_client -connect invalid.` (a DNS lookup) unless
    # NXCONNECT names something local.
    env = {**os.environ, "NXCONNECT": "127.0.0.1:0"}
    result = subprocess.run(without_dns(argv, daemon.dir), capture_output=True, text=True,
                            timeout=120, env=env, cwd=daemon.dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (scan,) = json.loads(out.read_text())["scanResult"]
    assert (scan["ip"], scan["port"]) == ("127.0.0.1", target[-1].rsplit(":", 1)[1])
    return scan


def check(scan: dict) -> None:
    """Every weak protocol and cipher class absent, and nothing worse than LOW found."""
    findings = {finding["id"]: finding for section in scan.values()
                if isinstance(section, list) for finding in section}
    got = {key: findings[key]["finding"] for key in EXPECTED if key in findings}
    assert got == EXPECTED
    assert findings["TLS1_3"]["finding"].startswith("offered")
    problems = [f for f in findings.values()
                if f["severity"] in BAD_SEVERITIES or f["id"].startswith("scanProblem")]
    assert problems == []


def test_starttls_listener_offers_only_tls12_and_13_without_weak_ciphers(daemon):
    daemon.start()
    scan = run_testssl(daemon, ["--starttls", "smtp", f"127.0.0.1:{daemon.port}"], "starttls")
    assert scan["service"] == "smtp"
    check(scan)


def test_implicit_tls_listener_offers_only_tls12_and_13_without_weak_ciphers(daemon):
    tls_port = free_port()
    daemon.start(listeners=f'[[listeners]]\naddress = "127.0.0.1:{tls_port}"\n'
                           'tls = "implicit"\n', wait_port=tls_port)
    check(run_testssl(daemon, [f"127.0.0.1:{tls_port}"], "implicit"))
