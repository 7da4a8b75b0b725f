"""Tests for relaygw.receive.relay: the inbound relay decision, including nmap's
open-relay matrix."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaygw.address import Address, MailArgs, RcptArgs
from relaygw.receive.relay import ClientInfo, RelayDecision, is_trusted, relay_decision
from relaygw.smtp.arguments import parse_mail_from, parse_rcpt_to
from relaygw.smtp.replies import Reply

SERVER = "relay.example"  # the server's name and its one relay domain
SERVER_IP = "127.0.0.1"
EXT = "ext.example"
TRUSTED = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
RELAY_DOMAINS = [SERVER]
LOCAL_DOMAINS = [SERVER]

STRANGER = ClientInfo(ipaddress.ip_address("203.0.113.9"))

DENIED = RelayDecision(False, "denied", Reply(554, "5.7.1", "Relay access denied"))
ROUTING = RelayDecision(
    False,
    "routing_characters",
    Reply(554, "5.7.1", "Routing characters in local part not allowed"),
)
TRUSTED_OK = RelayDecision(True, "trusted", None)
AUTHENTICATED_OK = RelayDecision(True, "authenticated", None)
RELAY_OK = RelayDecision(True, "relay_domain", None)
POSTMASTER_OK = RelayDecision(True, "postmaster", None)

RCPT_BAD = Reply(501, "5.1.3", "Bad recipient address syntax")
RCPT_UNQUALIFIED = Reply(501, "5.1.3", "Recipient address must be fully qualified")


def decide(
    rcpt_arg: str,
    client: ClientInfo = STRANGER,
    relay_domains: list[str] = RELAY_DOMAINS,
    local_domains: list[str] = LOCAL_DOMAINS,
) -> RelayDecision | Reply:
    """What the server does with one RCPT: a parse error, or the relay decision."""
    parsed = parse_rcpt_to(rcpt_arg, False, SERVER)
    if isinstance(parsed, Reply):
        return parsed
    return relay_decision(client, parsed.address, TRUSTED, relay_domains, local_domains)


def addr(text: str) -> Address:
    parsed = parse_rcpt_to(f"TO:<{text}>", True, SERVER)
    assert isinstance(parsed, RcptArgs), parsed
    return parsed.address


# --- nmap smtp-open-relay ---------------------------------------------------------------------

# The 16 MAIL/RCPT pairs of nmap's smtp-open-relay with domain=ext.example, ip=127.0.0.1 and
# the server calling itself relay.example, and what each must end as.
NMAP_MATRIX = [
    ("<>", f"<relaytest@{EXT}>", DENIED),
    (f"<antispam@{EXT}>", f"<relaytest@{EXT}>", DENIED),
    (f"<antispam@{SERVER}>", f"<relaytest@{EXT}>", DENIED),
    (f"<antispam@[{SERVER_IP}]>", f"<relaytest@{EXT}>", DENIED),
    (f"<antispam@[{SERVER_IP}]>", f"<relaytest%{EXT}@[{SERVER_IP}]>", DENIED),
    (f"<antispam@[{SERVER_IP}]>", f"<relaytest%{EXT}@{SERVER}>", ROUTING),
    (f"<antispam@[{SERVER_IP}]>", f'<"relaytest@{EXT}">', RCPT_UNQUALIFIED),
    (f"<antispam@[{SERVER_IP}]>", f'<"relaytest%{EXT}">', RCPT_UNQUALIFIED),
    (f"<antispam@[{SERVER_IP}]>", f"<relaytest@{EXT}@[{SERVER_IP}]>", RCPT_BAD),
    (f"<antispam@[{SERVER_IP}]>", f'<"relaytest@{EXT}"@[{SERVER_IP}]>', DENIED),
    (f"<antispam@[{SERVER_IP}]>", f"<relaytest@{EXT}@{SERVER}>", RCPT_BAD),
    (f"<antispam@[{SERVER_IP}]>", f"<@[{SERVER_IP}]:relaytest@{EXT}>", RCPT_BAD),
    (f"<antispam@[{SERVER_IP}]>", f"<@{SERVER}:relaytest@{EXT}>", DENIED),
    (f"<antispam@[{SERVER_IP}]>", f"<{EXT}!relaytest>", RCPT_UNQUALIFIED),
    (f"<antispam@[{SERVER_IP}]>", f"<{EXT}!relaytest@[{SERVER_IP}]>", DENIED),
    (f"<antispam@[{SERVER_IP}]>", f"<{EXT}!relaytest@{SERVER}>", ROUTING),
]


@pytest.mark.parametrize(("mail", "rcpt", "expected"), NMAP_MATRIX)
def test_nmap_open_relay_matrix_from_an_untrusted_client(
    mail: str, rcpt: str, expected: RelayDecision | Reply
) -> None:
    assert isinstance(parse_mail_from(f"FROM:{mail}"), MailArgs)
    outcome = decide(f"TO:{rcpt}")
    assert outcome == expected
    # Whatever the path, nothing here may be accepted.
    assert not (isinstance(outcome, RelayDecision) and outcome.allowed)


@pytest.mark.parametrize(
    ("rcpt", "expected"),
    [
        (f'<"u@{EXT}"@{SERVER}>', ROUTING),
        (f"<u%{EXT}@{SERVER}>", ROUTING),
        (f"<{EXT}!u@{SERVER}>", ROUTING),
        (f'<"{EXT}!u"@{SERVER}>', ROUTING),
        (f"<u@{EXT}.>", RCPT_BAD),
        (f"<u@{SERVER}.>", RCPT_BAD),
        (f"<u@{EXT}>", DENIED),
        (f"<u@[{SERVER_IP}]>", DENIED),
        ("<u@[IPv6:::1]>", DENIED),
        ("<u@[IPv6:::ffff:127.0.0.1]>", DENIED),
        (f"<u@sub.{SERVER}>", DENIED),
        (f"<u@x{SERVER}>", DENIED),
        (f"<u@{SERVER}.{EXT}>", DENIED),
        (f"<@{SERVER},@{SERVER}:u@{EXT}>", DENIED),
        (f"<u@{EXT}> NOTIFY=NEVER", DENIED),
        (f'<"u@{EXT}> NOTIFY=NEVER"@{EXT}>', DENIED),
        (f"<postmaster@{EXT}>", DENIED),
        (f"<postmaster@[{SERVER_IP}]>", DENIED),
    ],
)
def test_more_relay_attempts_are_refused(rcpt: str, expected: RelayDecision | Reply) -> None:
    assert decide(f"TO:{rcpt}") == expected


def test_orcpt_does_not_influence_the_decision() -> None:
    # ORCPT is informational: the decision is on the parsed recipient only.
    assert decide(f"TO:<u@{SERVER}> ORCPT=rfc822;u@{EXT}") == RELAY_OK
    assert decide(f"TO:<u@{EXT}> ORCPT=rfc822;u@{SERVER}") == DENIED


def test_address_literal_is_never_a_relay_domain() -> None:
    literal = addr(f"u@[{SERVER_IP}]")
    assert relay_decision(STRANGER, literal, TRUSTED, [f"[{SERVER_IP}]"]) == DENIED


# --- allowed ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"])
def test_trusted_clients_may_relay_anywhere(ip: str) -> None:
    client = ClientInfo(ipaddress.ip_address(ip))
    assert decide(f"TO:<u@{EXT}>", client) == TRUSTED_OK
    # Trust comes first: routing characters are the trusted sender's business.
    assert decide(f"TO:<u%{EXT}@{SERVER}>", client) == TRUSTED_OK


def test_authenticated_clients_may_relay_anywhere() -> None:
    client = ClientInfo(ipaddress.ip_address("203.0.113.9"), authenticated_user="alice", tls=True)
    assert decide(f"TO:<u@{EXT}>", client) == AUTHENTICATED_OK
    assert decide(f"TO:<u@[{SERVER_IP}]>", client) == AUTHENTICATED_OK


@pytest.mark.parametrize(
    "rcpt", [f"<u@{SERVER}>", "<u@RELAY.Example>", "<first.last+tag@relay.example>"]
)
def test_relay_domain_recipients(rcpt: str) -> None:
    assert decide(f"TO:{rcpt}") == RELAY_OK


def test_subdomain_pattern() -> None:
    patterns = ["*.corp.example"]
    assert decide("TO:<u@mx.corp.example>", relay_domains=patterns) == RELAY_OK
    assert decide("TO:<u@a.b.corp.example>", relay_domains=patterns) == RELAY_OK
    assert decide("TO:<u@corp.example>", relay_domains=patterns) == DENIED
    assert decide("TO:<u@evilcorp.example>", relay_domains=patterns) == DENIED
    assert decide("TO:<u%x@mx.corp.example>", relay_domains=patterns) == ROUTING


@pytest.mark.parametrize(
    "rcpt", ["<postmaster>", "<Postmaster>", f"<postmaster@{SERVER}>", f"<PostMaster@{SERVER}>"]
)
def test_postmaster_of_our_own_domains(rcpt: str) -> None:
    # Reachable even when the domain is not a relay domain (RFC 5321 §4.5.1).
    assert decide(f"TO:{rcpt}", relay_domains=[]) == POSTMASTER_OK


def test_postmaster_address_literal_only_when_configured() -> None:
    literal = addr(f"postmaster@[{SERVER_IP}]")
    assert relay_decision(STRANGER, literal, TRUSTED, [], [f"[{SERVER_IP}]"]) == POSTMASTER_OK
    assert relay_decision(STRANGER, literal, TRUSTED, [], [SERVER]) == DENIED


def test_postmaster_of_other_domains_is_not_special() -> None:
    assert decide(f"TO:<postmaster@{EXT}>") == DENIED
    assert decide('TO:<"postmaster"@ext.example>') == DENIED


def test_decision_order() -> None:
    trusted = ClientInfo(ipaddress.ip_address("127.0.0.1"), authenticated_user="alice")
    assert decide(f"TO:<postmaster@{SERVER}>", trusted) == TRUSTED_OK
    authenticated = ClientInfo(ipaddress.ip_address("203.0.113.9"), authenticated_user="alice")
    assert decide(f"TO:<postmaster@{SERVER}>", authenticated) == AUTHENTICATED_OK
    assert decide(f"TO:<postmaster@{SERVER}>") == POSTMASTER_OK


def test_unicode_relay_domain_pattern_matches_the_a_label() -> None:
    recipient = addr("jörg@bücher.example")
    assert relay_decision(STRANGER, recipient, TRUSTED, ["bücher.example"]) == RELAY_OK
    assert relay_decision(STRANGER, recipient, TRUSTED, ["xn--bcher-kva.example"]) == RELAY_OK


# --- is_trusted -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "networks", "trusted"),
    [
        ("127.0.0.1", ["127.0.0.0/8"], True),
        ("10.1.2.3", ["127.0.0.0/8", "10.0.0.0/8"], True),
        ("203.0.113.9", ["127.0.0.0/8", "10.0.0.0/8"], False),
        ("::ffff:127.0.0.1", ["127.0.0.0/8"], True),
        ("::ffff:203.0.113.9", ["127.0.0.0/8"], False),
        ("::ffff:10.0.0.1", ["::ffff:0:0/96"], True),
        ("::1", ["127.0.0.0/8"], False),
        ("::1", ["::1/128"], True),
        ("2001:db8::5", ["2001:db8::/32"], True),
        ("2001:db9::5", ["2001:db8::/32"], False),
        ("127.0.0.1", ["::/0"], False),
        ("::7f00:1", ["127.0.0.0/8"], False),  # IPv4-compatible is not IPv4-mapped
        ("127.0.0.1", [], False),
    ],
)
def test_is_trusted(ip: str, networks: list[str], trusted: bool) -> None:
    nets = [ipaddress.ip_network(n) for n in networks]
    assert is_trusted(ipaddress.ip_address(ip), nets) is trusted


@given(st.ip_addresses(v=4))
def test_ipv4_mapped_clients_are_judged_as_their_ipv4_address(ip: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
    for network in ("127.0.0.0/8", "10.0.0.0/8", "192.0.2.0/24"):
        nets = [ipaddress.ip_network(network)]
        assert is_trusted(mapped, nets) is is_trusted(ip, nets)


@given(st.ip_addresses(), st.sampled_from(["u", "postmaster", "a%b", "x!y", "a@b", "a b"]))
def test_untrusted_unauthenticated_never_reach_foreign_domains(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, local: str
) -> None:
    client = ClientInfo(ip)
    outcome = relay_decision(client, Address(local, EXT), [], RELAY_DOMAINS, LOCAL_DOMAINS)
    assert outcome == DENIED
