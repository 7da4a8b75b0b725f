"""The RFC 5321 (+ RFC 6531 SMTPUTF8) grammar of MAIL, RCPT and HELO arguments.

Pure functions over strings: a parse returns a value of ``relaygw.address`` or the
Reply to send.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from relaygw.address import (
    DOT_ATOM,
    INVALID_CHARS,
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    Address,
    MailArgs,
    RcptArgs,
    parse_domain,
    parse_literal,
)
from relaygw.smtp.replies import Reply

__all__ = ["parse_helo", "parse_mail_from", "parse_rcpt_to"]

MAX_HELO = 255

_MAIL_KEYWORD = re.compile(r" *FROM: *", re.IGNORECASE | re.ASCII)
_RCPT_KEYWORD = re.compile(r" *TO: *", re.IGNORECASE | re.ASCII)

# The bracketed path, honouring quoted strings (a quoted local part may contain ">").
# Possessive quantifiers: a quoted-pair can be read only one way, so no backtracking blow-up.
_PATH = re.compile(r'<((?:"(?:[^"\\]|\\.)*+"|[^">])*+)>')

# Source route "@hop,@hop:" (RFC 5321 A-d-l); hops are validated as domains separately.
_ROUTE = re.compile(r"@([^,:@]*(?:,@[^,:@]*)*):")

_QUOTED_STRING = re.compile(r'"((?:[^"\\]|\\.)*+)"')
# qtextSMTP (any character but '"' and '\'; controls are refused earlier) and quoted-pairSMTP,
# which is a backslash followed by printable ASCII only.
_QCONTENT = re.compile(r'(?:[^"\\]|\\[ -~])*+')
_QUOTED_PAIR = re.compile(r"\\(.)")

# Real HELO names break the LDH rule with underscores (Windows hosts); accept those.
_HELO_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HELO_DOMAIN = re.compile(_HELO_LABEL + r"(?:\." + _HELO_LABEL + r")*\.?", re.IGNORECASE | re.ASCII)

# ESMTP parameters (RFC 5321 §4.1.2): esmtp-keyword ["=" esmtp-value], value = %d33-60 / %d62-126.
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([!-<>-~]+))?")
# RFC 3461 xtext: xchar (printable ASCII except "+" and "=") or "+" and two hex digits.
_XTEXT = r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})+"
_XTEXT_RE = re.compile(_XTEXT)
_ORCPT = re.compile(r"[A-Za-z0-9!#$%&'*+/?^_`{|}~-]+;" + _XTEXT)
_SIZE = re.compile(r"[0-9]{1,20}")  # RFC 1870: 1*20DIGIT


# ---------------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True)
class _PathReplies:
    """The replies of one verb: MAIL speaks of the sender (5.1.7), RCPT of the recipient (5.1.3)."""

    syntax: Reply
    invalid_chars: Reply
    bad_syntax: Reply
    too_long: Reply
    local_too_long: Reply
    unqualified: Reply


_SENDER = _PathReplies(
    syntax=Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"),
    invalid_chars=Reply(501, "5.1.7", "Invalid characters in sender address"),
    bad_syntax=Reply(501, "5.1.7", "Bad sender address syntax"),
    too_long=Reply(501, "5.1.7", "Sender address too long"),
    local_too_long=Reply(501, "5.1.7", "Sender address local part too long"),
    unqualified=Reply(501, "5.1.7", "Sender address must be fully qualified"),
)
_RECIPIENT = _PathReplies(
    syntax=Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"),
    invalid_chars=Reply(501, "5.1.3", "Invalid characters in recipient address"),
    bad_syntax=Reply(501, "5.1.3", "Bad recipient address syntax"),
    too_long=Reply(501, "5.1.3", "Recipient address too long"),
    local_too_long=Reply(501, "5.1.3", "Recipient address local part too long"),
    unqualified=Reply(501, "5.1.3", "Recipient address must be fully qualified"),
)
_NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
_PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters")
_PARAM_DUPLICATE = Reply(501, "5.5.4", "Duplicate parameter")
_HELO_EMPTY = Reply(501, "5.5.4", "HELO/EHLO requires a domain name")
_HELO_INVALID = Reply(501, "5.5.4", "Invalid HELO/EHLO argument")


# ---------------------------------------------------------------------------------------------
# ESMTP parameters: each validator says whether the value (None for a bare keyword) is acceptable.

_Validator = Callable[[str | None], bool]


def _size_ok(value: str | None) -> bool:
    return value is not None and _SIZE.fullmatch(value) is not None


def _body_ok(value: str | None) -> bool:
    return value is not None and value.upper() in ("7BIT", "8BITMIME")


def _no_value(value: str | None) -> bool:
    return value is None


def _ret_ok(value: str | None) -> bool:
    return value is not None and value.upper() in ("FULL", "HDRS")


def _envid_ok(value: str | None) -> bool:
    return value is not None and len(value) <= 100 and _XTEXT_RE.fullmatch(value) is not None


def _auth_ok(value: str | None) -> bool:
    # Any esmtp-value, so sloppy xtext still passes: Outlook sends AUTH=<> (aiosmtpd#299).
    return value is not None


def _notify_ok(value: str | None) -> bool:
    if value is None:
        return False
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return True
    return len(set(items)) == len(items) and set(items) <= {"SUCCESS", "FAILURE", "DELAY"}


def _orcpt_ok(value: str | None) -> bool:
    return value is not None and len(value) <= 500 and _ORCPT.fullmatch(value) is not None


_MAIL_PARAMS: Mapping[str, _Validator] = MappingProxyType(
    {
        "SIZE": _size_ok,
        "BODY": _body_ok,
        "SMTPUTF8": _no_value,
        "RET": _ret_ok,
        "ENVID": _envid_ok,
        "AUTH": _auth_ok,
    }
)
# SMTPUTF8 is a parameter only when the server offered the extension.
_MAIL_PARAMS_NO_UTF8: Mapping[str, _Validator] = MappingProxyType(
    {key: check for key, check in _MAIL_PARAMS.items() if key != "SMTPUTF8"}
)
_RCPT_PARAMS: Mapping[str, _Validator] = MappingProxyType(
    {"NOTIFY": _notify_ok, "ORCPT": _orcpt_ok}
)
# Keyword-valued parameters are stored uppercased so later code compares without casefolding.
_UPPERCASE_VALUES = frozenset({"BODY", "RET", "NOTIFY"})


def _parse_params(text: str, allowed: Mapping[str, _Validator]) -> dict[str, str | None] | Reply:
    params: dict[str, str | None] = {}
    if not text:
        return params
    if text[0] != " ":
        return _PARAM_SYNTAX
    # Split on SP only: any other whitespace is then part of a token and fails its syntax.
    for token in text.split(" "):
        if not token:
            continue
        match = _PARAM.fullmatch(token)
        if match is None:
            return _PARAM_SYNTAX
        key, value = match[1].upper(), match[2]
        if key in params:
            return _PARAM_DUPLICATE
        check = allowed.get(key)
        if check is None:
            return Reply(555, "5.5.4", f"Unsupported parameter {key}")
        if not check(value):
            return Reply(501, "5.5.4", f"Bad {key} parameter")
        params[key] = value.upper() if value is not None and key in _UPPERCASE_VALUES else value
    return params


# ---------------------------------------------------------------------------------------------
# Paths


def _split_path(
    arg: str, keyword: re.Pattern[str], replies: _PathReplies
) -> tuple[str, str] | Reply:
    """Split ``FROM:<path> params`` into the text inside the brackets and the parameter text."""
    # First, before anything looks inside quotes: CR/LF/NUL smuggled in a quoted local part
    # would otherwise survive into the queue and the next hop's command stream.
    if INVALID_CHARS.search(arg):
        return replies.invalid_chars
    keyword_match = keyword.match(arg)
    if keyword_match is None or not arg.startswith("<", keyword_match.end()):
        return replies.syntax
    path = _PATH.match(arg, keyword_match.end())
    if path is None:
        return replies.bad_syntax if ">" in arg[keyword_match.end() :] else replies.syntax
    return path[1], arg[path.end() :]


def _parse_mailbox(
    inner: str, smtputf8: bool, replies: _PathReplies, default_domain: str | None = None
) -> Address | Reply:
    """Parse the text between the angle brackets (not empty) into an Address."""
    if len(inner.encode()) + 2 > MAX_PATH:
        return replies.too_long
    if not smtputf8 and not inner.isascii():
        return _NEEDS_SMTPUTF8

    mailbox = inner
    if inner.startswith("@"):
        # Source routes must be parsed but are ignored (RFC 5321 §4.1.1.3, App. F.2):
        # the decision is always taken on the final domain.
        route = _ROUTE.match(inner)
        if route is None:
            return replies.bad_syntax
        for hop in route[1].split(",@"):
            if parse_domain(hop, allow_literal=False) is None:
                return replies.bad_syntax
        mailbox = inner[route.end() :]

    domain_text: str | None
    if mailbox.startswith('"'):
        quoted = _QUOTED_STRING.match(mailbox)
        if quoted is None:
            return replies.bad_syntax
        raw_local, rest = quoted[0], mailbox[quoted.end() :]
        if len(raw_local.encode()) > MAX_LOCAL_PART:
            return replies.local_too_long
        if _QCONTENT.fullmatch(quoted[1]) is None or (rest and rest[0] != "@"):
            return replies.bad_syntax
        local = _QUOTED_PAIR.sub(r"\1", quoted[1])
        domain_text = rest[1:] if rest else None
    else:
        raw_local, at, domain_text = mailbox.partition("@")
        if len(raw_local.encode()) > MAX_LOCAL_PART:
            return replies.local_too_long
        if DOT_ATOM.fullmatch(raw_local) is None:
            return replies.bad_syntax
        local = raw_local
        if not at:
            domain_text = None
    if not local:
        # ""@domain: RFC 5321 §4.1.2 says a null local part SHOULD NOT be used; refuse it.
        return replies.bad_syntax

    if domain_text is None:
        if default_domain is not None and mailbox.lower() == "postmaster":
            return Address("postmaster", default_domain)
        return replies.unqualified
    if len(domain_text.encode()) > MAX_DOMAIN:
        return replies.too_long
    domain = parse_domain(domain_text)
    if domain is None:
        return replies.bad_syntax
    address = Address(local, domain)
    # A-labels can be longer than the UTF-8 the client sent: check what will be written onwards.
    if len(domain) > MAX_DOMAIN or len(str(address).encode()) + 2 > MAX_PATH:
        return replies.too_long
    return address


def parse_mail_from(arg: str, smtputf8_offered: bool = True) -> MailArgs | Reply:
    """Parse what follows ``MAIL`` (``FROM:<path> [params]``)."""
    split = _split_path(arg, _MAIL_KEYWORD, _SENDER)
    if isinstance(split, Reply):
        return split
    inner, param_text = split
    params = _parse_params(param_text, _MAIL_PARAMS if smtputf8_offered else _MAIL_PARAMS_NO_UTF8)
    if isinstance(params, Reply):
        return params
    if not inner:
        return MailArgs(None, params)
    address = _parse_mailbox(inner, "SMTPUTF8" in params, _SENDER)
    if isinstance(address, Reply):
        return address
    return MailArgs(address, params)


def parse_rcpt_to(arg: str, smtputf8: bool, default_domain: str) -> RcptArgs | Reply:
    """Parse what follows ``RCPT`` (``TO:<path> [params]``).

    ``smtputf8`` is whether the transaction's MAIL carried SMTPUTF8; a bare ``<postmaster>``
    becomes ``postmaster@default_domain``.
    """
    split = _split_path(arg, _RCPT_KEYWORD, _RECIPIENT)
    if isinstance(split, Reply):
        return split
    inner, param_text = split
    params = _parse_params(param_text, _RCPT_PARAMS)
    if isinstance(params, Reply):
        return params
    if not inner:
        return _RECIPIENT.bad_syntax  # the null path is a sender only
    domain = parse_domain(default_domain.rstrip("."))
    if domain is None:
        raise ValueError(f"invalid default domain: {default_domain!r}")
    address = _parse_mailbox(inner, smtputf8, _RECIPIENT, domain)
    if isinstance(address, Reply):
        return address
    return RcptArgs(address, params)


def parse_helo(arg: str) -> str | Reply:
    """Validate a HELO/EHLO argument; return it lowercased (address literals canonical)."""
    text = arg.strip(" ")
    if not text:
        return _HELO_EMPTY
    if not text.isascii() or len(text) > MAX_HELO:
        return _HELO_INVALID
    if text.startswith("["):
        literal = parse_literal(text)
        return _HELO_INVALID if literal is None else literal
    # The regex admits no control character, space, quote or bracket: it is the whole check.
    if _HELO_DOMAIN.fullmatch(text) is None:
        return _HELO_INVALID
    return text.removesuffix(".").lower()
