"""Envelope addresses as values: ``Address``, the MAIL and RCPT arguments, domain
matching, and RFC 3461 xtext.

Shared by every layer. The RFC 5321 grammar that turns a client's command text into
these values (or into the reply that refuses it) is the protocol's:
``relaygw.smtp.arguments``. Addresses are re-serialised canonically by
``str(address)`` so that nothing a client wrote inside the angle brackets can become
extra syntax when relaygw writes the address to the next hop.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

__all__ = [
    "Address",
    "MailArgs",
    "RcptArgs",
    "domain_matches",
    "parse_domain",
    "parse_literal",
    "xtext_decode",
    "xtext_encode",
]

# RFC 5321 §4.5.3.1, in UTF-8 octets; the path limit includes the angle brackets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# C0/C1 controls and DEL, plus lone surrogates and U+2028/U+2029: Python's str.splitlines()
# breaks lines on U+0085/U+2028/U+2029, so downstream they are as dangerous as CR and LF.
INVALID_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

# RFC 5322 atext, extended by RFC 6531 with every non-ASCII character.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]"
DOT_ATOM = re.compile(_ATEXT + r"+(?:\." + _ATEXT + r"+)*")

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(_LABEL + r"(?:\." + _LABEL + r")*", re.IGNORECASE | re.ASCII)
_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:([0-9a-f:.]+)|([0-9.]+))\]", re.IGNORECASE | re.ASCII)

# What an Address may hold as its domain without breaking "local@domain" serialisation.
_SAFE_DOMAIN = re.compile(r"[A-Za-z0-9._:\[\]-]+")

# ---------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class Address:
    """A mailbox as ``local@domain``, with the domain in canonical ASCII form.

    ``local`` is decoded (no surrounding quotes, quoted-pairs resolved); ``domain`` is lowercase
    A-label form or a canonical address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).
    ``quoted`` is derived: whether the local part must be quoted when serialised.
    """

    local: str
    domain: str
    quoted: bool = field(init=False)

    def __post_init__(self) -> None:
        # Refuse values whose serialisation could carry extra SMTP syntax, whoever builds them.
        if INVALID_CHARS.search(self.local):
            raise ValueError(f"control character in local part: {self.local!r}")
        if _SAFE_DOMAIN.fullmatch(self.domain) is None:
            raise ValueError(f"not a canonical domain: {self.domain!r}")
        object.__setattr__(self, "quoted", DOT_ATOM.fullmatch(self.local) is None)

    def __str__(self) -> str:
        if not self.quoted:
            return f"{self.local}@{self.domain}"
        escaped = self.local.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"@{self.domain}'


@dataclass(frozen=True)
class MailArgs:
    address: Address | None  # None is the null reverse-path <>
    params: dict[str, str | None] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class RcptArgs:
    address: Address
    params: dict[str, str | None] = field(default_factory=dict, hash=False)


# ---------------------------------------------------------------------------------------------
# Domains


def parse_literal(text: str) -> str | None:
    """Canonical address literal, or None when ``text`` is not a valid [IPv4] / [IPv6:...]."""
    match = _ADDRESS_LITERAL.fullmatch(text)
    if match is None:
        return None
    try:
        if match[2] is not None:
            return f"[{ipaddress.IPv4Address(match[2])}]"
        return f"[IPv6:{ipaddress.IPv6Address(match[1]).compressed}]"
    except ValueError:
        return None


def parse_domain(text: str, allow_literal: bool = True) -> str | None:
    """Lowercase A-label form of a domain (or canonical literal), None when invalid.

    Does not check the overall length: callers report that with their own reply.
    """
    if text.startswith("["):
        return parse_literal(text) if allow_literal else None
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    # Checked after IDNA too: nameprep can map characters to ASCII that is not LDH ("a/c").
    if _DOMAIN.fullmatch(text) is None:
        return None
    return text.lower()


def domain_matches(domain: str, pattern: str) -> bool:
    """``pattern`` is a domain (exact match), ``*.domain`` (any subdomain, not the apex)
    or ``*`` (every domain; config warns that this makes an open relay).

    Case-insensitive; Unicode names are compared in A-label form. Address literals never match:
    they name a host, not a domain anyone configured.
    """
    name, pat = _normalise_name(domain), _normalise_name(pattern)
    if not name or not pat or name.startswith("["):
        return False
    if pat == "*":
        return True
    if pat.startswith("*."):
        base = pat[2:]
        return bool(base) and name.endswith("." + base) and len(name) > len(base) + 1
    return name == pat


def _normalise_name(name: str) -> str:
    name = name.strip().lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return ""
    return name


# ---------------------------------------------------------------------------------------------
# xtext (RFC 3461 §4): how ORCPT and ENVID values travel


def xtext_encode(text: str) -> str:
    """Printable ASCII but "+" and "=" as is, everything else as "+XX"."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in text)


_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")


def xtext_decode(value: str) -> str:
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
