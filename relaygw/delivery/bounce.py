"""RFC 3464 delivery status notifications: the bounce, the delay warning and the success notice.

Pure functions, no Twisted and no file I/O: ``build_dsn`` returns the DSN as bytes, ready for the
spool; the header section (or, for RET=FULL, the whole message) to attach to it comes from the
message's content, read by the spool in its threads.

The bytes are generated here, not by the ``email`` package, so that the output is deterministic and
byte-exact: CRLF line ends only, every line at most 998 octets (RFC 5322 §2.1.1), fields folded at
whitespace near 78 columns. Nothing the sender, a recipient or a remote MTA supplied can add a line
of its own: CR, LF and NUL (and TAB) become spaces, and the other control characters ``?``.

The ``message/delivery-status`` part is plain ASCII, as RFC 3464 wants: non-ASCII characters in
diagnostics become ``?``, and a non-ASCII address is written as an RFC 6533 ``utf-8`` address in
its xtext form. The human-readable part is UTF-8, sent as 8bit: the queue sends the DSN with
``BODY=8BITMIME`` (a peer without 8BITMIME gets it as is; it is text, and rarely non-ASCII).

Bounces follow RFC 5321 §6.1: sent from ``<>``, never about a message from ``<>``, with
``Auto-Submitted: auto-replied`` (RFC 3834) so that auto-responders stay quiet.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = ["RETURN_FULL_LIMIT", "FailedRecipient", "build_dsn", "should_bounce"]

ACTIONS = ("failed", "delayed", "delivered", "relayed")  # RFC 3464 §2.3.3, "expanded" aside
# The status class each action may carry (RFC 3464 §2.3.4); "failed" is also 4.x.x when the
# queue gave up on a temporary failure (4.4.7).
_CLASSES = {"failed": "45", "delayed": "4", "delivered": "2", "relayed": "2"}
_GENERIC_STATUS = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0"}
MAX_LINE = 998  # octets before CRLF (RFC 5322 §2.1.1)
TRUNCATE_AT = 900  # an unfoldable line longer than MAX_LINE is cut here and ends in "..."
FOLD_AT = 78  # preferred line length (RFC 5322 §2.1.1 SHOULD)
TEXT_WIDTH = 76  # wrap width of the human-readable part
CRLF = "\r\n"
# RET=FULL returns at most this much message (10 MiB): a larger one is returned as its header,
# and the DSN says so. The DSN is built in memory, and a sender's mailbox may refuse more.
RETURN_FULL_LIMIT = 10 * 1024 * 1024

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# RFC 2046 bcharsnospace. Boundaries here never contain a space (RFC 2046 allows inner ones), so
# folding the Content-Type field can never split one.
_BOUNDARY_CHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}")
# Everything a header line must not carry: C0 and C1 controls, DEL, lone surrogates, and U+2028/9
# (str.splitlines() breaks at them, so downstream code may too).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NEWLINE_LIKE = re.compile(r"[\r\n\x00\t]")


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient a DSN reports on (whatever its action: the name is historical)."""

    address: str
    status: str  # RFC 3463 code, e.g. "5.1.1"; "4.4.7" when the queue gave up on a 4xx
    diagnostic: str | None  # the peer's reply, e.g. "550 5.1.1 No such user"
    remote_mta: str | None  # the host that answered, e.g. "mx.example.net"
    action: str = "failed"  # "failed", "delayed", "delivered" or "relayed"
    original_recipient: str | None = None  # the ORCPT address, already xtext-decoded
    last_attempt: float | None = None  # Unix time, shown as Last-Attempt-Date
    will_retry_until: float | None = None  # "delayed": when the queue gives up (Unix time)


def should_bounce(sender: str) -> bool:
    """Whether a failure is reported to ``sender``: never to the null reverse-path ``""``.

    Deliberately that simple: a sender such as ``MAILER-DAEMON@...`` is an ordinary address here.
    Bounce loops are prevented by the null sender, which every DSN relaygw sends uses, and
    guessing from local parts would drop real reports.
    """
    return sender != ""


def build_dsn(*, reporting_mta: str, envelope_id: str | None, queue_id: str, sender: str,
              arrival: float, recipients: Sequence[FailedRecipient], original_headers: bytes,
              now: float, message_id_domain: str, boundary: str | None = None,
              returned_message: bytes | None = None, too_big_to_return: int | None = None,
              ) -> bytes:
    """The complete DSN message (header and body) to send from ``<>`` to ``sender``.

    ``envelope_id`` is the ENVID as RFC 3461 §6.3 wants it shown: xtext-decoded. The result
    depends only on the arguments; with no ``boundary`` one is derived from ``queue_id``, ``now``
    and ``reporting_mta`` (and changed deterministically in the unlikely case that the content
    contains it). The third part is ``returned_message`` as ``message/rfc822``, byte for byte
    (RET=FULL), or else ``original_headers`` as ``text/rfc822-headers``, never the body; with
    ``too_big_to_return`` (a size in bytes) the human part says that the message was too big to
    return whole. Raises ``ValueError`` for no recipients, an unknown action or an invalid
    ``boundary``.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    for rcpt in recipients:
        if rcpt.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {rcpt.action!r}")
    if boundary is not None and not _BOUNDARY.fullmatch(boundary):
        raise ValueError(f"invalid MIME boundary {boundary!r}")

    mta = _token(reporting_mta)
    kind = _kind(recipients)
    returned = "message" if returned_message is not None else (
        "too big" if too_big_to_return is not None else "headers")
    text_part = _human_part(mta, recipients, kind, returned, too_big_to_return)
    status_part = _status_part(mta, envelope_id, queue_id, arrival, recipients)
    if returned_message is not None:
        third_type = b"message/rfc822"
        third_part, third_8bit = _message_part(returned_message)
    else:
        third_type = b"text/rfc822-headers"
        third_part, third_8bit = _headers_part(original_headers)
    parts = (text_part, status_part, third_part)

    if boundary is None:
        boundary = _default_boundary(f"{queue_id}.{int(now)}/{reporting_mta}", parts)
    elif _collides(boundary, parts):
        raise ValueError(f"MIME boundary {boundary!r} occurs in the content")

    subject = _SUBJECTS[kind]
    header = _fields([
        ("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        ("To", f"<{_one_line(sender)}>"),
        ("Subject", subject),
        ("Date", _date(now)),
        ("Message-ID", f"<{_token(queue_id)}.{int(now)}@{_token(message_id_domain)}>"),
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        ("Content-Type",
         f'multipart/report; report-type=delivery-status; boundary="{boundary}"'),
    ])
    delimiter = f"--{boundary}".encode("ascii")
    out = [
        header, b"\r\n",
        b"This is a MIME-encapsulated message.\r\n", b"\r\n",
        delimiter, b"\r\n",
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Transfer-Encoding: 8bit\r\n", b"\r\n",
        text_part, b"\r\n",
        delimiter, b"\r\n",
        b"Content-Type: message/delivery-status\r\n", b"\r\n",
        status_part, b"\r\n",
        delimiter, b"\r\n",
        b"Content-Type: ", third_type, b"\r\n",
        b"Content-Transfer-Encoding: 8bit\r\n" if third_8bit else b"", b"\r\n",
        third_part, b"\r\n",
        delimiter, b"--\r\n",
    ]
    return b"".join(out)


_SUBJECTS = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
    "mixed": "Delivery Status Notification",
}


def _kind(recipients: Sequence[FailedRecipient]) -> str:
    """What the report is about, for its subject and introduction: any failure makes it a
    failure report."""
    actions = {r.action for r in recipients}
    if "failed" in actions:
        return "failure"
    if actions == {"delayed"}:
        return "delay"
    if actions <= {"delivered", "relayed"}:
        return "success"
    return "mixed"


# -- the three parts -------------------------------------------------------------------------------


_VERDICTS = {
    "failed": "delivery failed",
    "delayed": "delivery delayed, still trying",
    "delivered": "delivered to the mailbox",
    "relayed": "relayed to a system that does not report delivery",
}


def _human_part(mta: str, recipients: Sequence[FailedRecipient], kind: str, returned: str,
                too_big: int | None) -> bytes:
    if kind == "delay":
        intro = ("Your message has not been delivered yet to the recipients listed below. The "
                 "mail system will keep trying; you do not need to send it again.")
    elif kind == "success":
        intro = ("Your message was delivered to the recipients listed below. Where it was "
                 "relayed to a system that does not report delivery, you may still receive "
                 "notices of delivery errors from other systems.")
    elif kind == "failure":
        attached = {"message": "your message is attached",
                    "headers": "the header of your message is attached",
                    "too big": f"your message is larger than {too_big} bytes, so only its header "
                               "is attached"}[returned]
        intro = ("Your message could not be delivered to one or more recipients. The reasons "
                 f"are listed below, and {attached}.")
    else:
        intro = "This is a report on the delivery of your message to the recipients below."
    lines = textwrap.wrap(f"This is the mail system at host {mta}.", TEXT_WIDTH)
    lines += [""] + textwrap.wrap(intro, TEXT_WIDTH)
    for rcpt in recipients:
        verdict = _VERDICTS[rcpt.action]
        if rcpt.diagnostic:
            reason = _text(rcpt.diagnostic)
        elif rcpt.action in ("failed", "delayed") or rcpt.remote_mta:
            reason = f"status {_status(rcpt)}"
        else:
            reason = ""
        if rcpt.remote_mta:
            reason = f"host {_text(rcpt.remote_mta)} said: {reason}"
        line = f"<{_text(rcpt.address)}>: {verdict}" + (f": {reason}" if reason else "")
        lines.append("")
        lines += textwrap.wrap(line, TEXT_WIDTH, subsequent_indent="    ",
                               break_on_hyphens=False)
    return "".join(line + CRLF for line in lines).encode("utf-8")


def _status_part(mta: str, envelope_id: str | None, queue_id: str, arrival: float,
                 recipients: Sequence[FailedRecipient]) -> bytes:
    # Field order as in RFC 3464's ABNF (§2.2, §2.3); extension fields come last.
    per_message = []
    if envelope_id:
        per_message.append(("Original-Envelope-Id", _ascii(envelope_id)))
    per_message += [
        ("Reporting-MTA", f"dns; {mta}"),
        ("Arrival-Date", _date(arrival)),
        ("X-Relaygw-Queue-ID", _token(queue_id)),
    ]
    groups = [_fields(per_message)]
    for rcpt in recipients:
        fields = []
        if rcpt.original_recipient:
            fields.append(("Original-Recipient", _address(rcpt.original_recipient)))
        fields += [
            ("Final-Recipient", _address(rcpt.address)),
            ("Action", rcpt.action),
            ("Status", _status(rcpt)),
        ]
        if rcpt.remote_mta:
            fields.append(("Remote-MTA", f"dns; {_token(rcpt.remote_mta)}"))
        if rcpt.diagnostic:
            # "smtp" names an SMTP reply (RFC 3464 2.3.6); our own diagnostics say so.
            kind = "smtp" if re.match(r"[245]\d\d[ -]", rcpt.diagnostic) else "x-relaygw"
            fields.append(("Diagnostic-Code", f"{kind}; {_ascii(rcpt.diagnostic)}"))
        if rcpt.last_attempt is not None:
            fields.append(("Last-Attempt-Date", _date(rcpt.last_attempt)))
        if rcpt.will_retry_until is not None:
            fields.append(("Will-Retry-Until", _date(rcpt.will_retry_until)))
        groups.append(_fields(fields))
    return b"\r\n".join(groups)  # a blank line before each recipient's group


def _headers_part(original: bytes) -> tuple[bytes, bool]:
    """The attached header section: CRLF line ends, no blank line, no NUL, no overlong line."""
    text = original.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\x00", b" ")
    lines = text.split(b"\n")
    while lines and lines[-1] == b"":
        lines.pop()
    if b"" in lines:  # anything after an empty line is body, which is never returned here
        lines = lines[:lines.index(b"")]
    lines = [_truncate_bytes(line) for line in lines]
    body = b"".join(line + b"\r\n" for line in lines)
    return body, not body.isascii()


def _message_part(message: bytes) -> tuple[bytes, bool]:
    """The returned message (RET=FULL), byte for byte: it was stored with CRLF line ends and
    lines within 1000 octets. Only a missing final line end is added, so that the delimiter
    that follows starts a line of its own."""
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message, not message.isascii()


# -- fields and lines ------------------------------------------------------------------------------


def _fields(fields: Iterable[tuple[str, str]]) -> bytes:
    return "".join(line + CRLF for name, value in fields for line in _fold(name, value)).encode()


def _fold(name: str, value: str) -> list[str]:
    """``name: value`` as physical lines: folded before a space where a line would pass 78
    columns; a line that still passes 998 octets (one long word) is cut at 900 with "..."."""
    words = value.split(" ")
    lines = []
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        if word and len(current) + 1 + len(word) > FOLD_AT:  # never a line of only spaces
            lines.append(current)
            current = " " + word
        else:
            current += " " + word
    lines.append(current)
    return [_truncate(line) for line in lines]


def _truncate(line: str) -> str:
    raw = line.encode()
    if len(raw) <= MAX_LINE:
        return line
    return raw[:TRUNCATE_AT].decode("utf-8", "ignore") + "..."


def _truncate_bytes(line: bytes) -> bytes:
    return line if len(line) <= MAX_LINE else line[:TRUNCATE_AT] + b"..."


# -- values ----------------------------------------------------------------------------------------


def _one_line(value: str) -> str:
    """Any text as one header-safe line: CR, LF, NUL and TAB become spaces, other controls ``?``."""
    return _UNSAFE.sub("?", _NEWLINE_LIKE.sub(" ", value))


def _text(value: str) -> str:
    """For the human part: one line, UTF-8 kept, runs of whitespace collapsed."""
    return " ".join(_one_line(value).split(" ")).strip() or "?"


def _ascii(value: str) -> str:
    """For the delivery-status part: one line, ASCII only, single spaces."""
    line = "".join(c if c.isascii() else "?" for c in _one_line(value))
    return " ".join(line.split())


def _token(value: str) -> str:
    """Host names and queue ids: printable ASCII without spaces or angle brackets."""
    return re.sub(r"[^\x21-\x7e]|[<>\"\\]", "_", value) or "_"


def _status(rcpt: FailedRecipient) -> str:
    if _STATUS.fullmatch(rcpt.status) and rcpt.status[0] in _CLASSES[rcpt.action]:
        return rcpt.status
    return _GENERIC_STATUS[rcpt.action]


def _address(address: str) -> str:
    """``rfc822; addr``, or for an address with non-ASCII characters the RFC 6533 form
    ``utf-8; <utf-8-addr-xtext>`` that a message/delivery-status part may carry."""
    address = _one_line(address)
    if address.isascii():
        return f"rfc822; {address.replace(' ', '?')}"
    return "utf-8; " + "".join(_xtext_char(c) for c in address)


def _xtext_char(char: str) -> str:
    # QCHAR is printable ASCII except "+", "=" and "\"; everything else is \x{HEX} (upper case,
    # at least two digits, no leading zeros beyond that).
    if "\x21" <= char <= "\x7e" and char not in "+=\\":
        return char
    return f"\\x{{{ord(char):02X}}}"


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _default_boundary(seed: str, parts: Sequence[bytes]) -> str:
    base = "".join(c if _BOUNDARY_CHARS.fullmatch(c) else "_" for c in seed)[:70]
    boundary, n = base, 0
    while _collides(boundary, parts):
        n += 1
        suffix = f"={n}"
        boundary = base[:70 - len(suffix)] + suffix
    return boundary


def _collides(boundary: str, parts: Sequence[bytes]) -> bool:
    return any(f"--{boundary}".encode() in part for part in parts)
