"""Tests for relaygw.routing: aliases, first-match routes, maildir paths."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relaygw.config import AliasEntry, Config, parse_config
from relaygw.results import PERMANENT
from relaygw.routing import (
    RouteContext,
    RouteDecision,
    expand_aliases,
    maildir_path,
    route_recipient,
)

LISTENER = '[[listeners]]\naddress = "127.0.0.1:2525"\n'

EXAMPLE = LISTENER + """
[smarthosts.exchange]
hosts = ["10.0.0.5"]
tls = "opportunistic"

[aliases]
"postmaster@example.org" = ["ops@corp.example", "noc@corp.example"]
"@old.example" = "@example.org"

[[routes]]
recipient_domains = ["example.org", "*.example.org"]
action = "maildir"
maildir = "/var/mail/{domain}/{localpart}"

[[routes]]
recipient_domains = ["corp.example"]
senders = ["*@example.org"]
action = "smarthost"
smarthost = "exchange"

[[routes]]
recipients = ["re:^noreply-"]
action = "reject"
reply = "550 5.1.1 Mailbox unavailable"

[[routes]]
action = "mx"
"""

SMARTHOSTS = """
[smarthosts.a]
hosts = ["10.0.0.1"]
[smarthosts.b]
hosts = ["10.0.0.2"]
"""

FROM_INSIDE = RouteContext("alice@example.org", ipaddress.ip_address("192.0.2.10"), False)
FROM_OUTSIDE = RouteContext("bob@other.net", ipaddress.ip_address("198.51.100.7"), False)
BOUNCE = RouteContext("", None, False)


def make_config(text: str, base_dir: Path) -> Config:
    return parse_config(tomllib.loads(text), base_dir=base_dir)


def routes(text: str, base_dir: Path) -> Config:
    """A config of a listener, smarthosts "a" and "b", and the given tables."""
    return make_config(LISTENER + SMARTHOSTS + text, base_dir)


@pytest.fixture
def example_config(tmp_path: Path) -> Config:
    return make_config(EXAMPLE, tmp_path)


def ctx(sender: str = "s@example.net", ip: str | None = "192.0.2.1",
        authenticated: bool = False) -> RouteContext:
    return RouteContext(sender, None if ip is None else ipaddress.ip_address(ip), authenticated)


# -- the example configuration ---------------------------------------------------------------

def test_example_local_domain_goes_to_maildir(example_config: Config) -> None:
    decision = route_recipient("user@example.org", FROM_OUTSIDE, example_config)
    assert decision == RouteDecision(
        action="maildir", recipient="user@example.org", route_index=0,
        nexthop="/var/mail/example.org/user", maildir=Path("/var/mail/example.org/user"),
        domain="example.org", original="user@example.org")
    assert decision.route_label == "routes[0]"


def test_example_subdomain_goes_to_maildir_with_lowercase_domain(example_config: Config) -> None:
    decision = route_recipient("Jane.Doe@Lists.Example.ORG", FROM_OUTSIDE, example_config)
    assert decision.action == "maildir"
    assert decision.maildir == Path("/var/mail/lists.example.org/Jane.Doe")
    assert decision.domain == "lists.example.org"


def test_example_corp_from_local_sender_goes_to_smarthost(example_config: Config) -> None:
    decision = route_recipient("ops@corp.example", FROM_INSIDE, example_config)
    assert decision == RouteDecision(
        action="smarthost", recipient="ops@corp.example", route_index=1,
        nexthop="smarthost:exchange", smarthost="exchange", domain="corp.example",
        original="ops@corp.example")


def test_example_corp_from_other_sender_falls_through_to_mx(example_config: Config) -> None:
    decision = route_recipient("ops@corp.example", FROM_OUTSIDE, example_config)
    assert (decision.action, decision.route_index, decision.nexthop) == ("mx", 3, "mx:corp.example")


def test_example_noreply_is_rejected_by_route(example_config: Config) -> None:
    decision = route_recipient("noreply-billing@shop.example", FROM_OUTSIDE, example_config)
    assert decision == RouteDecision(
        action="reject", recipient="noreply-billing@shop.example", route_index=2, nexthop="",
        domain="shop.example", reply=(550, "5.1.1", "Mailbox unavailable"),
        original="noreply-billing@shop.example")
    assert decision.route_label == "routes[2]"


def test_example_noreply_at_local_domain_hits_the_earlier_maildir_route(
        example_config: Config) -> None:
    decision = route_recipient("noreply-x@example.org", FROM_OUTSIDE, example_config)
    assert (decision.action, decision.route_index) == ("maildir", 0)


def test_example_anything_else_goes_to_mx(example_config: Config) -> None:
    decision = route_recipient("someone@Elsewhere.NET", FROM_OUTSIDE, example_config)
    assert decision == RouteDecision(
        action="mx", recipient="someone@Elsewhere.NET", route_index=3, nexthop="mx:elsewhere.net",
        domain="elsewhere.net", original="someone@Elsewhere.NET")


def test_example_aliases_then_routes(example_config: Config) -> None:
    # As a message goes: aliases expanded on arrival, then each final recipient routed.
    recipients = ["postmaster@example.org", "john@old.example", "user@example.org",
                  "x@elsewhere.net"]
    decisions = [route_recipient(final, FROM_INSIDE, example_config, original=rcpt)
                 for rcpt in recipients for final in expand_aliases(rcpt, example_config.aliases)]
    assert [(d.original, d.recipient, d.action, d.nexthop) for d in decisions] == [
        ("postmaster@example.org", "ops@corp.example", "smarthost", "smarthost:exchange"),
        ("postmaster@example.org", "noc@corp.example", "smarthost", "smarthost:exchange"),
        ("john@old.example", "john@example.org", "maildir", "/var/mail/example.org/john"),
        ("user@example.org", "user@example.org", "maildir", "/var/mail/example.org/user"),
        ("x@elsewhere.net", "x@elsewhere.net", "mx", "mx:elsewhere.net"),
    ]


def test_bounce_to_corp_goes_to_mx_not_the_sender_restricted_route(
        example_config: Config) -> None:
    decision = route_recipient("ops@corp.example", BOUNCE, example_config)
    assert (decision.action, decision.route_index) == ("mx", 3)


def test_routing_follows_the_config_it_is_given(example_config: Config, tmp_path: Path) -> None:
    # Queued mail is routed again at each attempt: a new config gives a new answer.
    changed = make_config(EXAMPLE.replace('recipient_domains = ["corp.example"]\n'
                                          'senders = ["*@example.org"]\n',
                                          'recipient_domains = ["corp.example"]\n'), tmp_path)
    assert route_recipient("ops@corp.example", FROM_OUTSIDE, example_config).action == "mx"
    assert route_recipient("ops@corp.example", FROM_OUTSIDE, changed).action == "smarthost"


# -- matching ----------------------------------------------------------------------------------

def test_first_match_wins(tmp_path: Path) -> None:
    config = routes("""
[[routes]]
recipient_domains = ["example.com"]
action = "smarthost"
smarthost = "a"
[[routes]]
recipient_domains = ["example.com", "example.net"]
action = "smarthost"
smarthost = "b"
""", tmp_path)
    assert route_recipient("x@example.com", ctx(), config).smarthost == "a"
    assert route_recipient("x@example.net", ctx(), config).smarthost == "b"


def test_every_given_key_must_match(tmp_path: Path) -> None:
    config = routes("""
[[routes]]
recipient_domains = ["example.com"]
recipients = ["sales-*"]
senders = ["*@partner.example"]
client_networks = ["192.0.2.0/24"]
authenticated = true
action = "smarthost"
smarthost = "a"
[[routes]]
action = "smarthost"
smarthost = "b"
""", tmp_path)

    def label(rcpt: str = "sales-eu@example.com", sender: str = "p@partner.example",
              ip: str | None = "192.0.2.9", authenticated: bool = True) -> str:
        return route_recipient(rcpt, ctx(sender, ip, authenticated), config).route_label

    assert label() == "routes[0]"
    assert label(rcpt="sales-eu@example.net") == "routes[1]"  # domain
    assert label(rcpt="support@example.com") == "routes[1]"  # recipients
    assert label(sender="p@other.example") == "routes[1]"  # senders
    assert label(ip="198.51.100.1") == "routes[1]"  # client_networks
    assert label(authenticated=False) == "routes[1]"  # authenticated


def test_wildcard_domain_matches_subdomains_but_not_the_apex(tmp_path: Path) -> None:
    config = routes("""
[[routes]]
recipient_domains = ["*.example.com"]
action = "smarthost"
smarthost = "a"
""", tmp_path)
    assert route_recipient("x@a.b.example.com", ctx(), config).route_index == 0
    assert route_recipient("x@example.com", ctx(), config).route_index is None
    assert route_recipient("x@badexample.com", ctx(), config).route_index is None


def test_star_domain_matches_every_domain(tmp_path: Path) -> None:
    config = routes("""
[[routes]]
recipient_domains = ["*"]
action = "smarthost"
smarthost = "a"
""", tmp_path)
    assert route_recipient("x@anything.example", ctx(), config).route_index == 0
    assert route_recipient("x@[192.0.2.1]", ctx(), config).route_index == 0


def test_idn_domain_matches_its_a_label(tmp_path: Path) -> None:
    config = routes("""
[[routes]]
recipient_domains = ["bücher.example"]
action = "smarthost"
smarthost = "a"
""", tmp_path)
    assert route_recipient("x@xn--bcher-kva.example", ctx(), config).route_index == 0
    assert route_recipient("x@bücher.example", ctx(), config).domain == "xn--bcher-kva.example"


SENDER_ROUTES = """
[[routes]]
senders = ["*@example.org"]
action = "smarthost"
smarthost = "a"
[[routes]]
senders = ["*"]
action = "smarthost"
smarthost = "b"
"""


def test_sender_glob(tmp_path: Path) -> None:
    config = routes(SENDER_ROUTES, tmp_path)
    assert route_recipient("r@x.example", ctx("alice@example.org"), config).smarthost == "a"
    assert route_recipient("r@x.example", ctx("Alice@EXAMPLE.ORG"), config).smarthost == "a"
    assert route_recipient("r@x.example", ctx("alice@sub.example.org"), config).smarthost == "b"
    assert route_recipient("r@x.example", ctx("alice@example.org.evil"),
                           config).smarthost == "b"


def test_null_sender_matches_only_patterns_that_match_empty(tmp_path: Path) -> None:
    config = routes(SENDER_ROUTES, tmp_path)
    assert route_recipient("r@x.example", ctx(""), config).smarthost == "b"  # "*" matches ""
    only_domain = routes("""
[[routes]]
senders = ["*@example.org"]
action = "smarthost"
smarthost = "a"
""", tmp_path)
    decision = route_recipient("r@x.example", ctx(""), only_domain)
    assert (decision.action, decision.route_index) == ("reject", None)
    null_only = routes("""
[[routes]]
senders = ["re:^$"]
action = "smarthost"
smarthost = "a"
""", tmp_path)
    assert route_recipient("r@x.example", ctx(""), null_only).smarthost == "a"
    assert route_recipient("r@x.example", ctx("a@b.example"), null_only).route_index is None


def test_client_networks(tmp_path: Path) -> None:
    config = routes("""
[[routes]]
client_networks = ["192.0.2.0/24", "2001:db8::/32"]
action = "smarthost"
smarthost = "a"
""", tmp_path)

    def index(ip: str | None) -> int | None:
        return route_recipient("r@x.example", ctx(ip=ip), config).route_index

    assert index("192.0.2.200") == 0
    assert index("2001:db8::25") == 0
    assert index("::ffff:192.0.2.7") == 0  # IPv4 client on a dual-stack listener
    assert index("192.0.3.1") is None
    assert index("2001:db9::1") is None
    assert index(None) is None  # locally generated mail never matches client_networks


@pytest.mark.parametrize(("authenticated", "expected"), [(True, "a"), (False, "b")])
def test_authenticated_true(tmp_path: Path, authenticated: bool, expected: str) -> None:
    config = routes("""
[[routes]]
authenticated = true
action = "smarthost"
smarthost = "a"
[[routes]]
action = "smarthost"
smarthost = "b"
""", tmp_path)
    decision = route_recipient("r@x.example", ctx(authenticated=authenticated), config)
    assert decision.smarthost == expected


@pytest.mark.parametrize(("authenticated", "expected"), [(True, None), (False, 0)])
def test_authenticated_false(tmp_path: Path, authenticated: bool, expected: int | None) -> None:
    config = routes("""
[[routes]]
authenticated = false
action = "mx"
""", tmp_path)
    decision = route_recipient("r@x.example", ctx(authenticated=authenticated), config)
    assert decision.route_index == expected


def test_regex_and_glob_recipients(tmp_path: Path) -> None:
    config = routes("""
[[routes]]
recipients = ["re:^noreply-", "abuse@*"]
action = "reject"
reply = "550 5.7.1 Not here"
""", tmp_path)

    def reply(rcpt: str) -> tuple[int, str, str] | None:
        return route_recipient(rcpt, ctx(), config).reply

    assert reply("noreply-x@a.example") == (550, "5.7.1", "Not here")
    assert reply("NoReply-x@a.example") == (550, "5.7.1", "Not here")  # case-insensitive
    assert reply("abuse@a.example") == (550, "5.7.1", "Not here")
    no_route = (550, "5.1.2", "No route to destination for <x-noreply-@a.example>")
    assert reply("x-noreply-@a.example") == no_route
    assert reply("xabuse@a.example") == (550, "5.1.2",
                                         "No route to destination for <xabuse@a.example>")


def test_reject_route_without_reply_uses_the_default(tmp_path: Path) -> None:
    config = routes('[[routes]]\naction = "reject"\n', tmp_path)
    assert route_recipient("r@x.example", ctx(), config).reply == (
        550, "5.1.1", "Mailbox unavailable")


def test_no_route_is_550_5_1_2(tmp_path: Path) -> None:
    config = routes("""
[[routes]]
recipient_domains = ["example.com"]
action = "mx"
""", tmp_path)
    decision = route_recipient("who@nowhere.example", ctx(), config)
    assert decision == RouteDecision(
        action="reject", recipient="who@nowhere.example", route_index=None, nexthop="",
        domain="nowhere.example",
        reply=(550, "5.1.2", "No route to destination for <who@nowhere.example>"),
        original="who@nowhere.example")
    assert decision.route_label == "none"
    result = decision.as_delivery_result()
    assert result is not None
    assert (result.status, result.code, result.enhanced, result.text) == (
        PERMANENT, 550, "5.1.2", "No route to destination for <who@nowhere.example>")
    assert result.diagnostic == "550 5.1.2 No route to destination for <who@nowhere.example>"


def test_only_rejects_give_a_delivery_result(example_config: Config) -> None:
    assert route_recipient("u@example.org", FROM_INSIDE, example_config).as_delivery_result() \
        is None


def test_unsafe_maildir_name_rejects_with_5_1_3(example_config: Config) -> None:
    decision = route_recipient("../../etc/passwd@example.org", FROM_OUTSIDE, example_config)
    assert decision == RouteDecision(
        action="reject", recipient="../../etc/passwd@example.org", route_index=0, nexthop="",
        domain="example.org", reply=(550, "5.1.3", "Invalid mailbox name"),
        original="../../etc/passwd@example.org")


def test_mx_needs_a_domain(tmp_path: Path) -> None:
    config = routes('[[routes]]\naction = "mx"\n', tmp_path)
    decision = route_recipient("postmaster", ctx(), config)
    assert (decision.action, decision.route_index, decision.reply) == (
        "reject", 0, (550, "5.1.3", "Recipient address has no domain"))


def test_no_routes_means_mx_for_everything(tmp_path: Path) -> None:
    config = make_config(LISTENER, tmp_path)
    assert route_recipient("r@x.example", ctx(), config).nexthop == "mx:x.example"


def test_relative_maildir_template_resolves_against_base_dir(tmp_path: Path) -> None:
    config = routes('[[routes]]\naction = "maildir"\nmaildir = "mail/{domain}/{localpart}"\n',
                    tmp_path)
    decision = route_recipient("Bob@X.example", ctx(), config)
    assert decision.maildir == tmp_path / "mail" / "x.example" / "Bob"
    assert decision.nexthop == str(tmp_path / "mail" / "x.example" / "Bob")


def test_decisions_are_frozen(example_config: Config) -> None:
    decision = route_recipient("u@example.org", FROM_INSIDE, example_config)
    with pytest.raises(FrozenInstanceError):
        decision.action = "mx"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        FROM_INSIDE.authenticated = True  # type: ignore[misc]


# -- aliases -----------------------------------------------------------------------------------

def test_alias_fan_out() -> None:
    table = [AliasEntry("postmaster@example.org", ("ops@corp.example", "noc@corp.example"))]
    assert expand_aliases("postmaster@example.org", table) == [
        "ops@corp.example", "noc@corp.example"]
    assert expand_aliases("other@example.org", table) == ["other@example.org"]


def test_domain_rewrite_keeps_the_local_part() -> None:
    table = [AliasEntry("@old.example", ("@example.org",))]
    assert expand_aliases("John.Smith@old.example", table) == ["John.Smith@example.org"]
    assert expand_aliases('"john smith"@old.example', table) == ['"john smith"@example.org']
    assert expand_aliases("x@sub.old.example", table) == ["x@sub.old.example"]  # exact domain


def test_exact_alias_wins_over_domain_rewrite() -> None:
    table = [AliasEntry("@old.example", ("@example.org",)),
             AliasEntry("boss@old.example", ("ceo@corp.example",))]
    assert expand_aliases("boss@old.example", table) == ["ceo@corp.example"]
    assert expand_aliases("staff@old.example", table) == ["staff@example.org"]


def test_alias_recursion_and_rewrite_then_alias() -> None:
    table = [
        AliasEntry("@old.example", ("@example.org",)),
        AliasEntry("postmaster@example.org", ("ops@example.org", "admins@example.org")),
        AliasEntry("admins@example.org", ("ann@corp.example", "ops@example.org",
                                          "ben@corp.example")),
    ]
    # old.example → example.org → postmaster's list → admins' list; ops appears once.
    assert expand_aliases("postmaster@old.example", table) == [
        "ops@example.org", "ann@corp.example", "ben@corp.example"]


def test_alias_lookup_ignores_case() -> None:
    table = [AliasEntry("postmaster@example.org", ("ops@corp.example",)),
             AliasEntry("@old.example", ("@example.org",))]
    assert expand_aliases("PostMaster@EXAMPLE.org", table) == ["ops@corp.example"]
    assert expand_aliases("POSTMASTER@Old.Example", table) == ["ops@corp.example"]
    assert expand_aliases('"postmaster"@example.org', table) == ["ops@corp.example"]


def test_alias_case_insensitivity_through_config(tmp_path: Path) -> None:
    config = make_config(LISTENER + """
[aliases]
"Sales@Example.ORG" = ["Team.Lead@corp.example"]
""", tmp_path)
    assert expand_aliases("sales@example.org", config.aliases) == ["Team.Lead@corp.example"]


def test_alias_results_keep_order_and_local_part_case() -> None:
    table = [AliasEntry("list@x.example", ("b@x.example", "a@x.example", "B@X.EXAMPLE",
                                           "Bob@x.example", "a@x.example"))]
    # Duplicates go by mailbox: the domain ignores case, the local part does not.
    assert expand_aliases("list@x.example", table) == [
        "b@x.example", "a@x.example", "B@X.EXAMPLE", "Bob@x.example"]


def test_alias_to_itself_keeps_a_copy() -> None:
    table = [AliasEntry("me@x.example", ("me@x.example", "archive@y.example"))]
    assert expand_aliases("me@x.example", table) == ["me@x.example", "archive@y.example"]
    assert expand_aliases("ME@x.example", table) == ["me@x.example", "archive@y.example"]


def test_alias_loop_stops_at_the_repeated_address() -> None:
    table = [AliasEntry("a@x.example", ("b@x.example",)),
             AliasEntry("b@x.example", ("c@x.example",)),
             AliasEntry("c@x.example", ("a@x.example",))]
    # a → b → c → a: a reappears in its own expansion and is delivered as it is.
    assert expand_aliases("a@x.example", table) == ["a@x.example"]
    assert expand_aliases("b@x.example", table) == ["b@x.example"]


def test_domain_rewrite_loop_delivers_the_address() -> None:
    table = [AliasEntry("@a.example", ("@b.example",)), AliasEntry("@b.example", ("@a.example",))]
    assert expand_aliases("u@a.example", table) == ["u@a.example"]


def test_alias_loop_in_one_branch_keeps_the_other_branches() -> None:
    table = [AliasEntry("team@x.example", ("ann@x.example", "loop1@x.example")),
             AliasEntry("loop1@x.example", ("loop2@x.example",)),
             AliasEntry("loop2@x.example", ("loop1@x.example", "ben@x.example"))]
    assert expand_aliases("team@x.example", table) == [
        "ann@x.example", "loop1@x.example", "ben@x.example"]


def chain(length: int) -> list[AliasEntry]:
    return [AliasEntry(f"a{i}@x.example", (f"a{i + 1}@x.example",)) for i in range(length)]


def test_alias_depth_limit_delivers_where_it_stopped() -> None:
    assert expand_aliases("a0@x.example", chain(5)) == ["a5@x.example"]
    assert expand_aliases("a0@x.example", chain(5), max_depth=5) == ["a5@x.example"]
    assert expand_aliases("a0@x.example", chain(5), max_depth=3) == ["a3@x.example"]
    assert expand_aliases("a0@x.example", chain(5), max_depth=0) == ["a0@x.example"]
    assert expand_aliases("a0@x.example", chain(30)) == ["a10@x.example"]  # default depth 10


def test_alias_lookup_budget_bounds_exponential_graphs() -> None:
    # Each level points twice at the next: 2**40 paths without a bound.
    levels = 40
    table = [AliasEntry(f"{side}{i}@x.example", (f"l{i + 1}@x.example", f"r{i + 1}@x.example"))
             for i in range(levels) for side in "lr"]
    assert expand_aliases("l0@x.example", table, max_depth=100, max_lookups=5) == [
        "l5@x.example", "r5@x.example", "r4@x.example", "r3@x.example", "r2@x.example",
        "r1@x.example"]
    assert len(expand_aliases("l0@x.example", table, max_depth=100)) <= 2 * levels


# -- maildir paths -----------------------------------------------------------------------------

TEMPLATE = "/var/mail/{domain}/{localpart}"


@pytest.mark.parametrize("address", [
    "../../etc/passwd@x",
    "a/b@x",
    "a\\b@x",
    ".hidden@x",
    ".@x",
    "..@x",
    '"."@x',
    '"../x"@x',
    "\x00@x",
    "a\x00b@x",
    "a\nb@x",
    "a\rb@x",
    "a\tb@x",
    "a\x7fb@x",
    "a\x85b@x",
    "a\u2028b@x",
    "a\ud800b@x",
    "@x",
    '""@x',
    "user",
    "a@../x",
    "a@..",
    "a@.",
    "a@.x",
    "a@x/y",
    "a@x\\y",
    "a@x\x00",
    "a@x\uff0fy",  # IDNA maps the fullwidth solidus to "/"
    "a@",
])
def test_maildir_path_refuses_unsafe_names(address: str) -> None:
    assert maildir_path(TEMPLATE, address) is None


@pytest.mark.parametrize(("address", "expected"), [
    ("user@example.org", "/var/mail/example.org/user"),
    ("John.Smith@EXAMPLE.Org", "/var/mail/example.org/John.Smith"),
    ('"john smith"@x', "/var/mail/x/john smith"),
    ("john smith@x", "/var/mail/x/john smith"),
    ('"a@b"@x', "/var/mail/x/a@b"),
    ('"quote\\"d"@x', '/var/mail/x/quote"d'),
    ("a..b@x", "/var/mail/x/a..b"),
    ("trailing.@x", "/var/mail/x/trailing."),
    ("{domain}@x", "/var/mail/x/{domain}"),
    ("jörg@bücher.example", "/var/mail/xn--bcher-kva.example/jörg"),
    ("u@x.example.", "/var/mail/x.example/u"),
    ("u@[192.0.2.1]", "/var/mail/[192.0.2.1]/u"),
])
def test_maildir_path_fills_the_template(address: str, expected: str) -> None:
    assert maildir_path(TEMPLATE, address) == Path(expected)


def test_maildir_path_other_templates() -> None:
    assert maildir_path("/srv/mail/user-{localpart}", "Bob@x") == Path("/srv/mail/user-Bob")
    assert maildir_path("/srv/./mail//{domain}/{localpart}/", "b@x") == Path("/srv/mail/x/b")
    assert maildir_path("/srv/{localpart}/Maildir", "b@x") == Path("/srv/b/Maildir")
    assert maildir_path("mail/{domain}/{localpart}", "b@x") == Path("mail/x/b")
    assert maildir_path("{domain}/{localpart}", "b@x") == Path("x/b")
    assert maildir_path("/srv/shared", "b@x") == Path("/srv/shared")
    assert maildir_path("/srv/shared", "../b@x") is None


SAFE_PREFIXES = {
    "/var/mail/{domain}/{localpart}": ("/var/mail/", 2),
    "/var/mail/u-{localpart}": ("/var/mail/u-", 1),
    "/var/mail/{localpart}.d/cur": ("/var/mail/", 2),
}


@given(
    template=st.sampled_from(sorted(SAFE_PREFIXES)),
    local=st.text(),
    domain=st.text(alphabet=st.characters(blacklist_characters="@")),
)
@example(template="/var/mail/{domain}/{localpart}", local="..", domain="x")
@example(template="/var/mail/{domain}/{localpart}", local="x", domain="..")
@example(template="/var/mail/u-{localpart}", local="/../../etc", domain="x")
@example(template="/var/mail/{localpart}.d/cur", local="..", domain="x")
def test_maildir_path_never_leaves_the_prefix(template: str, local: str, domain: str) -> None:
    path = maildir_path(template, f"{local}@{domain}")
    if path is None:
        return
    prefix, depth = SAFE_PREFIXES[template]
    text = str(path)
    assert text.startswith(prefix)
    assert os.path.normpath(text) == text
    assert ".." not in path.parts
    assert len(path.parts) == len(Path("/var/mail").parts) + depth
