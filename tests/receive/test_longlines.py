"""The long-line transform: exact output bytes, lossless re-encoding, any chunking."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent

from relaygw.receive.longlines import LIMIT, LongLineStream, Optimistic

LONG = b"x" * 1200
# What b2a_qp makes of LONG: 75 octets and a soft break, sixteen times over.
LONG_QP = b"=\r\n".join([b"x" * 75] * 16)


def transform(data: bytes, lookahead: int = 256 * 1024) -> bytes:
    stream = LongLineStream("QID", lookahead)
    return stream.feed(data) + stream.end()


def transformed(data: bytes, lookahead: int = 256 * 1024) -> tuple[bytes, LongLineStream]:
    stream = LongLineStream("QID", lookahead)
    return stream.feed(data) + stream.end(), stream


def longest(data: bytes) -> int:
    return max(map(len, data.split(b"\r\n")))


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def leaves(data: bytes) -> list[tuple[str, bytes]]:
    return [(part.get_content_type(), part.get_payload(decode=True))
            for part in parse(data).walk() if not part.is_multipart()]


# -- a text message -----------------------------------------------------------------------

def test_long_line_of_a_text_message_becomes_quoted_printable():
    message = (b"Subject: report\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
               b"first\r\n" + LONG + b"\r\nlast \r\n")
    out, stream = transformed(message)
    assert out == (b"Subject: report\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: text/plain; charset=us-ascii\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                   b"first\r\n" + LONG_QP + b"\r\nlast=20\r\n")
    assert (stream.reencoded, stream.parts, stream.folded) == (1, 1, 0)
    decoded = parse(out).get_payload(decode=True)
    assert decoded == b"first\r\n" + LONG + b"\r\nlast \r\n"
    assert decoded.split(b"\r\n")[1] == LONG


def test_an_8bit_encoding_is_replaced_in_place_with_its_continuation_lines():
    line = "Grüße, ".encode() * 200  # 1800 octets of UTF-8
    message = (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding:\r\n 8bit\r\n"
               b"Content-Type: text/html; charset=utf-8\r\nX-After: kept\r\n\r\n" + line + b"\r\n")
    out = transform(message)
    header, _, body = out.partition(b"\r\n\r\n")
    assert header == (b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n"
                      b"Content-Type: text/html; charset=utf-8\r\nX-After: kept")
    assert longest(out) <= 76
    assert parse(out).get_payload(decode=True) == line + b"\r\n"
    assert email.message_from_bytes(out, policy=email.policy.default).get_content() == \
        line.decode() + "\r\n"


def test_a_message_without_mime_headers_gets_mime_version_and_the_encoding():
    message = b"Subject: cron\r\n\r\n" + LONG + b"\r\n"
    assert transform(message) == (b"Subject: cron\r\nMIME-Version: 1.0\r\n"
                                  b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                                  + LONG_QP + b"\r\n")


def test_a_message_without_long_lines_is_unchanged():
    message = (b"Subject: a\r\n\r\n" + b"y" * LIMIT + b"\r\n.\r\n--x\r\n")
    out, stream = transformed(message)
    assert out == message
    assert (stream.reencoded, stream.parts, stream.folded) == (0, 0, 0)


def test_bare_cr_and_lf_inside_a_reencoded_line_survive_decoding():
    line = b"a\rb\nc" + b"z" * 1000
    message = b"Subject: x\r\n\r\n" + line + b"\r\nnext\r\n"
    out = transform(message)
    assert out.endswith(b"\r\nnext\r\n")
    assert b"a=0Db=0Ac" in out
    assert parse(out).get_payload(decode=True) == line + b"\r\nnext\r\n"


def test_the_last_line_without_crlf_is_encoded_without_one():
    out = transform(b"Subject: x\r\n\r\n" + LONG)
    assert out.endswith(b"\r\n\r\n" + LONG_QP)


# -- multipart ----------------------------------------------------------------------------

ATTACHMENT = b"QUJD" * 19  # one 76-octet base64 line

MULTIPART = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
             b"preamble\r\n"
             b"--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
             b"<p>\r\n" + LONG + b"\r\n</p>\r\n"
             b"--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             + ATTACHMENT + b"\r\n" + ATTACHMENT + b"\r\n"
             b"--b1--\r\nepilogue\r\n")


def test_only_the_text_part_of_a_multipart_changes():
    out, stream = transformed(MULTIPART)
    assert out == MULTIPART.replace(
        b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>\r\n" + LONG,
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n<p>\r\n" + LONG_QP)
    assert (stream.reencoded, stream.parts, stream.folded) == (1, 1, 0)
    assert leaves(out) == [("text/html", b"<p>\r\n" + LONG + b"\r\n</p>"),
                           ("application/pdf", b"ABC" * 38)]


def test_a_long_base64_line_is_folded_and_decodes_the_same():
    body = b"QUJD" * 500  # 2000 octets
    message = MULTIPART.replace(ATTACHMENT + b"\r\n" + ATTACHMENT, body)
    out, stream = transformed(message)
    assert b"\r\n" + body[:LIMIT] + b"\r\n " + body[LIMIT:2 * LIMIT - 1] + b"\r\n " + \
        body[2 * LIMIT - 1:] + b"\r\n--b1--" in out
    assert (stream.reencoded, stream.folded) == (1, 1)
    assert leaves(out)[1] == ("application/pdf", b"ABC" * 500)
    assert longest(out) == LIMIT


def test_a_quoted_printable_part_gets_soft_breaks_that_never_split_an_escape():
    line = b"=C3=A9" * 400  # 2400 octets, valid quoted-printable
    message = (b"Content-Type: multipart/alternative; boundary=b2\r\n\r\n"
               b"--b2\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + line + b"\r\n--b2--\r\n")
    out, stream = transformed(message)
    assert stream.folded == 1 and stream.parts == 0
    assert longest(out) <= LIMIT
    body = out.split(b"\r\n\r\n", 2)[2]
    assert body.startswith(line[:996] + b"=\r\n" + line[996:1992] + b"=\r\n")  # 996: whole =XX
    assert leaves(out) == leaves(message) == [("text/plain", "é".encode() * 400)]


def test_nested_multiparts_and_a_digest_default_type():
    inner = (b"--in\r\nContent-Type: text/plain\r\n\r\n" + LONG + b"\r\n--in--\r\n")
    digest = (b"--dg\r\n\r\nSubject: inside\r\n\r\n" + LONG + b"\r\n--dg--\r\n")
    message = (b"Content-Type: multipart/mixed; boundary=out\r\n\r\n"
               b"--out\r\nContent-Type: multipart/alternative; boundary=in\r\n\r\n" + inner +
               b"--out\r\nContent-Type: multipart/digest; boundary=dg\r\n\r\n" + digest +
               b"--out--\r\n")
    out, stream = transformed(message)
    # The text leaf is re-encoded; the digest's part is a message/rfc822: folded.
    assert b"--in\r\nContent-Type: text/plain\r\n" \
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + LONG_QP + b"\r\n--in--" in out
    assert b"\r\n" + LONG[:LIMIT] + b"\r\n " + LONG[LIMIT:] + b"\r\n--dg--" in out
    assert (stream.reencoded, stream.parts, stream.folded) == (1, 1, 1)


def test_output_never_contains_a_new_boundary_line():
    line = b"a" * (75 * 14) + b"--b1"  # b2a_qp's last soft-broken piece would be "--b1"
    message = MULTIPART.replace(LONG, line)
    out = transform(message)
    assert b"=\r\n=2D-b1\r\n</p>\r\n" in out
    assert out.count(b"\r\n--b1\r\n") == 2
    assert leaves(out)[0] == ("text/html", b"<p>\r\n" + line + b"\r\n</p>")


def test_padding_that_makes_a_boundary_line_long_is_dropped():
    message = MULTIPART.replace(b"--b1--\r\n", b"--b1--" + b" " * 1500 + b"\r\n")
    out = transform(message)
    assert b"\r\n--b1--\r\nepilogue\r\n" in out
    assert longest(out) <= LIMIT


def test_a_text_part_longer_than_the_lookahead_is_folded_instead():
    body = (b"short line\r\n" * 20) + LONG + b"\r\n"
    message = b"Content-Type: text/plain\r\n\r\n" + body
    out, stream = transformed(message, lookahead=200)
    assert out == (b"Content-Type: text/plain\r\n\r\n" + b"short line\r\n" * 20 +
                   LONG[:LIMIT] + b"\r\n " + LONG[LIMIT:] + b"\r\n")
    assert (stream.reencoded, stream.parts, stream.folded) == (0, 0, 1)


# -- headers ------------------------------------------------------------------------------

def test_an_over_long_header_is_folded_before_its_own_spaces():
    words = b" ".join([b"word%03d" % i for i in range(150)])  # 1199 octets
    message = b"Subject: " + words + b"\r\nX-Other: 1\r\n\r\nbody\r\n"
    out, stream = transformed(message)
    first, second = out.split(b"\r\n")[:2]
    assert first == b"Subject: " + words[:983]  # 992 octets: the next space is past 998
    assert second == words[983:]
    assert second.startswith(b" word")
    assert out.endswith(b"\r\nX-Other: 1\r\n\r\nbody\r\n")
    assert parse(out)["Subject"].replace("\r\n", "") == words.decode()
    assert (stream.reencoded, stream.folded) == (0, 1)


def test_a_header_without_spaces_is_folded_with_crlf_space():
    value = b"v" * 2000
    out = transform(b"X-Token: " + value + b"\r\n\r\nbody\r\n")
    # Before its one space first, then CRLF + space where there is none.
    assert out == (b"X-Token:\r\n " + value[:997] + b"\r\n " + value[997:1994] + b"\r\n " +
                   value[1994:] + b"\r\n\r\nbody\r\n")


def test_a_long_header_of_a_part_is_folded_and_its_body_still_reencoded():
    name = b'attachment; filename="' + b"n" * 1100 + b'.txt"'
    message = MULTIPART.replace(b"Content-Type: text/html; charset=utf-8\r\n",
                                b"Content-Type: text/html; charset=utf-8\r\n"
                                b"Content-Disposition: " + name + b"\r\n")
    out, stream = transformed(message)
    assert b"Content-Disposition: attachment;\r\n filename=" in out
    assert (stream.reencoded, stream.parts, stream.folded) == (1, 1, 1)
    assert longest(out) <= LIMIT


# -- the log ------------------------------------------------------------------------------

def test_one_log_line_says_what_was_done():
    with capturedLogs() as events:
        transform(MULTIPART.replace(ATTACHMENT + b"\r\n" + ATTACHMENT, b"QUJD" * 500))
    (event,) = [e for e in events if e.get("event") == "long_lines"]
    assert event["log_namespace"] == "relaygw.smtp.server"
    assert {k: event[k] for k in ("queue_id", "reencoded", "parts", "folded")} == {
        "queue_id": "QID", "reencoded": 1, "parts": 1, "folded": 1}
    assert formatEvent(event) == "long lines id=QID reencoded=1 parts=1 folded=1"


def test_nothing_is_logged_when_nothing_was_done():
    with capturedLogs() as events:
        transform(b"Subject: a\r\n\r\nshort\r\n")
    assert [e for e in events if e.get("event") == "long_lines"] == []


# -- any message, any chunking ------------------------------------------------------------

TEXT_LINES = [b"", b"plain", b".", b"..dot", b"-- ", b"--b1x", b"trailing  ", b"tab\t",
              b"caf\xc3\xa9", b"=3D", b"a\rb", b"c\nd", b"q" * 76, b"r " * 38, b"y" * 998,
              b"z" * 999, LONG, b"w " * 700, b"a" * (75 * 14) + b"--b1"]
B64_LINES = [ATTACHMENT, b"QUJD" * 300]
QP_LINES = [b"plain", b"=C3=A9" * 300, b"soft=", b"x" * 1000]
HEADER_LINES = [b"X-A: 1", b"X-Long: " + b"h " * 800, b"X-Token: " + b"t" * 1500]
ENCODINGS = [b"", b"Content-Transfer-Encoding: 8bit\r\n", b"Content-Transfer-Encoding: 7bit\r\n"]


@st.composite
def messages(draw):
    def lines(pool):
        return b"".join(line + b"\r\n" for line in draw(st.lists(st.sampled_from(pool),
                                                                   max_size=6)))

    headers = lines(HEADER_LINES)
    if draw(st.booleans()):
        return headers + draw(st.sampled_from(ENCODINGS)) + b"\r\n" + lines(TEXT_LINES)
    parts = []
    for kind in draw(st.lists(st.sampled_from(["text", "b64", "qp"]), min_size=1, max_size=4)):
        if kind == "text":
            head = b"Content-Type: text/plain\r\n" + draw(st.sampled_from(ENCODINGS))
            body = lines(TEXT_LINES)
        elif kind == "b64":
            head = b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
            body = lines(B64_LINES)
        else:
            head = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            body = lines(QP_LINES)
        parts.append(b"--b1\r\n" + lines(HEADER_LINES) + head + b"\r\n" + body)
    return (headers + b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n" + lines(TEXT_LINES)
            + b"".join(parts) + b"--b1--\r\n" + lines(TEXT_LINES))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=300, deadline=None)
@given(messages(), st.lists(st.integers(0, 10**6), max_size=20), st.sampled_from([300, 10**6]))
def test_any_chunking_gives_the_same_bytes_no_long_line_and_the_same_decoded_text(
        message, cuts, lookahead):
    whole = transform(message, lookahead)
    stream = LongLineStream("QID", lookahead)
    pieces = b"".join(stream.feed(chunk) for chunk in split(message, cuts)) + stream.end()
    assert pieces == whole
    assert longest(whole) <= LIMIT
    assert len(parse(whole).defects) == len(parse(message).defects)
    if lookahead > len(message):
        # Every text part is re-encoded; folds in base64 and soft breaks in
        # quoted-printable lose nothing either.
        assert leaves(whole) == leaves(message)
    else:
        assert [t for t, _ in leaves(whole)] == [t for t, _ in leaves(message)]


# -- Optimistic: the fast path in front of LongLineStream -----------------------------------


def optimistic(chunks: list[bytes], lookahead: int = 256 * 1024) -> tuple[list[bytes], bytes]:
    """What each feed returned, and what end returned."""
    stream = Optimistic(lambda: LongLineStream("QID", lookahead), lookahead)
    return [stream.feed(chunk) for chunk in chunks], stream.end()


def test_a_message_without_long_lines_is_held_and_then_goes_out_unchanged():
    message = (b"Subject: short\r\nContent-Type: text/plain\r\n\r\n"
               + b"".join(b"x" * LIMIT + b"\r\n" for _ in range(3)))
    fed, ended = optimistic([message[:50], message[50:1100], message[1100:]])
    assert (fed, ended) == ([b"", b"", b""], message)


def test_a_long_line_split_over_chunks_hands_everything_to_the_full_stream():
    message = b"Subject: long\r\n\r\n" + b"y" * 600 + b"z" * 600 + b"\r\n"
    cut = message.index(b"z")  # neither chunk holds more than LIMIT octets of the line
    fed, ended = optimistic([message[:cut], message[cut:]])
    assert b"".join(fed) + ended == transform(message)
    assert fed[0] == b"" and longest(b"".join(fed) + ended) <= LIMIT


def test_a_crlf_split_over_chunks_is_still_a_line_end():
    line = b"x" * 700
    message = b"Subject: s\r\n\r\n" + line + b"\r\n" + line + b"\r\n"
    cut = message.index(b"\r\n", len(message) - 710) + 1  # between CR and LF
    fed, ended = optimistic([message[:cut], message[cut:]])
    assert (fed, ended) == ([b"", b""], message)


def test_more_than_the_lookahead_held_goes_to_the_full_stream():
    message = b"Subject: big\r\n\r\n" + b"".join(b"w" * 100 + b"\r\n" for _ in range(40))
    fed, ended = optimistic([message[:2000], message[2000:]], lookahead=1000)
    assert fed[0] != b"" and b"".join(fed) + ended == transform(message, 1000)


@settings(max_examples=300, deadline=None)
@given(messages(), st.lists(st.integers(0, 10**6), max_size=20), st.sampled_from([300, 10**6]))
def test_the_fast_path_gives_the_same_bytes_as_the_full_stream_for_any_chunking(
        message, cuts, lookahead):
    fed, ended = optimistic(split(message, cuts), lookahead)
    assert b"".join(fed) + ended == transform(message, lookahead)
