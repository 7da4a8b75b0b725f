"""Tests for relaygw.ops.explain and the `relaygw route explain` handler
(relaygw.ops.route_commands).

The RCPT replies explain() reports are checked against the real SMTP server protocol with
the same configuration (test_rcpt_reply_matches_the_daemon), so they cannot drift apart.
DNS (--resolve) is asked of a `python -m tests.support.dns_server` process on loopback only:
this machine's system resolver hangs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from relaygw.config import load_config
from relaygw.delivery.dns import DNSFailure, blocking_result
from relaygw.ops.explain import explain, render_text, resolve
from relaygw.ops.route_commands import add_commands, run_explain
from relaygw.receive.policy import ConfiguredPolicy
from relaygw.results import permanent
from relaygw.smtp.server import ServerSettings, SMTPServerProtocol
from relaygw.testing import TLSStringTransport
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
SECRET = "correct-horse-battery-staple"

CONFIG = """
[server]
hostname = "relay.test"
spool_dir = "spool"

[[listeners]]
address = "127.0.0.1:2525"

[access]
trusted_networks = ["127.0.0.0/8", "192.0.2.0/24"]
relay_domains = ["example.org", "*.lists.example.org"]

[auth]
users_file = "users"

[smarthosts.corp]
hosts = ["smtp.corp.example:587", "[2001:db8::25]"]
tls = "verify"
username = "relay-user"
password_file = "corp.secret"

[aliases]
"team@example.org" = ["ann@example.org", "bob@corp.example", "x@blocked.example"]
"@old.example.org" = "@example.org"

[[routes]]
recipient_domains = ["blocked.example"]
action = "reject"
reply = "550 5.7.1 Blocked by policy"

[[routes]]
recipient_domains = ["example.org", "*.lists.example.org"]
action = "maildir"
maildir = "mail/{domain}/{localpart}"

[[routes]]
authenticated = true
recipient_domains = ["partner.example"]
action = "smarthost"
smarthost = "corp"

[[routes]]
senders = ["re:^$"]
action = "reject"
reply = "550 5.7.1 No bounces to the outside"

[[routes]]
recipient_domains = ["corp.example"]
action = "smarthost"
smarthost = "corp"

[[routes]]
recipient_domains = ["partner.example"]
action = "mx"
"""

ROUTE_SOURCES = [
    '[[routes]]\nrecipient_domains = ["blocked.example"]\naction = "reject"\n'
    'reply = "550 5.7.1 Blocked by policy"',
    '[[routes]]\nrecipient_domains = ["example.org", "*.lists.example.org"]\n'
    'action = "maildir"\nmaildir = "mail/{domain}/{localpart}"',
    '[[routes]]\nauthenticated = true\nrecipient_domains = ["partner.example"]\n'
    'action = "smarthost"\nsmarthost = "corp"',
    '[[routes]]\nsenders = ["re:^$"]\naction = "reject"\n'
    'reply = "550 5.7.1 No bounces to the outside"',
    '[[routes]]\nrecipient_domains = ["corp.example"]\naction = "smarthost"\n'
    'smarthost = "corp"',
    '[[routes]]\nrecipient_domains = ["partner.example"]\naction = "mx"',
]

TRUSTED_DEFAULT_NOTE = (
    "--client-ip not given: explained for 127.0.0.1, which is in access.trusted_networks, "
    "so relaying to any domain is allowed. Pass --client-ip to see what a remote client is "
    "answered.")
MX_NOTE = ("The mx action looks up DNS at delivery, not at RCPT: a DNS problem bounces or "
           "defers the message after it was accepted (--resolve shows what DNS answers now).")
NOT_CONSULTED = ("Aliases and routes are not consulted: the relay check refuses the "
                 "recipient first.")


@pytest.fixture
def config_path(tmp_path):
    (tmp_path / "corp.secret").write_text(SECRET + "\n")
    (tmp_path / "users").write_text("")
    path = tmp_path / "relaygw.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def config(config_path):
    return load_config(config_path)


def smarthost_corp(tmp_path: Path) -> dict:
    return {"name": "corp", "hosts": ["smtp.corp.example:587", "[2001:db8::25]:25"],
            "tls": "verify", "ca_file": None, "username": "relay-user",
            "password_file": str(tmp_path / "corp.secret")}


def route(recipient: str, index: int | None, action: str, nexthop: str = "", **kw) -> dict:
    entry = {"recipient": recipient, "route_index": index,
             "route_source": None if index is None else ROUTE_SOURCES[index],
             "action": action, "nexthop": nexthop, "maildir": None, "smarthost": None,
             "mx": None, "reply": None, "outcome": "deliver", "note": None, "dns": None}
    entry.update(kw)
    return entry


def given(sender: str, recipient: str, client_ip: str = "127.0.0.1", auth_user=None,
          default: bool = False) -> dict:
    return {"from": sender, "to": recipient, "client_ip": client_ip,
            "client_ip_default": default, "auth_user": auth_user, "tls": True,
            "smtputf8": False}


def ok(address: str) -> dict:
    return {"ok": True, "address": address, "reply": None}


# -- explain(): exact results -----------------------------------------------------------------


def test_trusted_client_relays_through_a_smarthost(config, tmp_path):
    result = explain(config, "alice@example.org", "bob@corp.example")
    assert result == {
        "input": given("alice@example.org", "bob@corp.example", default=True),
        "sender_syntax": ok("alice@example.org"),
        "mail_reply": "250 2.1.0 Sender <alice@example.org> OK",
        "recipient_syntax": ok("bob@corp.example"),
        "relay": {"allowed": True, "reason": "trusted", "reply": None,
                  "detail": "client 127.0.0.1 is in access.trusted_networks (127.0.0.0/8)"},
        "aliases": {"expanded": ["bob@corp.example"], "rewritten": False},
        "routes": [route("bob@corp.example", 4, "smarthost", "smarthost:corp",
                         smarthost=smarthost_corp(tmp_path))],
        "accepted": True,
        "rcpt_reply": "250 2.1.5 Recipient <bob@corp.example> OK",
        "dns": None,
        "notes": [TRUSTED_DEFAULT_NOTE],
    }
    text = render_text(result)
    assert text == f"""\
ACCEPTED: 250 2.1.5 Recipient <bob@corp.example> OK

Envelope
  MAIL FROM    <alice@example.org>
               250 2.1.0 Sender <alice@example.org> OK
  RCPT TO      <bob@corp.example>
  client       127.0.0.1 (default)
  auth user    (not authenticated)

Relay
  decision     allowed: trusted network
  why          client 127.0.0.1 is in access.trusted_networks (127.0.0.0/8)

Aliases
  none         no [aliases] entry applies to bob@corp.example

Route for bob@corp.example
  route        routes[4]
  source       [[routes]]
               recipient_domains = ["corp.example"]
               action = "smarthost"
               smarthost = "corp"
  action       smarthost
  next hop     smarthost:corp
  smarthost    corp
  hosts        smtp.corp.example:587, [2001:db8::25]:25  (tried in this order)
  tls          verify: STARTTLS or no delivery, certificate verified
               CA: the system trust store
  username     relay-user
  password     from {tmp_path / "corp.secret"} (never shown)
  outcome      accepted at RCPT, then delivered by this route

Answer at RCPT
  reply        250 2.1.5 Recipient <bob@corp.example> OK
  accepted     yes

Notes
  - --client-ip not given: explained for 127.0.0.1, which is in access.trusted_networks, so
    relaying to any domain is allowed. Pass --client-ip to see what a remote client is answered.
"""
    # The credential's name and file are shown; the secret in it never is.
    assert SECRET not in text
    assert SECRET not in json.dumps(result)


def test_explicit_client_ip_is_not_reported_as_a_default(config):
    result = explain(config, "alice@example.org", "bob@corp.example", client_ip="127.0.0.1")
    assert result["input"]["client_ip_default"] is False
    assert result["notes"] == []
    assert "(default)" not in render_text(result)


def test_untrusted_client_to_a_relay_domain_gets_its_maildir(config, tmp_path):
    result = explain(config, "someone@outside.example", "Ann@Example.ORG",
                     client_ip="203.0.113.7")
    mailbox = str(tmp_path / "mail" / "example.org" / "Ann")
    assert result == {
        "input": given("someone@outside.example", "Ann@Example.ORG", "203.0.113.7"),
        "sender_syntax": ok("someone@outside.example"),
        "mail_reply": "250 2.1.0 Sender <someone@outside.example> OK",
        "recipient_syntax": ok("Ann@example.org"),
        "relay": {"allowed": True, "reason": "relay_domain", "reply": None,
                  "detail": "example.org matches access.relay_domains (example.org)"},
        "aliases": {"expanded": ["Ann@example.org"], "rewritten": False},
        "routes": [route("Ann@example.org", 1, "maildir", mailbox, maildir=mailbox)],
        "accepted": True,
        "rcpt_reply": "250 2.1.5 Recipient <Ann@example.org> OK",
        "dns": None,
        "notes": [],
    }
    text = render_text(result)
    assert f"  maildir      {mailbox}\n" in text
    assert "next hop" not in text  # a maildir's next hop is its path, shown once
    assert "  decision     allowed: relay domain\n" in text


def test_denied_relay(config):
    result = explain(config, "someone@outside.example", "x@partner.example",
                     client_ip="203.0.113.7")
    assert result == {
        "input": given("someone@outside.example", "x@partner.example", "203.0.113.7"),
        "sender_syntax": ok("someone@outside.example"),
        "mail_reply": "250 2.1.0 Sender <someone@outside.example> OK",
        "recipient_syntax": ok("x@partner.example"),
        "relay": {"allowed": False, "reason": "denied",
                  "reply": "554 5.7.1 Relay access denied",
                  "detail": "client 203.0.113.7 is not in access.trusted_networks "
                            "(127.0.0.0/8, 192.0.2.0/24), is not authenticated, and "
                            "partner.example is not in access.relay_domains (example.org, "
                            "*.lists.example.org)"},
        "aliases": None,
        "routes": None,
        "accepted": False,
        "rcpt_reply": "554 5.7.1 Relay access denied",
        "dns": None,
        "notes": [NOT_CONSULTED],
    }
    assert render_text(result) == """\
REFUSED: 554 5.7.1 Relay access denied

Envelope
  MAIL FROM    <someone@outside.example>
               250 2.1.0 Sender <someone@outside.example> OK
  RCPT TO      <x@partner.example>
  client       203.0.113.7
  auth user    (not authenticated)

Relay
  decision     DENIED: not trusted, not authenticated, not a relay domain
  why          client 203.0.113.7 is not in access.trusted_networks (127.0.0.0/8, 192.0.2.0/24),
               is not authenticated, and partner.example is not in access.relay_domains
               (example.org, *.lists.example.org)
  reply        554 5.7.1 Relay access denied

Answer at RCPT
  reply        554 5.7.1 Relay access denied
  accepted     no

Notes
  - Aliases and routes are not consulted: the relay check refuses the recipient first.
"""


def test_address_literal_is_never_a_relay_domain(config):
    result = explain(config, "a@outside.example", "x@[192.0.2.1]", client_ip="203.0.113.7")
    assert result["relay"]["detail"].endswith(
        "and [192.0.2.1] is an address literal, never a relay domain")
    assert result["rcpt_reply"] == "554 5.7.1 Relay access denied"


def test_routing_characters_are_refused_for_untrusted_clients(config):
    result = explain(config, "a@outside.example", "x%y@example.org", client_ip="203.0.113.7")
    assert result["relay"] == {
        "allowed": False, "reason": "routing_characters",
        "reply": "554 5.7.1 Routing characters in local part not allowed",
        "detail": "example.org is a relay domain (example.org), but the local part 'x%y' "
                  "holds %, ! or @, which could make the next hop route the mail elsewhere; "
                  "only trusted or authenticated clients may send that"}
    assert result["rcpt_reply"] == "554 5.7.1 Routing characters in local part not allowed"
    assert result["routes"] is None
    # A trusted client may: the same address is routed.
    trusted = explain(config, "a@outside.example", "x%y@example.org", client_ip="192.0.2.9")
    assert trusted["relay"]["reason"] == "trusted"
    assert trusted["rcpt_reply"] == "250 2.1.5 Recipient <x%y@example.org> OK"


def test_alias_fan_out(config, tmp_path):
    result = explain(config, "a@outside.example", "Team@example.org", client_ip="203.0.113.7")
    assert result["aliases"] == {
        "expanded": ["ann@example.org", "bob@corp.example", "x@blocked.example"],
        "rewritten": True}
    mailbox = str(tmp_path / "mail" / "example.org" / "ann")
    assert result["routes"] == [
        route("ann@example.org", 1, "maildir", mailbox, maildir=mailbox),
        route("bob@corp.example", 4, "smarthost", "smarthost:corp",
              smarthost=smarthost_corp(tmp_path)),
        route("x@blocked.example", 0, "reject", reply="550 5.7.1 Blocked by policy",
              outcome="bounce"),
    ]
    assert result["accepted"] is True
    assert result["rcpt_reply"] == "250 2.1.5 Recipient <Team@example.org> OK"
    assert result["notes"] == [
        "One routable alias target is enough to accept the recipient at RCPT; the targets "
        "whose route rejects bounce at delivery."]
    text = render_text(result)
    assert ("Aliases\n"
            "  3 target(s)  ann@example.org\n"
            "               bob@corp.example\n"
            "               x@blocked.example\n") in text
    assert ("  outcome      accepted at RCPT (another alias target is routable), then bounced "
            "with the reply\n               above\n") in text


def test_domain_alias_rewrites(config, tmp_path):
    result = explain(config, "a@outside.example", "jo@old.example.org")
    assert result["aliases"] == {"expanded": ["jo@example.org"], "rewritten": True}
    assert result["routes"][0]["maildir"] == str(tmp_path / "mail" / "example.org" / "jo")
    assert render_text(result).count("Route for ") == 1


def test_reject_route(config):
    result = explain(config, "a@example.org", "someone@blocked.example")
    assert result["routes"] == [
        route("someone@blocked.example", 0, "reject", reply="550 5.7.1 Blocked by policy",
              outcome="refuse")]
    assert result["accepted"] is False
    assert result["rcpt_reply"] == "550 5.7.1 Blocked by policy"
    text = render_text(result)
    assert text.startswith("REFUSED: 550 5.7.1 Blocked by policy\n")
    assert ("  source       [[routes]]\n"
            '               recipient_domains = ["blocked.example"]\n'
            '               action = "reject"\n'
            '               reply = "550 5.7.1 Blocked by policy"\n') in text


def test_no_route(config):
    result = explain(config, "a@example.org", "x@elsewhere.example")
    reply = "550 5.1.2 No route to destination for <x@elsewhere.example>"
    assert result["routes"] == [
        route("x@elsewhere.example", None, "reject", reply=reply, outcome="refuse",
              note="no [[routes]] entry matches this recipient")]
    assert result["rcpt_reply"] == reply
    assert result["accepted"] is False
    assert "  route        none matched\n" in render_text(result)


def test_unsafe_mailbox_name_on_a_maildir_route(config):
    result = explain(config, "a@example.org", '".hidden"@example.org')
    assert result["routes"] == [
        route('".hidden"@example.org', 1, "reject", reply="550 5.1.3 Invalid mailbox name",
              outcome="refuse",
              note='routes[1] has action = "maildir", but ".hidden"@example.org cannot be '
                   "delivered that way")]
    assert result["rcpt_reply"] == "550 5.1.3 Invalid mailbox name"


def test_authenticated_user(config, tmp_path):
    result = explain(config, "carol@example.org", "x@partner.example", client_ip="203.0.113.7",
                     auth_user="carol")
    assert result["input"] == given("carol@example.org", "x@partner.example", "203.0.113.7",
                                    auth_user="carol")
    assert result["relay"] == {
        "allowed": True, "reason": "authenticated", "reply": None,
        "detail": "the client authenticated as 'carol' (SMTP AUTH)"}
    # routes[2] (authenticated = true) wins over the mx route for the same domain.
    assert result["routes"] == [route("x@partner.example", 2, "smarthost", "smarthost:corp",
                                      smarthost=smarthost_corp(tmp_path))]
    assert result["rcpt_reply"] == "250 2.1.5 Recipient <x@partner.example> OK"
    assert result["notes"] == []
    assert "  auth user    carol\n" in render_text(result)
    # Without AUTH, a trusted client's mail for the same domain goes by MX.
    plain = explain(config, "carol@example.org", "x@partner.example", client_ip="192.0.2.5")
    assert plain["routes"] == [route(
        "x@partner.example", 5, "mx", "mx:partner.example",
        mx={"domain": "partner.example", "port": 25, "tls": "opportunistic", "ca_file": None})]
    assert plain["notes"] == [MX_NOTE]


def test_auth_on_a_trusted_network_is_noted(config):
    result = explain(config, "a@example.org", "x@partner.example", client_ip="192.0.2.5",
                     auth_user="carol")
    assert result["relay"]["reason"] == "trusted"
    assert result["notes"] == [
        "--auth makes no difference to relaying here: the client's network is already "
        "trusted (routes with `authenticated` still see it)."]


def test_auth_without_a_users_file_is_noted(tmp_path):
    path = tmp_path / "plain.toml"
    path.write_text('[server]\nhostname = "relay.test"\nspool_dir = "spool"\n'
                    '[[listeners]]\naddress = "127.0.0.1:2525"\nauth = "none"\n')
    result = explain(load_config(path), "a@b.example", "c@d.example", client_ip="192.0.2.1",
                     auth_user="eve")
    assert result["notes"] == [
        "--auth eve: no [auth] users_file is configured, so no client can authenticate; this "
        "explains a session that cannot happen.", MX_NOTE]  # no [[routes]]: the default mx


@pytest.mark.parametrize("null", ["", "<>", " <> "])
def test_null_sender(config, null):
    result = explain(config, null, "x@partner.example")
    assert result["sender_syntax"] == ok("")
    assert result["mail_reply"] == "250 2.1.0 Sender <> OK"
    # The null sender meets routes[3] (senders = ["re:^$"]) before the mx route.
    assert result["routes"] == [route("x@partner.example", 3, "reject",
                                      reply="550 5.7.1 No bounces to the outside",
                                      outcome="refuse")]
    assert result["rcpt_reply"] == "550 5.7.1 No bounces to the outside"
    assert "  MAIL FROM    <>\n" in render_text(result)


def test_recipient_syntax_error(config):
    result = explain(config, "a@example.org", "bad address@example.org")
    assert result == {
        "input": given("a@example.org", "bad address@example.org", default=True),
        "sender_syntax": ok("a@example.org"),
        "mail_reply": "250 2.1.0 Sender <a@example.org> OK",
        "recipient_syntax": {"ok": False, "address": None,
                             "reply": "501 5.1.3 Bad recipient address syntax"},
        "relay": None,
        "aliases": None,
        "routes": None,
        "accepted": False,
        "rcpt_reply": "501 5.1.3 Bad recipient address syntax",
        "dns": None,
        "notes": [],
    }
    text = render_text(result)
    assert text.startswith("REFUSED: 501 5.1.3 Bad recipient address syntax\n")
    assert ("  RCPT TO      'bad address@example.org'\n"
            "               syntax error: 501 5.1.3 Bad recipient address syntax\n") in text
    unqualified = explain(config, "a@example.org", "bob")
    assert unqualified["rcpt_reply"] == "501 5.1.3 Recipient address must be fully qualified"
    assert explain(config, "a@example.org", "")["rcpt_reply"] == (
        "501 5.1.3 Bad recipient address syntax")


def test_sender_syntax_error_stops_at_mail(config):
    result = explain(config, "not an address", "x@example.org")
    assert result["sender_syntax"] == {"ok": False, "address": None,
                                       "reply": "501 5.1.7 Bad sender address syntax"}
    assert result["mail_reply"] == "501 5.1.7 Bad sender address syntax"
    assert result["recipient_syntax"] == ok("x@example.org")
    assert (result["relay"], result["routes"], result["rcpt_reply"]) == (None, None, None)
    assert result["accepted"] is False
    assert result["notes"] == ["MAIL FROM is refused, so the client never gets to RCPT TO."]
    text = render_text(result)
    assert text.startswith("REFUSED at MAIL FROM: 501 5.1.7 Bad sender address syntax\n")
    assert "  reply        none: MAIL FROM is refused first\n" in text


def test_bare_postmaster_is_this_servers(config):
    result = explain(config, "a@outside.example", "postmaster", client_ip="203.0.113.7")
    assert result["recipient_syntax"] == ok("postmaster@relay.test")
    assert result["relay"] == {
        "allowed": True, "reason": "postmaster", "reply": None,
        "detail": "postmaster@relay.test is this server's postmaster (server.hostname = "
                  "'relay.test'), which any client may write to"}
    # Allowed to relay, but no route takes relay.test in this configuration.
    assert result["rcpt_reply"] == (
        "550 5.1.2 No route to destination for <postmaster@relay.test>")


def test_non_ascii_addresses_are_explained_with_smtputf8(config):
    result = explain(config, "jürgen@example.org", "ännchen@example.org")
    assert result["input"]["smtputf8"] is True
    assert result["rcpt_reply"] == "250 2.1.5 Recipient <ännchen@example.org> OK"
    assert "  SMTPUTF8     yes (a non-ASCII address needs it)\n" in render_text(result)


def test_ipv6_client_and_bad_client_ip(config):
    result = explain(config, "a@example.org", "x@partner.example", client_ip="2001:DB8::1")
    assert result["input"]["client_ip"] == "2001:db8::1"
    assert result["relay"]["reason"] == "denied"
    with pytest.raises(ValueError):
        explain(config, "a@example.org", "x@partner.example", client_ip="not-an-ip")


def test_listener_requiring_auth_is_noted(tmp_path):
    (tmp_path / "users").write_text("")
    path = tmp_path / "auth.toml"
    path.write_text('[server]\nhostname = "relay.test"\nspool_dir = "spool"\n'
                    '[auth]\nusers_file = "users"\n'
                    '[[listeners]]\naddress = "0.0.0.0:587"\nauth = "required"\n')
    result = explain(load_config(path), "a@b.example", "c@d.example", client_ip="127.0.0.1")
    assert result["notes"] == [
        "Listener 0.0.0.0:587 requires AUTH: there, a client that has not authenticated is "
        "refused at MAIL FROM with 530 5.7.0 Authentication required.", MX_NOTE]


# -- parity with the daemon ---------------------------------------------------------------------


def daemon_replies(config, sender: str, recipient: str, client_ip: str,
                   auth_user: str | None) -> tuple[str, str | None]:
    """What the real SMTP protocol with ``config`` answers to MAIL and RCPT."""
    policy = ConfiguredPolicy(lambda: config, SimpleNamespace(free_bytes=None))
    settings = ServerSettings(hostname=config.server.hostname, tls_mode="none",
                              auth_mode="none")
    proto = SMTPServerProtocol(settings, policy, None, None, Clock())
    address = IPv6Address if ":" in client_ip else IPv4Address
    transport = TLSStringTransport(peerAddress=address("TCP", client_ip, 40000))
    proto.makeConnection(transport)

    def send(line: str) -> str:
        transport.clear()
        proto.dataReceived(f"{line}\r\n".encode())
        return transport.value().decode().splitlines()[-1]

    send("EHLO client.example")
    proto.session.auth_user = auth_user  # as a successful AUTH leaves it
    proto.session.tls = True
    utf8 = "" if (sender + recipient).isascii() else " SMTPUTF8"
    mail = send(f"MAIL FROM:<{sender}>{utf8}")
    rcpt = send(f"RCPT TO:<{recipient}>") if mail.startswith("250") else None
    proto.connectionLost()
    return mail, rcpt


PARITY_CASES = [
    ("alice@example.org", "bob@corp.example", "127.0.0.1", None),
    ("someone@outside.example", "Ann@Example.ORG", "203.0.113.7", None),
    ("someone@outside.example", "x@partner.example", "203.0.113.7", None),
    ("a@outside.example", "x@[192.0.2.1]", "203.0.113.7", None),
    ("a@outside.example", "x%y@example.org", "203.0.113.7", None),
    ("a@outside.example", "x%y@example.org", "192.0.2.9", None),
    ("a@outside.example", "Team@example.org", "203.0.113.7", None),
    ("a@outside.example", "jo@old.example.org", "203.0.113.7", None),
    ("a@example.org", "someone@blocked.example", "127.0.0.1", None),
    ("a@example.org", "x@elsewhere.example", "127.0.0.1", None),
    ("a@example.org", '".hidden"@example.org', "127.0.0.1", None),
    ("carol@example.org", "x@partner.example", "203.0.113.7", "carol"),
    ("carol@example.org", "x@partner.example", "192.0.2.5", None),
    ("", "x@partner.example", "127.0.0.1", None),
    ("", "ann@example.org", "203.0.113.7", None),
    ("a@example.org", "bad address@example.org", "127.0.0.1", None),
    ("a@example.org", "bob", "127.0.0.1", None),
    ("not an address", "x@example.org", "127.0.0.1", None),
    ("a@outside.example", "postmaster", "203.0.113.7", None),
    ("a@outside.example", "PostMaster@relay.test", "::ffff:203.0.113.7", None),
    ("jürgen@example.org", "ännchen@example.org", "127.0.0.1", None),
    ("a@example.org", "x@partner.example", "2001:db8::1", None),
    ("a@example.org", "x@partner.example", "::ffff:192.0.2.5", None),
]


@pytest.mark.parametrize(("sender", "recipient", "client_ip", "auth_user"), PARITY_CASES)
def test_rcpt_reply_matches_the_daemon(config, sender, recipient, client_ip, auth_user):
    mail, rcpt = daemon_replies(config, sender, recipient, client_ip, auth_user)
    result = explain(config, sender, recipient, client_ip=client_ip, auth_user=auth_user)
    assert result["mail_reply"] == mail
    assert result["rcpt_reply"] == rcpt
    assert result["accepted"] == (rcpt is not None and rcpt.startswith("250"))


# -- the command handler, through a throwaway parser --------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="relaygw")
    add_commands(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
        code = args.func(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_accepted_is_exit_0_and_prints_the_report(config_path, config, capsys):
    argv = ["route", "explain", "-c", str(config_path), "--from", "a@example.org",
            "--to", "bob@corp.example"]
    code, out, err = run_cli(argv, capsys)
    assert (code, err) == (0, "")
    assert out == render_text(explain(config, "a@example.org", "bob@corp.example"))
    assert SECRET not in out


def test_cli_json_equals_explain(config_path, config, capsys):
    argv = ["route", "explain", "--config", str(config_path), "--from", "<>",
            "--to", "Team@example.org", "--client-ip", "203.0.113.7", "--auth", "carol",
            "--json"]
    code, out, err = run_cli(argv, capsys)
    assert (code, err) == (0, "")
    assert json.loads(out) == explain(config, "<>", "Team@example.org",
                                      client_ip="203.0.113.7", auth_user="carol")
    assert SECRET not in out


def test_cli_refused_is_exit_1(config_path, capsys):
    base = ["route", "explain", "-c", str(config_path), "--from", "a@outside.example"]
    code, out, _ = run_cli([*base, "--to", "x@partner.example", "--client-ip", "203.0.113.7"],
                           capsys)
    assert code == 1
    assert out.startswith("REFUSED: 554 5.7.1 Relay access denied\n")
    code, out, _ = run_cli([*base, "--to", "x@elsewhere.example", "--json"], capsys)
    assert code == 1
    assert json.loads(out)["rcpt_reply"] == (
        "550 5.1.2 No route to destination for <x@elsewhere.example>")
    code, out, _ = run_cli([*base, "--to", "bad address"], capsys)
    assert code == 1


def test_cli_config_errors_are_exit_2_one_per_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nmax_recipients = 0\nbogus = 1\n[[routes]]\naction = "fly"\n')
    code, out, err = run_cli(["route", "explain", "-c", str(bad), "--from", "a@b.example",
                              "--to", "c@d.example"], capsys)
    assert (code, out) == (2, "")
    # One problem a line, as `relaygw check-config` prints them.
    assert err == ("server.bogus: unknown key\n"
                   "server.max_recipients: must be >= 1 (got 0)\n"
                   "listeners: at least one listener is required\n"
                   'routes[0].action: must be one of maildir, smarthost, mx, reject (got "fly")\n')
    code, out, err = run_cli(["route", "explain", "-c", str(tmp_path / "missing.toml"),
                              "--from", "a@b.example", "--to", "c@d.example"], capsys)
    assert (code, out) == (2, "")
    assert err == f"{tmp_path / 'missing.toml'}: cannot read: No such file or directory\n"


def test_cli_usage_errors_are_exit_2(config_path, capsys):
    code, _, err = run_cli(["route", "explain", "-c", str(config_path), "--from", "a@b.example",
                            "--to", "c@d.example", "--client-ip", "300.1.1.1"], capsys)
    assert code == 2
    assert "not an IP address: '300.1.1.1'" in err
    code, _, err = run_cli(["route", "explain", "--from", "a@b.example"], capsys)
    assert code == 2
    assert "--to" in err
    code, _, _ = run_cli(["route"], capsys)
    assert code == 2


def test_cli_warnings_go_to_stderr(tmp_path, capsys):
    path = tmp_path / "open.toml"
    path.write_text('[server]\nhostname = "relay.test"\nspool_dir = "spool"\n'
                    '[[listeners]]\naddress = "127.0.0.1:2525"\n'
                    '[access]\nrelay_domains = ["*"]\n')
    code, out, err = run_cli(["route", "explain", "-c", str(path), "--from", "a@b.example",
                              "--to", "c@d.example", "--json"], capsys)
    assert code == 0
    assert err == 'warning: access.relay_domains: "*" makes relaygw an open relay\n'
    json.loads(out)


def test_cli_without_config_uses_the_built_in_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(["route", "explain", "--from", "a@b.example", "--to", "c@d.example",
                            "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    mailbox = str(tmp_path / "relaygw-data" / "maildir" / "d.example" / "c")
    assert result["routes"][0]["maildir"] == mailbox
    assert not (tmp_path / "relaygw-data").exists()  # nothing is created


def test_run_explain_is_the_handler():
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["route", "explain", "--from", "", "--to", "x@y.example"])
    assert args.func is run_explain
    assert (args.sender, args.recipient, args.client_ip, args.auth_user, args.resolve,
            args.config, args.json) == ("", "x@y.example", None, None, False, None, False)


# -- --resolve, against a loopback DNS server ---------------------------------------------------

ZONE = {
    "mx": [["partner.example", 20, "mx-b.partner.example"],
           ["partner.example", 10, "mx1.partner.example"],
           ["partner.example", 20, "mx-a.partner.example"],
           ["loop.example", 10, "relay.test"]],
    "a": [["mx1.partner.example", "192.0.2.10"], ["mx-a.partner.example", "192.0.2.21"],
          ["smtp.corp.example", "192.0.2.30"], ["bare.example", "192.0.2.40"],
          ["relay.test", "192.0.2.1"]],
    "aaaa": [["mx1.partner.example", "2001:db8::10"]],
    "txt": [["noaddr.example", "no address"]],
    "null_mx": ["nomail.example"],
    "servfail": ["broken.example"],
}


@pytest.fixture(scope="module")
def dns_port(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dns")
    zone_file, port_file = directory / "zone.json", directory / "port"
    zone_file.write_text(json.dumps(ZONE))
    with open(directory / "stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.dns_server", "--port-file", str(port_file),
             "--zone-file", str(zone_file)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        # Written atomically once it listens; or the server has died.
        wait_until(lambda: port_file.exists() or proc.poll() is not None, timeout=20,
                   what="the DNS server's port file")
        assert proc.poll() is None, (directory / "stderr").read_text()
        yield int(port_file.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def dns_config(tmp_path, dns_port):
    (tmp_path / "corp.secret").write_text(SECRET)
    path = tmp_path / "dns.toml"
    path.write_text(f"""
[server]
hostname = "relay.test"
spool_dir = "spool"
[[listeners]]
address = "127.0.0.1:2525"
[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = 2.0
[delivery]
mx_port = 2525
[smarthosts.corp]
hosts = ["smtp.corp.example:587", "192.0.2.31", "gone.example"]
tls = "opportunistic"
[[routes]]
recipient_domains = ["corp.example"]
action = "smarthost"
smarthost = "corp"
[[routes]]
action = "mx"
""")
    return load_config(path)


def resolved(config, recipient: str) -> dict:
    result = resolve(config, explain(config, "a@example.org", recipient))
    assert len(result["routes"]) == 1
    return result["routes"][0]["dns"]


def host(name, preference, port, addresses=(), error=None) -> dict:
    return {"host": name, "preference": preference, "port": port,
            "addresses": list(addresses), "error": error}


@pytest.mark.integration
def test_resolve_mx_hosts_by_preference_with_addresses(dns_config, dns_port):
    result = resolve(dns_config, explain(dns_config, "a@example.org", "x@partner.example"))
    assert result["dns"] == {"nameservers": [f"127.0.0.1:{dns_port}"], "timeout": 2.0}
    missing = {"status": "permanent", "enhanced": "5.1.2",
               "text": "Host mx-b.partner.example does not exist", "effect": "skip"}
    assert result["routes"][0]["dns"] == {
        "implicit": False,
        "hosts": [host("mx1.partner.example", 10, 2525, ["192.0.2.10", "2001:db8::10"]),
                  host("mx-a.partner.example", 20, 2525, ["192.0.2.21"]),
                  host("mx-b.partner.example", 20, 2525, error=missing)],
        "error": None}
    # explain() itself never resolves; resolve() leaves its input alone.
    assert explain(dns_config, "a@example.org", "x@partner.example")["routes"][0]["dns"] is None
    text = render_text(result)
    assert (f"DNS (--resolve)\n  servers      127.0.0.1:{dns_port}\n"
            "  timeout      2s per lookup\n") in text
    assert ("  MX 10        mx1.partner.example:2525\n"
            "                 192.0.2.10, 2001:db8::10\n"
            "  MX 20        mx-a.partner.example:2525  (equal preference: random order at each "
            "attempt)\n"
            "                 192.0.2.21\n"
            "  MX 20        mx-b.partner.example:2525  (equal preference: random order at each "
            "attempt)\n"
            "                 permanent 5.1.2 Host mx-b.partner.example does not exist: "
            "delivery skips this host\n"
            "  DNS result   ok: delivery tries these hosts in order\n"
            "  outcome      accepted at RCPT, then delivered by this route\n") in text


@pytest.mark.integration
def test_resolve_null_mx(dns_config):
    assert resolved(dns_config, "x@nomail.example") == {
        "implicit": None, "hosts": [],
        "error": {"status": "permanent", "enhanced": "5.1.10",
                  "text": "Domain nomail.example does not accept mail (null MX)",
                  "effect": "bounce"}}


@pytest.mark.integration
def test_resolve_nxdomain(dns_config):
    dns = resolved(dns_config, "x@nx.example")
    assert dns == {"implicit": None, "hosts": [],
                   "error": {"status": "permanent", "enhanced": "5.1.2",
                             "text": "Domain nx.example does not exist", "effect": "bounce"}}
    result = resolve(dns_config, explain(dns_config, "a@example.org", "x@nx.example"))
    text = render_text(result)
    assert ("  DNS result   permanent 5.1.2 Domain nx.example does not exist: delivery bounces "
            "the message\n"
            "  outcome      accepted at RCPT, then bounced: see the DNS result\n") in text
    assert text.startswith("ACCEPTED: 250 2.1.5 Recipient <x@nx.example> OK\n")


@pytest.mark.integration
def test_resolve_servfail_is_transient(dns_config):
    assert resolved(dns_config, "x@broken.example")["error"] == {
        "status": "transient", "enhanced": "4.4.3",
        "text": "DNS lookup of broken.example failed: all nameservers failed (SERVFAIL)",
        "effect": "retry"}


@pytest.mark.integration
def test_resolve_implicit_mx_and_no_address(dns_config):
    assert resolved(dns_config, "x@bare.example") == {
        "implicit": True, "hosts": [host("bare.example", 0, 2525, ["192.0.2.40"])],
        "error": None}
    assert resolved(dns_config, "x@noaddr.example")["error"] == {
        "status": "permanent", "enhanced": "5.1.2",
        "text": "Domain noaddr.example has no MX or address records", "effect": "bounce"}


@pytest.mark.integration
def test_resolve_mx_pointing_at_this_server(dns_config):
    assert resolved(dns_config, "x@loop.example") == {
        "implicit": False, "hosts": [host("relay.test", 10, 2525, ["192.0.2.1"])],
        "error": {"status": "permanent", "enhanced": "5.4.6",
                  "text": "mail for loop.example loops back to myself (MX relay.test)",
                  "effect": "bounce"}}


@pytest.mark.integration
def test_resolve_smarthost_addresses(dns_config):
    gone = {"status": "permanent", "enhanced": "5.1.2", "text": "Host gone.example does not exist",
            "effect": "skip"}
    assert resolved(dns_config, "x@corp.example") == {
        "implicit": None,
        "hosts": [host("smtp.corp.example", None, 587, ["192.0.2.30"]),
                  host("192.0.2.31", None, 25, ["192.0.2.31"]),
                  host("gone.example", None, 25, error=gone)],
        "error": None}


def test_resolve_leaves_refused_and_local_routes_alone(config):
    denied = explain(config, "a@b.example", "x@partner.example", client_ip="203.0.113.7")
    assert resolve(config, denied)["routes"] is None
    maildir = resolve(config, explain(config, "a@b.example", "ann@example.org"))
    assert maildir["routes"][0]["dns"] is None
    assert maildir["dns"] == {"nameservers": [], "timeout": 5.0}  # nothing was asked


@pytest.mark.integration
def test_cli_resolve(dns_config, capsys):
    argv = ["route", "explain", "-c", str(dns_config.source_path), "--from", "a@example.org",
            "--to", "x@nomail.example", "--resolve", "--json"]
    code, out, _ = run_cli(argv, capsys)
    assert code == 0  # DNS is not consulted at RCPT: the recipient is still accepted
    assert json.loads(out) == resolve(
        dns_config, explain(dns_config, "a@example.org", "x@nomail.example"))


# -- relaygw.delivery.dns blocking helpers ---------------------------------------------------------


def test_blocking_result():
    failure = DNSFailure(permanent("5.1.2", "Domain x does not exist"))
    with pytest.raises(DNSFailure) as caught:
        blocking_result(fail(failure))
    assert caught.value is failure
    with pytest.raises(RuntimeError, match="has not fired"):
        blocking_result(Deferred())


def test_blocking_resolver_answers_literals_without_a_query():
    from relaygw.delivery.dns import MXAnswer, MXHost, blocking_resolver

    resolver = blocking_resolver([("127.0.0.1", 9)], timeout=0.5)
    assert blocking_result(resolver.mx_hosts("[192.0.2.1]")) == MXAnswer(
        (MXHost(0, "[192.0.2.1]"),), implicit=True)
    assert blocking_result(resolver.host_addresses("2001:db8::1")) == ["2001:db8::1"]


def test_a_sender_the_auth_senders_table_does_not_allow_is_refused_at_mail(config_path):
    config_path.write_text(CONFIG.replace(
        '[auth]\nusers_file = "users"\n',
        '[auth]\nusers_file = "users"\n[auth.senders]\nann = ["ann@example.org"]\n'))
    config = load_config(config_path)
    result = explain(config, "ceo@example.org", "bob@corp.example", client_ip="203.0.113.7",
                     auth_user="ann")
    assert result["mail_reply"] == "553 5.7.1 Sender address <ceo@example.org> not allowed " \
                                   "for user ann"
    assert (result["relay"], result["routes"], result["rcpt_reply"]) == (None, None, None)
    assert result["notes"][:2] == [
        "auth.senders binds 'ann' to ann@example.org; <ceo@example.org> matches none of them.",
        "MAIL FROM is refused, so the client never gets to RCPT TO."]
    assert render_text(result).startswith(
        "REFUSED at MAIL FROM: 553 5.7.1 Sender address <ceo@example.org> not allowed for "
        "user ann\n")
    allowed = explain(config, "ann@example.org", "bob@corp.example", client_ip="203.0.113.7",
                      auth_user="ann")
    assert allowed["mail_reply"] == "250 2.1.0 Sender <ann@example.org> OK"
    assert allowed["accepted"] is True
    anyone = explain(config, "ceo@example.org", "bob@corp.example", client_ip="203.0.113.7",
                     auth_user="bob")
    assert anyone["mail_reply"] == "250 2.1.0 Sender <ceo@example.org> OK"
