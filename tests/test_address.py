"""Tests for relaygw.address: MAIL/RCPT/HELO argument parsing and canonical serialisation."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relaygw.address import Address, MailArgs, RcptArgs, domain_matches
from relaygw.smtp.arguments import parse_helo, parse_mail_from, parse_rcpt_to
from relaygw.smtp.replies import Reply

DEFAULT = "relay.example"

MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
MAIL_INVALID_CHARS = Reply(501, "5.1.7", "Invalid characters in sender address")
RCPT_INVALID_CHARS = Reply(501, "5.1.3", "Invalid characters in recipient address")
MAIL_BAD = Reply(501, "5.1.7", "Bad sender address syntax")
RCPT_BAD = Reply(501, "5.1.3", "Bad recipient address syntax")
MAIL_TOO_LONG = Reply(501, "5.1.7", "Sender address too long")
RCPT_TOO_LONG = Reply(501, "5.1.3", "Recipient address too long")
MAIL_LOCAL_TOO_LONG = Reply(501, "5.1.7", "Sender address local part too long")
RCPT_LOCAL_TOO_LONG = Reply(501, "5.1.3", "Recipient address local part too long")
MAIL_UNQUALIFIED = Reply(501, "5.1.7", "Sender address must be fully qualified")
RCPT_UNQUALIFIED = Reply(501, "5.1.3", "Recipient address must be fully qualified")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters")
PARAM_DUPLICATE = Reply(501, "5.5.4", "Duplicate parameter")
HELO_EMPTY = Reply(501, "5.5.4", "HELO/EHLO requires a domain name")
HELO_INVALID = Reply(501, "5.5.4", "Invalid HELO/EHLO argument")

# What must never reach a serialised address: C0/C1 controls, DEL, Unicode line separators.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def unsupported(name: str) -> Reply:
    return Reply(555, "5.5.4", f"Unsupported parameter {name}")


def bad_param(name: str) -> Reply:
    return Reply(501, "5.5.4", f"Bad {name} parameter")


def rcpt(arg: str, smtputf8: bool = False) -> RcptArgs | Reply:
    return parse_rcpt_to(arg, smtputf8, DEFAULT)


# --- Address value ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "quoted", "text"),
    [
        ("user", False, "user@example.org"),
        ("first.last+tag", False, "first.last+tag@example.org"),
        ("!#$%&'*+/=?^_`{|}~-", False, "!#$%&'*+/=?^_`{|}~-@example.org"),
        ("a b", True, '"a b"@example.org'),
        ("a..b", True, '"a..b"@example.org'),
        (".a", True, '".a"@example.org'),
        ("a.", True, '"a."@example.org'),
        ('say "hi"', True, '"say \\"hi\\""@example.org'),
        ("back\\slash", True, '"back\\\\slash"@example.org'),
        ("foo@evil> NOTIFY=NEVER", True, '"foo@evil> NOTIFY=NEVER"@example.org'),
        ("", True, '""@example.org'),
        ("jörg", False, "jörg@example.org"),
    ],
)
def test_address_str_quotes_only_when_needed(local: str, quoted: bool, text: str) -> None:
    address = Address(local, "example.org")
    assert address.quoted is quoted
    assert str(address) == text


def test_address_is_frozen_and_quoted_is_derived() -> None:
    address = Address("a b", "example.org")
    with pytest.raises(dataclasses.FrozenInstanceError):
        address.local = "x"  # type: ignore[misc]
    assert address == Address("a b", "example.org")
    with pytest.raises(TypeError):
        Address("a", "example.org", False)  # type: ignore[call-arg]


@pytest.mark.parametrize("local", ["a\r\nRCPT TO:<x>", "a\x00", "a\x7f", "a\x85", "a\u2028"])
def test_address_refuses_control_characters_in_local_part(local: str) -> None:
    with pytest.raises(ValueError):
        Address(local, "example.org")


@pytest.mark.parametrize("domain", ["", "a b", "a>b", "a\r\n", "a@b", 'a"b', "ü.example"])
def test_address_refuses_non_canonical_domains(domain: str) -> None:
    with pytest.raises(ValueError):
        Address("user", domain)


# --- MAIL FROM: structure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:<user@example.org>",
        "from:<user@example.org>",
        "From:<user@example.org>",
        "FROM: <user@example.org>",
        "FROM:   <user@example.org>",
        " FROM:<user@example.org>",
        "FROM:<user@example.org> ",
        "FROM:<user@EXAMPLE.Org>",
    ],
)
def test_mail_from_accepts_common_spellings(arg: str) -> None:
    assert parse_mail_from(arg) == MailArgs(Address("user", "example.org"), {})


@pytest.mark.parametrize(
    "arg",
    [
        "",
        "FROM:",
        "FROM:user@example.org",
        "FROM:user@example.org>",
        "FROM:<user@example.org",
        "FROM <user@example.org>",
        "FROM : <user@example.org>",
        "FROMX:<user@example.org>",
        "TO:<user@example.org>",
        "<user@example.org>",
        "FROM:<",
        'FROM:<"unterminated@example.org',
    ],
)
def test_mail_from_without_brackets_is_a_syntax_error(arg: str) -> None:
    assert parse_mail_from(arg) == MAIL_SYNTAX


def test_mail_from_null_sender() -> None:
    assert parse_mail_from("FROM:<>") == MailArgs(None, {})
    assert parse_mail_from("FROM: <> SIZE=0") == MailArgs(None, {"SIZE": "0"})


def test_mail_from_source_route_is_parsed_and_ignored() -> None:
    result = parse_mail_from("FROM:<@a.example,@b.example:user@c.example>")
    assert result == MailArgs(Address("user", "c.example"), {})


@pytest.mark.parametrize(
    "path",
    [
        "<@:user@c.example>",
        "<@a.example,:user@c.example>",
        "<@a.example,b.example:user@c.example>",
        "<@a_b.example:user@c.example>",
        "<@a.example.:user@c.example>",
        "<@[192.0.2.1]:user@c.example>",
        "<@a.example>",
        "<@a.example:>",
        "<@a.example:@b.example:user@c.example>",
    ],
)
def test_mail_from_bad_source_route(path: str) -> None:
    assert parse_mail_from(f"FROM:{path}") == MAIL_BAD


@pytest.mark.parametrize(
    ("path", "address"),
    [
        ('<"user"@example.org>', Address("user", "example.org")),
        ('<"a b"@example.org>', Address("a b", "example.org")),
        ('<"a\\"b"@example.org>', Address('a"b', "example.org")),
        ('<"a\\\\b"@example.org>', Address("a\\b", "example.org")),
        ('<"\\a\\b"@example.org>', Address("ab", "example.org")),
        ('<"a>b"@example.org>', Address("a>b", "example.org")),
        ('<"a@b"@example.org>', Address("a@b", "example.org")),
        ("<user@[192.0.2.1]>", Address("user", "[192.0.2.1]")),
        ("<user@[IPv6:2001:DB8:0:0::1]>", Address("user", "[IPv6:2001:db8::1]")),
        ("<user@[ipv6:::ffff:192.0.2.1]>", Address("user", "[IPv6:::ffff:c000:201]")),
        ("<user@localhost>", Address("user", "localhost")),
        ("<user@192.0.2.1>", Address("user", "192.0.2.1")),
        ("<user@xn--tda.example>", Address("user", "xn--tda.example")),
        ("<User.Name@Example.ORG>", Address("User.Name", "example.org")),
    ],
)
def test_mail_from_addresses(path: str, address: Address) -> None:
    assert parse_mail_from(f"FROM:{path}") == MailArgs(address, {})


@pytest.mark.parametrize(
    "path",
    [
        "<user@example.org.>",
        "<user@.example.org>",
        "<user@example..org>",
        "<user@-example.org>",
        "<user@example-.org>",
        "<user@exa_mple.org>",
        "<user@exa mple.org>",
        "<user @example.org>",
        "<user@>",
        "<@example.org>",
        '<""@example.org>',
        "<a..b@example.org>",
        "<.a@example.org>",
        "<a.@example.org>",
        "<a(b)@example.org>",
        "<a,b@example.org>",
        "<a\\b@example.org>",
        "<a[b]@example.org>",
        '<"a"b@example.org>',
        '<"a""b"@example.org>',
        "<u@ext.example@[127.0.0.1]>",
        "<user@" + "a" * 64 + ".example>",
        "<user@[300.1.1.1]>",
        "<user@[01.2.3.4]>",
        "<user@[192.0.2]>",
        "<user@[IPv6:192.0.2.1]>",
        "<user@[IPv6:fe80::1%eth0]>",
        "<user@[IPv6:2001:db8::1::2]>",
        "<user@[tag:content]>",
        "<user@[192.0.2.1>",
        "<user@[192.0.2.1]x>",
        '<"unterminated@example.org>',
    ],
)
def test_mail_from_bad_address_syntax(path: str) -> None:
    assert parse_mail_from(f"FROM:{path}") == MAIL_BAD


@pytest.mark.parametrize("path", ["<user>", "<postmaster>", '<"user@example.org">'])
def test_mail_from_requires_a_domain(path: str) -> None:
    assert parse_mail_from(f"FROM:{path}") == MAIL_UNQUALIFIED


# --- control characters and smuggling ---------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        'FROM:<"a\r\nRCPT TO:<x>"@b.example>',
        'FROM:<"a\nb"@b.example>',
        'FROM:<"a\rb"@b.example>',
        'FROM:<"a\x00b"@b.example>',
        'FROM:<"a\tb"@b.example>',
        "FROM:<a\x7fb@b.example>",
        "FROM:<ab@b.example\x00>",
        "FROM:<ab@b.example> SIZE=1\x00",
        "FROM:\x00<ab@b.example>",
        "FROM:<a\x85b@b.example> SMTPUTF8",
        "FROM:<a\u2028b@b.example> SMTPUTF8",
        "FROM:<a\ud800b@b.example> SMTPUTF8",
    ],
)
def test_mail_from_control_characters_anywhere(arg: str) -> None:
    assert parse_mail_from(arg) == MAIL_INVALID_CHARS


@pytest.mark.parametrize(
    "arg",
    [
        'TO:<"a\r\nRCPT TO:<x>"@b.example>',
        'TO:<"a\r\n.\r\n"@b.example>',
        "TO:<a@b.example\r\nDATA>",
        "TO:<a@b.example> NOTIFY=NEVER\n",
        'TO:<"\x1b[31m"@b.example>',
    ],
)
def test_rcpt_to_control_characters_anywhere(arg: str) -> None:
    assert rcpt(arg, smtputf8=True) == RCPT_INVALID_CHARS


def test_quoted_parameter_smuggling_is_contained() -> None:
    result = rcpt('TO:<"foo@evil> NOTIFY=NEVER"@test.example>')
    assert result == RcptArgs(Address("foo@evil> NOTIFY=NEVER", "test.example"), {})
    assert isinstance(result, RcptArgs)
    assert result.address.quoted
    serialised = str(result.address)
    assert serialised == '"foo@evil> NOTIFY=NEVER"@test.example'
    # Written back into a command, the text stays inside the path and adds no parameter.
    assert rcpt(f"TO:<{serialised}>") == result


def test_quoted_orcpt_smuggling_in_mail_is_contained() -> None:
    result = parse_mail_from('FROM:<"foo@x> ORCPT=rfc822;a@b"@test.example>')
    assert result == MailArgs(Address("foo@x> ORCPT=rfc822;a@b", "test.example"), {})


def test_unquoted_parameter_smuggling_is_rejected() -> None:
    # Without quotes the first ">" ends the path and the rest is checked as parameters.
    assert rcpt('TO:<foo@evil> NOTIFY=NEVER"@test.example>') == bad_param("NOTIFY")
    assert parse_mail_from("FROM:<foo@evil> NOTIFY=NEVER@test.example>") == unsupported("NOTIFY")
    assert rcpt("TO:<foo@evil>x@test.example>") == PARAM_SYNTAX


# --- lengths ----------------------------------------------------------------------------------


def test_local_part_limit_is_64_octets() -> None:
    assert parse_mail_from(f"FROM:<{'a' * 64}@example.org>") == MailArgs(
        Address("a" * 64, "example.org"), {}
    )
    assert parse_mail_from(f"FROM:<{'a' * 65}@example.org>") == MAIL_LOCAL_TOO_LONG
    assert rcpt(f"TO:<{'a' * 65}@example.org>") == RCPT_LOCAL_TOO_LONG
    # Octets, not characters: 33 two-octet characters are 66 octets.
    assert parse_mail_from(f"FROM:<{'é' * 33}@example.org> SMTPUTF8") == MAIL_LOCAL_TOO_LONG
    # The quotes count: they are on the wire.
    assert parse_mail_from(f'FROM:<"{"a" * 63}"@example.org>') == MAIL_LOCAL_TOO_LONG


def test_path_limit_is_256_octets_including_brackets() -> None:
    domain = ".".join(["a" * 63, "b" * 63, "c" * 61])  # 189 octets
    ok = f"{'x' * 64}@{domain}"
    assert len(ok) + 2 == 256
    assert parse_mail_from(f"FROM:<{ok}>") == MailArgs(Address("x" * 64, domain), {})
    assert parse_mail_from(f"FROM:<{ok}c>") == MAIL_TOO_LONG  # 257 octets
    assert rcpt(f"TO:<{ok}c>") == RCPT_TOO_LONG


def test_domain_limit() -> None:
    domain = ".".join(["a" * 63] * 4 + ["b"])  # 257 octets
    assert parse_mail_from(f"FROM:<u@{domain}>") == MAIL_TOO_LONG
    assert rcpt(f"TO:<u@{domain}>") == RCPT_TOO_LONG


def test_source_route_counts_towards_the_path_limit() -> None:
    route = ",".join(["@" + "r" * 60 + ".example"] * 4)
    assert parse_mail_from(f"FROM:<{route}:u@example.org>") == MAIL_TOO_LONG


def test_a_labels_count_towards_the_limits() -> None:
    # 62 "ü" are 124 UTF-8 octets, but their A-label is longer than 63 octets.
    assert parse_mail_from(f"FROM:<u@{'ü' * 62}.example> SMTPUTF8") == MAIL_BAD
    # Fits as UTF-8, not once every label becomes "xn--...": the path written onwards is checked.
    label = "a" * 50 + "ü"
    unicode_domain = ".".join([label] * 4)
    a_label_domain = unicode_domain.encode("idna").decode()
    local = "x" * 40
    assert len(f"{local}@{unicode_domain}".encode()) + 2 <= 256
    assert len(f"{local}@{a_label_domain}") + 2 > 256
    assert parse_mail_from(f"FROM:<{local}@{unicode_domain}> SMTPUTF8") == MAIL_TOO_LONG
    assert parse_mail_from(f"FROM:<x@{unicode_domain}> SMTPUTF8") == MailArgs(
        Address("x", a_label_domain), {"SMTPUTF8": None}
    )


# --- SMTPUTF8 ---------------------------------------------------------------------------------


def test_mail_non_ascii_needs_the_smtputf8_parameter() -> None:
    assert parse_mail_from("FROM:<jörg@example.org>") == NEEDS_SMTPUTF8
    assert parse_mail_from("FROM:<user@bücher.example>") == NEEDS_SMTPUTF8
    assert parse_mail_from('FROM:<"jö rg"@example.org>') == NEEDS_SMTPUTF8
    assert parse_mail_from("FROM:<jörg@bücher.example> SMTPUTF8") == MailArgs(
        Address("jörg", "xn--bcher-kva.example"), {"SMTPUTF8": None}
    )
    assert parse_mail_from('FROM:<"jö rg"@example.org> smtputf8') == MailArgs(
        Address("jö rg", "example.org"), {"SMTPUTF8": None}
    )


def test_mail_smtputf8_parameter_requires_the_extension_offered() -> None:
    assert parse_mail_from("FROM:<jörg@example.org> SMTPUTF8", smtputf8_offered=False) == (
        unsupported("SMTPUTF8")
    )
    assert parse_mail_from("FROM:<u@example.org> SMTPUTF8", smtputf8_offered=False) == (
        unsupported("SMTPUTF8")
    )
    assert parse_mail_from("FROM:<jörg@example.org>", smtputf8_offered=False) == NEEDS_SMTPUTF8
    assert parse_mail_from("FROM:<u@example.org> SMTPUTF8=yes") == bad_param("SMTPUTF8")


def test_rcpt_non_ascii_follows_the_transaction_flag() -> None:
    assert rcpt("TO:<jörg@bücher.example>", smtputf8=False) == NEEDS_SMTPUTF8
    result = rcpt("TO:<jörg@Bücher.example>", smtputf8=True)
    assert result == RcptArgs(Address("jörg", "xn--bcher-kva.example"), {})
    assert isinstance(result, RcptArgs)
    assert str(result.address) == "jörg@xn--bcher-kva.example"


@pytest.mark.parametrize(
    "domain",
    [
        "a\u00a0b.example",  # nameprep prohibits non-ASCII spaces
        "\u0627a.example",  # bidi rule: RTL and LTR in one label
        "ü_x.example",  # ASCII part is not LDH
        "ü..example",
        "℀.example",  # maps to "a/c"
        "ü.example.",
    ],
)
def test_invalid_idna_is_a_syntax_error(domain: str) -> None:
    assert rcpt(f"TO:<u@{domain}>", smtputf8=True) == RCPT_BAD


def test_non_ascii_in_quoted_pair_is_a_syntax_error() -> None:
    assert rcpt('TO:<"a\\ü"@example.org>', smtputf8=True) == RCPT_BAD


# --- MAIL parameters --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("SIZE=1000", {"SIZE": "1000"}),
        ("size=0", {"SIZE": "0"}),
        ("SIZE=" + "9" * 20, {"SIZE": "9" * 20}),
        ("BODY=7BIT", {"BODY": "7BIT"}),
        ("BODY=8bitmime", {"BODY": "8BITMIME"}),
        ("SMTPUTF8", {"SMTPUTF8": None}),
        ("RET=hdrs", {"RET": "HDRS"}),
        ("RET=FULL", {"RET": "FULL"}),
        ("ENVID=QQ314159", {"ENVID": "QQ314159"}),
        ("ENVID=a+2Bb", {"ENVID": "a+2Bb"}),
        ("ENVID=" + "e" * 100, {"ENVID": "e" * 100}),
        ("AUTH=<>", {"AUTH": "<>"}),
        ("AUTH=user+40example.org", {"AUTH": "user+40example.org"}),
        (
            "SIZE=10  BODY=8BITMIME   AUTH=<> ",
            {"SIZE": "10", "BODY": "8BITMIME", "AUTH": "<>"},
        ),
    ],
)
def test_mail_parameters_accepted(params: str, expected: dict[str, str | None]) -> None:
    assert parse_mail_from(f"FROM:<u@example.org> {params}") == MailArgs(
        Address("u", "example.org"), expected
    )


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        ("SIZE=abc", bad_param("SIZE")),
        ("SIZE", bad_param("SIZE")),
        ("SIZE=-1", bad_param("SIZE")),
        ("SIZE=1.5", bad_param("SIZE")),
        ("SIZE=" + "9" * 21, bad_param("SIZE")),
        ("BODY=BINARYMIME", bad_param("BODY")),
        ("BODY", bad_param("BODY")),
        ("SMTPUTF8=1", bad_param("SMTPUTF8")),
        ("RET=NONE", bad_param("RET")),
        ("ENVID", bad_param("ENVID")),
        ("ENVID=" + "e" * 101, bad_param("ENVID")),
        ("ENVID=a+zz", bad_param("ENVID")),
        ("ENVID=a+", bad_param("ENVID")),
        ("AUTH", bad_param("AUTH")),
        ("SIZE=1 size=2", PARAM_DUPLICATE),
        ("SMTPUTF8 SMTPUTF8", PARAM_DUPLICATE),
        ("NOTIFY=NEVER", unsupported("NOTIFY")),
        ("ORCPT=rfc822;a@b", unsupported("ORCPT")),
        ("X-FOO=bar", unsupported("X-FOO")),
        ("xfoo", unsupported("XFOO")),
        ("=10", PARAM_SYNTAX),
        ("SIZE=", PARAM_SYNTAX),
        ("-SIZE=1", PARAM_SYNTAX),
        ("SI_ZE=1", PARAM_SYNTAX),
        ("SIZE=1=2", PARAM_SYNTAX),
        ("ENVID=é", PARAM_SYNTAX),
        ("SIZE=1\u00a0BODY=7BIT", PARAM_SYNTAX),
    ],
)
def test_mail_parameter_errors(params: str, reply: Reply) -> None:
    assert parse_mail_from(f"FROM:<u@example.org> {params}") == reply


def test_parameters_must_be_separated_from_the_path() -> None:
    assert parse_mail_from("FROM:<u@example.org>SIZE=10") == PARAM_SYNTAX


def test_parameters_are_checked_before_the_address() -> None:
    assert parse_mail_from("FROM:<bad address> XFOO") == unsupported("XFOO")


# --- RCPT TO ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg", ["TO:<u@example.org>", "to: <u@example.org>", "To:<u@Example.Org> "]
)
def test_rcpt_to_basic(arg: str) -> None:
    assert rcpt(arg) == RcptArgs(Address("u", "example.org"), {})


@pytest.mark.parametrize("arg", ["", "TO:", "TO:u@example.org", "FROM:<u@example.org>", "TO <x@y>"])
def test_rcpt_to_syntax(arg: str) -> None:
    assert rcpt(arg) == RCPT_SYNTAX


def test_rcpt_to_null_path_is_refused() -> None:
    assert rcpt("TO:<>") == RCPT_BAD


@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_rcpt_to_bare_postmaster(path: str) -> None:
    assert rcpt(f"TO:{path}") == RcptArgs(Address("postmaster", DEFAULT), {})


def test_rcpt_to_postmaster_uses_the_normalised_default_domain() -> None:
    result = parse_rcpt_to("TO:<postmaster>", False, "Mail.Example.")
    assert result == RcptArgs(Address("postmaster", "mail.example"), {})


def test_rcpt_to_postmaster_with_domain_keeps_it() -> None:
    assert rcpt("TO:<PostMaster@Other.Example>") == RcptArgs(
        Address("PostMaster", "other.example"), {}
    )


@pytest.mark.parametrize("path", ["<user>", '<"postmaster">', "<postmaster.x>", "<ext!u>"])
def test_rcpt_to_requires_a_domain(path: str) -> None:
    assert rcpt(f"TO:{path}") == RCPT_UNQUALIFIED


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("NOTIFY=NEVER", {"NOTIFY": "NEVER"}),
        ("NOTIFY=success,failure", {"NOTIFY": "SUCCESS,FAILURE"}),
        ("NOTIFY=DELAY,SUCCESS,FAILURE", {"NOTIFY": "DELAY,SUCCESS,FAILURE"}),
        ("ORCPT=rfc822;user+40example.org", {"ORCPT": "rfc822;user+40example.org"}),
        (
            "notify=FAILURE orcpt=rfc822;u@example.org",
            {"NOTIFY": "FAILURE", "ORCPT": "rfc822;u@example.org"},
        ),
    ],
)
def test_rcpt_parameters_accepted(params: str, expected: dict[str, str | None]) -> None:
    assert rcpt(f"TO:<u@example.org> {params}") == RcptArgs(Address("u", "example.org"), expected)


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        ("NOTIFY=NEVER,SUCCESS", bad_param("NOTIFY")),
        ("NOTIFY=SUCCESS,SUCCESS", bad_param("NOTIFY")),
        ("NOTIFY=ALWAYS", bad_param("NOTIFY")),
        ("NOTIFY=SUCCESS,", bad_param("NOTIFY")),
        ("NOTIFY", bad_param("NOTIFY")),
        ("ORCPT=user@example.org", bad_param("ORCPT")),
        ("ORCPT=;user@example.org", bad_param("ORCPT")),
        ("ORCPT=rfc822;", bad_param("ORCPT")),
        ("ORCPT=rfc822;a+zz", bad_param("ORCPT")),
        ("ORCPT", bad_param("ORCPT")),
        ("NOTIFY=NEVER NOTIFY=NEVER", PARAM_DUPLICATE),
        ("SIZE=10", unsupported("SIZE")),
        ("SMTPUTF8", unsupported("SMTPUTF8")),
        ("NOTIFY=", PARAM_SYNTAX),
    ],
)
def test_rcpt_parameter_errors(params: str, reply: Reply) -> None:
    assert rcpt(f"TO:<u@example.org> {params}") == reply


def test_rcpt_invalid_default_domain_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        parse_rcpt_to("TO:<u@example.org>", False, "not a domain")


# --- HELO / EHLO ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("mail.example.org", "mail.example.org"),
        ("Mail.Example.ORG", "mail.example.org"),
        ("mail.example.org.", "mail.example.org"),
        ("localhost", "localhost"),
        ("MY_PC", "my_pc"),
        ("desk_top-01.corp.example", "desk_top-01.corp.example"),
        ("192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "[192.0.2.1]"),
        ("[IPv6:2001:DB8::1]", "[IPv6:2001:db8::1]"),
        ("[ipv6:::1]", "[IPv6:::1]"),
        ("  mail.example.org  ", "mail.example.org"),
        ("a" * 63, "a" * 63),
        (".".join(["a" * 63] * 4), ".".join(["a" * 63] * 4)),
    ],
)
def test_helo_accepted(arg: str, expected: str) -> None:
    assert parse_helo(arg) == expected


@pytest.mark.parametrize("arg", ["", " ", "   "])
def test_helo_empty(arg: str) -> None:
    assert parse_helo(arg) == HELO_EMPTY


@pytest.mark.parametrize(
    "arg",
    [
        "mail example",
        "mail.example\r\nMAIL FROM:<x@y>",
        "mail.example\x00",
        "mail\texample",
        "<mail.example>",
        '"mail.example"',
        "bücher.example",
        "mail..example",
        "mail.example..",
        ".mail.example",
        ".",
        "-mail.example",
        "mail-.example",
        "a" * 64,
        ".".join(["a" * 63] * 4) + ".b",
        "[192.0.2.256]",
        "[192.0.2.1",
        "[IPv6:192.0.2.1]",
        "[mail.example]",
        "mail@example",
        "mail/example",
    ],
)
def test_helo_invalid(arg: str) -> None:
    assert parse_helo(arg) == HELO_INVALID


# --- domain_matches ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "pattern", "matches"),
    [
        ("example.org", "example.org", True),
        ("EXAMPLE.org", "example.ORG", True),
        ("example.org", "example.org.", True),
        ("sub.example.org", "example.org", False),
        ("sub.example.org", "*.example.org", True),
        ("a.b.example.org", "*.example.org", True),
        ("example.org", "*.example.org", False),
        ("badexample.org", "*.example.org", False),
        ("badexample.org", "example.org", False),
        ("example.org.evil", "example.org", False),
        ("example.org", "*", True),
        ("example.org", "*.", True),
        ("example.org", "", False),
        ("", "example.org", False),
        ("xn--bcher-kva.example", "bücher.example", True),
        ("sub.xn--bcher-kva.example", "*.Bücher.example", True),
        ("[127.0.0.1]", "[127.0.0.1]", False),
        ("[127.0.0.1]", "*.0.1]", False),
    ],
)
def test_domain_matches(domain: str, pattern: str, matches: bool) -> None:
    assert domain_matches(domain, pattern) is matches


# --- properties -------------------------------------------------------------------------------

# Characters that matter to the grammar, so random text reaches deep into the parser.
_SMTP_ALPHABET = st.sampled_from(
    list('<>@".\\:,[]()! %=+;-_aZ09üé\u00a0\r\n\x00\t\x7f\x85') + ["IPv6:", "SIZE=", "NOTIFY="]
)
_smtp_text = st.lists(_SMTP_ALPHABET, max_size=40).map("".join)
_any_text = st.one_of(st.text(max_size=300), _smtp_text)
_args = st.one_of(
    _any_text,
    st.builds(
        lambda kw, a, b: f"{kw}<{a}>{b}",
        st.sampled_from(["FROM:", "TO:", "FROM: "]),
        _any_text,
        _any_text,
    ),
)


def _assert_canonical(address: Address) -> None:
    """str() re-parses to the same Address and cannot leave the angle brackets."""
    text = str(address)
    assert CONTROL.search(text) is None
    assert rcpt(f"TO:<{text}>", smtputf8=True) == RcptArgs(address, {})
    # A parameter written after the path stays the only parameter.
    assert rcpt(f"TO:<{text}> NOTIFY=NEVER", smtputf8=True) == RcptArgs(
        address, {"NOTIFY": "NEVER"}
    )
    assert parse_mail_from(f"FROM:<{text}> SMTPUTF8") == MailArgs(address, {"SMTPUTF8": None})
    if ">" in text:
        # Only inside the quoted local part, never in the domain.
        assert address.quoted
        assert ">" not in text[text.rindex('"@') :]


@settings(max_examples=400)
@given(_args, st.booleans(), st.booleans())
@example('FROM:<"a\\\r\n"@b>', True, True)
def test_parsers_never_raise(arg: str, smtputf8: bool, offered: bool) -> None:
    mail = parse_mail_from(arg, smtputf8_offered=offered)
    assert isinstance(mail, MailArgs | Reply)
    if isinstance(mail, MailArgs) and mail.address is not None:
        _assert_canonical(mail.address)
    result = parse_rcpt_to(arg, smtputf8, DEFAULT)
    assert isinstance(result, RcptArgs | Reply)
    if isinstance(result, RcptArgs):
        _assert_canonical(result.address)
    helo = parse_helo(arg)
    assert isinstance(helo, str | Reply)
    if isinstance(helo, str):
        assert parse_helo(helo) == helo
    assert isinstance(domain_matches(arg, arg), bool)


_locals = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
    min_size=1,
    max_size=40,
)
_dot_atoms = st.from_regex(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,8}(\.[A-Za-z0-9_+-]{1,8}){0,3}", fullmatch=True
)
_labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
_domains = st.one_of(
    st.lists(_labels, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip.exploded}]"),
    st.lists(
        st.text(
            st.characters(codec="utf-8", categories=("L", "M", "N", "Pd")),
            min_size=1,
            max_size=8,
        ),
        min_size=1,
        max_size=3,
    ).map(".".join),
)


def _quote(local: str) -> str:
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=400)
@given(_locals, _domains)
def test_quoted_local_parts_round_trip(local: str, domain: str) -> None:
    result = rcpt(f"TO:<{_quote(local)}@{domain}>", smtputf8=True)
    if isinstance(result, Reply):
        # Only limits and non-LDH/IDNA-invalid domains may fail, and never with a crash.
        assert result in (RCPT_BAD, RCPT_TOO_LONG, RCPT_LOCAL_TOO_LONG)
        return
    assert result.address.local == local
    _assert_canonical(result.address)


@settings(max_examples=200)
@given(_dot_atoms, st.lists(_labels, min_size=1, max_size=4).map(".".join))
def test_dot_atoms_stay_unquoted(local: str, domain: str) -> None:
    result = rcpt(f"TO:<{local}@{domain}>")
    assert result == RcptArgs(Address(local, domain.lower()), {})
    assert isinstance(result, RcptArgs)
    assert not result.address.quoted
    assert str(result.address) == f"{local}@{domain.lower()}"
    _assert_canonical(result.address)
