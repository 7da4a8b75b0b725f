"""Tests for relaygw.receive.message_id: the Message-ID, read from the header section as
the message streams in, whatever the chunking."""

from __future__ import annotations

import pytest

from relaygw.receive.message_id import FIELD_LIMIT, HEADER_LIMIT, MessageIdScan

BODY = b"\r\nMessage-ID: <not-this@body.example>\r\nbody\r\n"


def scan(data: bytes, chunk: int | None = None) -> tuple[str | None, int]:
    """(the Message-ID found, bytes fed before the scan said it was done)."""
    s = MessageIdScan()
    step = chunk or len(data) or 1
    fed = 0
    for i in range(0, len(data), step):
        fed += len(data[i:i + step])
        if s.feed(data[i:i + step]):
            break
    return s.end(), fed


@pytest.mark.parametrize("chunk", [None, 1, 2, 7, 64])
@pytest.mark.parametrize(("header", "expected"), [
    (b"Subject: x\r\nMessage-ID: <1.2@client.example>\r\nTo: b@x\r\n",
     "<1.2@client.example>"),
    (b"message-id:<lower@x>\r\n", "<lower@x>"),
    (b"MESSAGE-ID :  <obsolete-blank@x>  \r\n", "<obsolete-blank@x>"),
    (b"Message-ID:\r\n <folded@x>\r\nSubject: y\r\n", "<folded@x>"),
    (b"Message-ID: <a@x>\r\n\t(comment)\r\n", "<a@x> (comment)"),
    (b"Message-ID: <first@x>\r\nMessage-ID: <second@x>\r\n", "<first@x>"),
    (b"Subject: no id here\r\n", None),
    (b"Message-ID:\r\n", None),
    (b"Message-ID: <j\xc3\xb6rg@b\xc3\xbccher.example>\r\n", "<jörg@bücher.example>"),
    (b"Message-ID: <bad\xff@x>\r\n", "<bad\ufffd@x>"),
    (b"X-Long: " + b"a" * 5000 + b"\r\nMessage-ID: <after-long@x>\r\n", "<after-long@x>"),
])
def test_the_message_id_of_the_header_section(header: bytes, expected: str | None,
                                              chunk: int | None) -> None:
    assert scan(header + BODY, chunk)[0] == expected


def test_the_scan_stops_at_the_end_of_the_header_section() -> None:
    data = b"Subject: x\r\nTo: y\r\n" + BODY
    found, fed = scan(data, chunk=4)
    assert found is None
    assert fed <= len(b"Subject: x\r\nTo: y\r\n\r\n") + 4


def test_the_scan_stops_once_the_field_after_the_message_id_begins() -> None:
    data = b"Message-ID: <m@x>\r\nSubject: " + b"s" * 100 + b"\r\n" + BODY
    found, fed = scan(data, chunk=1)
    assert (found, fed) == ("<m@x>", len(b"Message-ID: <m@x>\r\nS"))


def test_a_line_that_is_no_header_field_ends_the_header_section() -> None:
    assert scan(b"this is a body without headers\r\nMessage-ID: <m@x>\r\n\r\n")[0] is None
    assert scan(b"Subject: x\r\nMessage-ID <no-colon@x>\r\nMessage-ID: <m@x>\r\n")[0] is None


def test_a_message_of_headers_only() -> None:
    assert scan(b"Message-ID: <m@x>")[0] == "<m@x>"  # no line end at all
    assert scan(b"Message-ID: <m@x>\r\n")[0] == "<m@x>"
    assert scan(b"")[0] is None


def test_what_is_kept_is_bounded() -> None:
    huge = b"Message-ID: <" + b"x" * (10 * FIELD_LIMIT) + b"@x>\r\n"
    found, _ = scan(huge + BODY, chunk=1000)
    assert found is not None and found.startswith("<xxx") and len(found) <= FIELD_LIMIT
    folded = b"Message-ID: <m@x>\r\n" + b" more\r\n" * 2000
    found, _ = scan(folded + BODY, chunk=1000)
    assert found is not None and found.startswith("<m@x> more") and len(found) < 2 * FIELD_LIMIT
    # A header section that never ends is given up on after HEADER_LIMIT bytes.
    s = MessageIdScan()
    line = b"X-Filler: " + b"f" * 100 + b"\r\n"
    fed = 0
    while not s.feed(line):
        fed += len(line)
        assert fed <= HEADER_LIMIT + len(line)
    assert s.feed(b"Message-ID: <late@x>\r\n") and s.end() is None
