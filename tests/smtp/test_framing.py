"""The DATA reader and the dot-stuffer, against simple line-by-line models."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygw.smtp.framing import (
    BARE_NEWLINE,
    LINE_TOO_LONG,
    TOO_BIG,
    DataReader,
    DotStuffer,
    line_too_long,
)
from relaygw.smtp.replies import Reply

FRAGMENTS = [b"a", b"Subject: x", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.\r\n", b".\r\n",
             b"x" * 30, b"Received: y\r\n", b"\x00", b"\r\n\r\n", b"\n.\n", b"\r.\r"]


def model(stream: bytes, max_size: int, max_line: int, normalize: bool):
    """What the reader must do, written the slow and obvious way."""
    lines = stream.split(b"\r\n")
    body, too_long, bare = [], False, False
    for i, line in enumerate(lines[:-1]):
        if line == b".":
            rest = b"\r\n".join(lines[i + 1:])
            break
        if line.startswith(b"."):
            line = line[1:]
        bare = bare or b"\r" in line or b"\n" in line
        too_long = too_long or len(line) + 2 > max_line
        body.append(line + b"\r\n")
    else:
        return None  # no end marker
    content = b"".join(body)
    if normalize:
        content = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    headers = content.split(b"\r\n\r\n", 1)[0] if not content.startswith(b"\r\n") else b""
    hops = len(re.findall(rb"(?im)^received[ \t]*:", headers + b"\r\n"))
    if len(content) > max_size:
        problem = TOO_BIG
    elif bare and not normalize:
        problem = BARE_NEWLINE
    elif too_long:
        problem = line_too_long(max_line)
    else:
        problem = None
    return content, rest, problem, hops


def run_reader(chunks, max_size, max_line, normalize):
    reader = DataReader(max_size, normalize_bare_newlines=normalize, max_line=max_line)
    out = []
    for chunk in chunks:
        if reader.done:
            break
        out.append(reader.feed(chunk))
    return reader, b"".join(out)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


@settings(max_examples=400)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.lists(st.integers(0, 10**6)),
       st.booleans(), st.integers(40, 400))
def test_reader_matches_the_model_for_any_split(fragments, cuts, normalize, max_size):
    stream = b"".join(fragments) + b"\r\n.\r\nQUIT\r\n"
    expected = model(stream, max_size, 40, normalize)
    reader, content = run_reader(split(stream, cuts), max_size, 40, normalize)
    assert reader.done
    exp_content, exp_rest, exp_problem, exp_hops = expected
    assert reader.problem == exp_problem
    consumed = len(stream) - len(exp_rest)
    assert reader.remainder == stream[consumed:][: len(reader.remainder)]
    if exp_problem is None:
        assert content == exp_content
        assert reader.received_headers == exp_hops


def test_remainder_holds_pipelined_commands():
    reader, content = run_reader([b"a\r\n.\r\nMAIL FROM:<x@y>\r\n"], 100, 1000, False)
    assert content == b"a\r\n"
    assert reader.remainder == b"MAIL FROM:<x@y>\r\n"


def test_empty_message_ends_at_once():
    reader, content = run_reader([b".\r\n"], 100, 1000, False)
    assert reader.done and content == b"" and reader.problem is None


def test_smuggling_variants_never_end_data():
    for variant in [b"\n.\n", b"\n.\r", b"\r.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n",
                    b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\r\r\n", b"\r\r\n.\r\r\n"]:
        stream = b"Subject: x\r\n\r\nhi" + variant + b"MAIL FROM:<evil@x>\r\n"
        reader, _ = run_reader([stream], 10**6, 1000, False)
        assert not reader.done, variant
        reader.feed(b"\r\n.\r\n")
        assert reader.done and reader.remainder == b""
        if b"\r\r" not in variant and b"\x00" not in variant:
            assert reader.problem == BARE_NEWLINE, variant


def test_memory_stays_bounded_for_a_line_without_end():
    reader = DataReader(10**9)
    for _ in range(200):
        reader.feed(b"z" * 65536)
        assert len(reader._pending) <= 1001
    reader.feed(b"\r\n.\r\n")
    assert reader.done and reader.problem == LINE_TOO_LONG


def test_a_line_at_the_cap_is_accepted():
    line = b"w" * 65534  # 65536 octets with its CRLF
    stream = b"Subject: x\r\n\r\n" + line + b"\r\n.\r\n"
    for chunks in ([stream], [stream[i:i + 4096] for i in range(0, len(stream), 4096)]):
        reader, content = run_reader(chunks, 10**6, 65536, False)
        assert reader.done and reader.problem is None
        assert content == b"Subject: x\r\n\r\n" + line + b"\r\n"


def test_a_line_over_the_cap_is_refused_after_the_end_and_no_longer_stored():
    stream = b"Subject: x\r\n\r\n" + b"w" * 65535 + b"\r\nafter\r\n.\r\nQUIT\r\n"
    for chunks in ([stream], [stream[i:i + 4096] for i in range(0, len(stream), 4096)]):
        reader, content = run_reader(chunks, 10**6, 65536, False)
        assert reader.done and reader.remainder == b"QUIT\r\n"
        assert reader.problem == Reply(500, "5.5.2",
                                       "Message contains a line longer than 65536 octets")
        assert b"after" not in content  # refused anyway: nothing after it is stored


def test_the_rfc_limit_keeps_its_reply():
    reader, _ = run_reader([b"x" * 999 + b"\r\n.\r\n"], 10**6, 1000, False)
    assert reader.problem == LINE_TOO_LONG == Reply(
        500, "5.5.2", "Message contains a line longer than 1000 octets")


def test_memory_stays_bounded_for_a_line_without_end_under_a_larger_cap():
    reader = DataReader(10**9, max_line=65536)
    for _ in range(200):
        reader.feed(b"z" * 65536)
        assert len(reader._pending) <= 65537
    reader.feed(b"\r\n.\r\n")
    assert reader.done and reader.problem == line_too_long(65536)


def stuff_model(data: bytes) -> bytes:
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    lines = data.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


@settings(max_examples=400)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.lists(st.integers(0, 10**6)))
def test_stuffer_matches_the_model_for_any_split(fragments, cuts):
    data = b"".join(fragments)
    stuffer = DotStuffer()
    out = b"".join(stuffer.feed(c) for c in split(data, cuts)) + stuffer.finish()
    assert out == stuff_model(data)
    # What a strict reader makes of it is exactly the canonical input.
    reader, content = run_reader([out], 10**9, 10**9, False)
    assert reader.done and reader.remainder == b"" and reader.problem is None
    canonical = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if canonical and not canonical.endswith(b"\r\n"):
        canonical += b"\r\n"
    assert content == canonical


def test_dot_at_a_16k_boundary_is_stuffed():
    body = b"a" * 16382 + b"\r\n.\r\nMAIL FROM:<evil@x>\r\n"
    stuffer = DotStuffer()
    out = stuffer.feed(body[:16384]) + stuffer.feed(body[16384:]) + stuffer.finish()
    assert b"\r\n..\r\nMAIL FROM" in out
    assert out.count(b"\r\n.\r\n") == 1 and out.endswith(b"\r\n.\r\n")
