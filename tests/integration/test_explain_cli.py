"""`relaygw route explain`, run as the installed console script, and checked against the
daemon's real answers at RCPT."""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from relaygw.config import load_config
from relaygw.ops.explain import explain

pytestmark = pytest.mark.integration

RELAYGW = str(Path(sys.executable).parent / "relaygw")
SECRET = "do-not-print-this-password"

SERVER = """
[server]
hostname = "relay.test"
spool_dir = "spool"

[[listeners]]
address = "127.0.0.1:2525"
"""

ACCESS = """
[access]
trusted_networks = {networks}
relay_domains = ["example.org"]
"""

ROUTING = """
[smarthosts.corp]
hosts = ["smtp.corp.example:587"]
tls = "require"
username = "relay-user"
password_file = "corp.secret"

[aliases]
"team@example.org" = ["ann@example.org", "bob@corp.example"]

[[routes]]
recipient_domains = ["example.org"]
action = "maildir"
maildir = "mail/{domain}/{localpart}"

[[routes]]
recipient_domains = ["corp.example"]
action = "smarthost"
smarthost = "corp"

[[routes]]
recipient_domains = ["blocked.example"]
action = "reject"
reply = "550 5.7.1 Blocked by policy"
"""

CONFIG = SERVER + ACCESS.format(networks='["127.0.0.0/8"]') + ROUTING


def explain_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([RELAYGW, "route", "explain", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env={**os.environ})


@pytest.fixture
def config_path(tmp_path):
    (tmp_path / "corp.secret").write_text(SECRET + "\n")
    path = tmp_path / "relaygw.toml"
    path.write_text(CONFIG)
    return path


def test_smarthost_text_report(config_path, tmp_path):
    run = explain_cli("--config", str(config_path), "--from", "alice@example.org",
                      "--to", "bob@corp.example")
    assert (run.returncode, run.stderr) == (0, "")
    lines = run.stdout.splitlines()
    assert lines[0] == "ACCEPTED: 250 2.1.5 Recipient <bob@corp.example> OK"
    for line in [
        "  client       127.0.0.1 (default)",
        "  decision     allowed: trusted network",
        "  why          client 127.0.0.1 is in access.trusted_networks (127.0.0.0/8)",
        "Route for bob@corp.example",
        "  route        routes[1]",
        "  source       [[routes]]",
        '               recipient_domains = ["corp.example"]',
        '               action = "smarthost"',
        '               smarthost = "corp"',
        "  next hop     smarthost:corp",
        "  hosts        smtp.corp.example:587  (tried in this order)",
        "  tls          require: STARTTLS or no delivery, certificate not verified",
        "  username     relay-user",
        f"  password     from {tmp_path / 'corp.secret'} (never shown)",
        "  reply        250 2.1.5 Recipient <bob@corp.example> OK",
    ]:
        assert line in lines
    assert SECRET not in run.stdout


def test_json_is_explain(config_path):
    config = load_config(config_path)
    for args, kwargs in [
        (("--from", "a@outside.example", "--to", "team@example.org", "--client-ip", "192.0.2.1"),
         {"client_ip": "192.0.2.1"}),
        (("--from", "", "--to", "x@corp.example", "--client-ip", "192.0.2.1", "--auth", "joe"),
         {"client_ip": "192.0.2.1", "auth_user": "joe"}),
        (("--from", "<>", "--to", "x@blocked.example"), {}),
    ]:
        run = explain_cli("-c", str(config_path), *args, "--json")
        assert run.stderr == ""
        result = json.loads(run.stdout)
        assert result == explain(config, args[1], args[3], **kwargs)
        assert run.returncode == (0 if result["accepted"] else 1)
        assert SECRET not in run.stdout


def test_exit_codes(config_path, tmp_path):
    base = ("-c", str(config_path), "--from", "a@outside.example")
    assert explain_cli(*base, "--to", "ann@example.org", "--client-ip", "192.0.2.1"
                       ).returncode == 0
    denied = explain_cli(*base, "--to", "x@elsewhere.example", "--client-ip", "192.0.2.1")
    assert denied.returncode == 1
    assert denied.stdout.startswith("REFUSED: 554 5.7.1 Relay access denied\n")
    no_route = explain_cli(*base, "--to", "x@elsewhere.example")
    assert no_route.returncode == 1
    assert "  reply        550 5.1.2 No route to destination for <x@elsewhere.example>" in (
        no_route.stdout.splitlines())
    assert explain_cli(*base, "--to", "x@blocked.example").returncode == 1
    assert explain_cli(*base, "--to", "not an address").returncode == 1
    # Usage and configuration errors.
    assert explain_cli(*base).returncode == 2  # no --to
    assert explain_cli(*base, "--to", "x@y.example", "--client-ip", "nope").returncode == 2
    broken = tmp_path / "broken.toml"
    broken.write_text('[server]\nbogus = 1\n[[routes]]\naction = "fly"\n')
    run = explain_cli("-c", str(broken), "--from", "a@b.example", "--to", "c@d.example")
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr.splitlines() == [
        "server.bogus: unknown key",
        "listeners: at least one listener is required",
        'routes[0].action: must be one of maildir, smarthost, mx, reject (got "fly")',
    ]


def test_help_mentions_the_default_client_ip():
    run = subprocess.run([RELAYGW, "route", "explain", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0
    assert "default: 127.0.0.1" in " ".join(run.stdout.split())


@pytest.mark.parametrize(("recipient", "trusted"), [
    ("ann@example.org", False),
    ("team@example.org", False),
    ("x@elsewhere.example", False),
    ("x%y@example.org", False),
    ("x@blocked.example", True),
    ("x@elsewhere.example", True),
    ("bob@corp.example", True),
    ("postmaster", False),
])
def test_the_daemon_answers_what_explain_says(daemon, recipient, trusted):
    """The running daemon's RCPT reply is the one `route explain` predicts for 127.0.0.1."""
    networks = '["127.0.0.0/8"]' if trusted else '["192.0.2.0/24"]'
    (daemon.dir / "corp.secret").write_text(SECRET)
    daemon.start(ACCESS.format(networks=networks) + ROUTING)  # server and listener: daemon's
    config = daemon.dir / "relaygw.toml"
    run = explain_cli("-c", str(config), "--from", "a@outside.example", "--to", recipient,
                      "--client-ip", "127.0.0.1", "--json")
    predicted = json.loads(run.stdout)["rcpt_reply"]
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@outside.example")[0] == 250
        code, text = smtp.rcpt(recipient)
    assert f"{code} {text.decode()}" == predicted
    assert run.returncode == (0 if code == 250 else 1)
