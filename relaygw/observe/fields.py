"""How values are written in log lines: one convention for every line, text and JSON.

A text line is a few words and ``key=value`` pairs, and splits on spaces outside
double quotes. The value is the JSON field's value, written so that it never holds
a space:

- something absent (no TLS, no AUTH user, no Message-ID): ``none``;
- TLS: ``TLSv1.3/TLS_AES_256_GCM_SHA384`` (version and cipher, no space);
- an envelope address: ``from=<alice@example.org>``, ``from=<>`` (the JSON field
  holds the address without the brackets);
- free text (a server's reply, a header value, an error): written as it is when it
  holds no space, quote, backslash or unprintable character, otherwise in double
  quotes with backslash escapes, as logfmt does: ``reply="250 2.0.0 Ok"``. The
  JSON field holds the text itself.

``Quoted`` and ``Bracketed`` are ``str`` subclasses that only change how they are
formatted into a text line, so the JSON observer (and anything else that reads
the event's fields) sees the plain value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

NONE = "none"

# Written bare: at least one character, none of them a space, quote, backslash, "="
# or control character (the check for other unprintable characters follows).
_BARE = re.compile(r'[^\s"\\=\x00-\x1f\x7f]+')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(text: str) -> str:
    """``text`` as one token of a text line: bare when it can be, else double-quoted."""
    if _BARE.fullmatch(text) is not None and text.isprintable():
        return text
    out = []
    for ch in text:
        escaped = _ESCAPES.get(ch)
        if escaped is not None:
            out.append(escaped)
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:  # line separators, lone surrogates from undecodable client bytes
            out.append(f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


class Quoted(str):
    """Free text: quoted in a text line when it must be, itself everywhere else."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        return quote(format(str(self), spec))


class Bracketed(str):
    """An envelope address: ``<address>`` in a text line, the bare address elsewhere."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        return quote(f"<{format(str(self), spec)}>")


def text(value: object) -> str:
    """A free-text value; ``none`` for None."""
    return NONE if value is None else Quoted(value)


def address(value: object) -> str:
    """An envelope address (``""`` is the null sender, written ``<>``)."""
    return Bracketed("" if value is None else value)


def addresses(values: Iterable[str]) -> str:
    """Several addresses as one value: ``a@example.org,b@example.org``."""
    return Quoted(",".join(values))


def tls(info: str | None, encrypted: bool = False) -> str:
    """``TLSv1.3/TLS_AES_256_GCM_SHA384`` from "TLSv1.3 TLS_AES_256_GCM_SHA384" or
    "TLSv1.3"; ``TLS`` when ``encrypted`` but the version is not known; ``none`` for
    plaintext."""
    if not info:
        return "TLS" if encrypted else NONE
    return Quoted("/".join(info.split()))
