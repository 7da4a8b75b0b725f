"""The Received: trace header the receive stage puts on every message."""

from __future__ import annotations

import ipaddress

import pytest

from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.receive.transforms import address_literal, received_header
from relaygw.smtp.server import Session

ARRIVED = 1700000000.0  # Tue, 14 Nov 2023 22:13:20 +0000


def envelope() -> Envelope:
    return Envelope(queue_id="1A2B3C", sender="a@client.example",
                    recipients=(EnvelopeRecipient("b@relay.example"),), arrived=ARRIVED)


@pytest.mark.parametrize(("ip", "literal"), [
    ("127.0.0.1", "[127.0.0.1]"),
    ("192.0.2.7", "[192.0.2.7]"),
    ("::1", "[IPv6:::1]"),
    ("2001:db8::7", "[IPv6:2001:db8::7]"),
    ("2001:0db8:0000:0000:0000:0000:0000:0007", "[IPv6:2001:db8::7]"),
    ("fe80::1%eth0", "[IPv6:fe80::1]"),
    ("::ffff:192.0.2.7", "[192.0.2.7]"),  # a dual-stack listener's IPv4 client
])
def test_address_literal_follows_rfc_5321_4_1_3(ip, literal):
    assert address_literal(ipaddress.ip_address(ip)) == literal


def test_an_ipv6_client_is_written_as_an_ipv6_literal():
    session = Session(ipaddress.ip_address("::1"), 40000, helo="client.example", esmtp=True)
    assert received_header("relay.test", session, envelope()) == (
        b"Received: from client.example ([IPv6:::1])\r\n"
        b"\tby relay.test (relaygw) with ESMTP id 1A2B3C\r\n"
        b"\tfor <b@relay.example>; Tue, 14 Nov 2023 22:13:20 +0000\r\n")


def test_an_ipv4_client_stays_a_plain_literal():
    session = Session(ipaddress.ip_address("127.0.0.1"), 40000, helo="client.example",
                      esmtp=True)
    assert received_header("relay.test", session, envelope()).startswith(
        b"Received: from client.example ([127.0.0.1])\r\n")
