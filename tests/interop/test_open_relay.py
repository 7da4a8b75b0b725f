"""No open relay: nmap's smtp-open-relay script, and its 16 variants sent by smtplib.

relaygw trusts nobody here (``trusted_networks = []``) and accepts mail only for
``relay.test``, so loopback looks like any client on the Internet.
"""

from __future__ import annotations

import smtplib
import subprocess
import xml.etree.ElementTree as ET

import pytest

from tests.interop.conftest import require_tool, without_dns

pytestmark = [pytest.mark.slow, pytest.mark.integration]

UNTRUSTED = '[access]\ntrusted_networks = []\nrelay_domains = ["relay.test"]\n'
DOMAIN, FROM, TO, IP = "ext.example", "antispam", "relaytest", "127.0.0.1"
SRV = "relay.test"  # what the script takes from relaygw's greeting

DENIED = (554, b"5.7.1 Relay access denied")
ROUTING = (554, b"5.7.1 Routing characters in local part not allowed")
UNQUALIFIED = (501, b"5.1.3 Recipient address must be fully qualified")
SYNTAX = (501, b"5.1.3 Bad recipient address syntax")

# smtp-open-relay.nse's table, in its order, with relaygw's reply to each RCPT.
VARIANTS = [
    ("", f"{TO}@{DOMAIN}", DENIED),
    (f"{FROM}@{DOMAIN}", f"{TO}@{DOMAIN}", DENIED),
    (f"{FROM}@{SRV}", f"{TO}@{DOMAIN}", DENIED),
    (f"{FROM}@[{IP}]", f"{TO}@{DOMAIN}", DENIED),
    (f"{FROM}@[{IP}]", f"{TO}%{DOMAIN}@[{IP}]", DENIED),  # [127.0.0.1] is no relay domain
    (f"{FROM}@[{IP}]", f"{TO}%{DOMAIN}@{SRV}", ROUTING),  # % hack to our own domain
    (f"{FROM}@[{IP}]", f'"{TO}@{DOMAIN}"', UNQUALIFIED),
    (f"{FROM}@[{IP}]", f'"{TO}%{DOMAIN}"', UNQUALIFIED),
    (f"{FROM}@[{IP}]", f"{TO}@{DOMAIN}@[{IP}]", SYNTAX),
    (f"{FROM}@[{IP}]", f'"{TO}@{DOMAIN}"@[{IP}]', DENIED),
    (f"{FROM}@[{IP}]", f"{TO}@{DOMAIN}@{SRV}", SYNTAX),
    # RFC 5321 At-domain is a Domain, never an address literal: a syntax error...
    (f"{FROM}@[{IP}]", f"@[{IP}]:{TO}@{DOMAIN}", SYNTAX),
    # ...while a well-formed source route is ignored: the mailbox is what counts.
    (f"{FROM}@[{IP}]", f"@{SRV}:{TO}@{DOMAIN}", DENIED),
    (f"{FROM}@[{IP}]", f"{DOMAIN}!{TO}", UNQUALIFIED),
    (f"{FROM}@[{IP}]", f"{DOMAIN}!{TO}@[{IP}]", DENIED),
    (f"{FROM}@[{IP}]", f"{DOMAIN}!{TO}@{SRV}", ROUTING),  # bang path to our own domain
]


def test_nmap_smtp_open_relay_finds_no_open_relay(daemon):
    nmap = require_tool("nmap", "nmap")
    daemon.start(UNTRUSTED)
    # The script runs on ports nmap calls "smtp". -sV would name this port after ~30 s of
    # version probes; a services file naming it is instant (--servicedb implies -F, which
    # scans the ports in that file: this one, so no -p).
    services = daemon.dir / "nmap-services"
    services.write_text(f"smtp\t{daemon.port}/tcp\t0.5\n")
    report = daemon.dir / "nmap.xml"
    argv = [nmap, "-Pn", "-n", "-sT", "--servicedb", str(services), "--script-trace",
            "--script", "smtp-open-relay", "--script-args",
            f"smtp-open-relay.domain={DOMAIN},smtp-open-relay.ip={IP}", "-oX", str(report),
            "127.0.0.1"]
    result = subprocess.run(without_dns(argv, daemon.dir), capture_output=True, text=True,
                            timeout=120, cwd=daemon.dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    port = ET.parse(report).find(f".//port[@portid='{daemon.port}']")
    assert port.find("state").get("state") == "open"
    assert port.find("service").get("name") == "smtp"
    output = port.find("script[@id='smtp-open-relay']").get("output")
    assert output == "Server doesn't seem to be an open relay, all tests failed"
    assert "open relay (" not in result.stdout  # "Server is an open relay (n/16 tests)"
    # All sixteen were tried (the script also says "all tests failed" when MAIL fails).
    assert result.stdout.count("RCPT TO:<") == 16
    assert daemon.queued() == []


def test_every_relay_variant_is_refused_and_nothing_is_queued(daemon):
    assert len({(sender, rcpt) for sender, rcpt, _ in VARIANTS}) == 16
    daemon.start(UNTRUSTED)
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname=DOMAIN, timeout=30) as smtp:
        assert smtp.ehlo()[0] == 250
        got = []
        for sender, rcpt, _ in VARIANTS:
            assert smtp.rset() == (250, b"2.0.0 OK")
            # docmd, not smtp.mail/rcpt: those would re-quote these addresses.
            assert smtp.docmd("MAIL", f"FROM:<{sender}>") == (
                250, f"2.1.0 Sender <{sender}> OK".encode())
            got.append((sender, rcpt, smtp.docmd("RCPT", f"TO:<{rcpt}>")))
        assert got == VARIANTS
        assert smtp.docmd("DATA") == (554, b"5.5.1 No valid recipients")
        # The refusals are policy, not a broken server: the relay domain is accepted.
        assert smtp.rset() == (250, b"2.0.0 OK")
        assert smtp.docmd("MAIL", f"FROM:<{FROM}@[{IP}]>")[0] == 250
        assert smtp.docmd("RCPT", f"TO:<{TO}@{SRV}>") == (
            250, f"2.1.5 Recipient <{TO}@{SRV}> OK".encode())
        assert smtp.rset() == (250, b"2.0.0 OK")
    assert daemon.queued() == []
    tmp = daemon.spool / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []
