"""The DATA stream in both directions: a strict reader for inbound mail and a
stateful dot-stuffer for outbound mail.

Only CRLF ends a line and only CRLF.CRLF ends DATA (RFC 5321 4.1.1.4). Both
classes work on whole chunks with bytes methods (find, count, replace), so the
cost per message is a handful of C-level passes, not a Python loop per byte.
"""

from __future__ import annotations

import re

from relaygw.smtp.replies import Reply

MAX_LINE = 1000  # octets including CRLF (RFC 5321 4.5.3.1.6)

_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")

TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
BARE_NEWLINE = Reply(550, "5.5.2", "Message contains bare CR or LF characters")


def line_too_long(max_line: int) -> Reply:
    return Reply(500, "5.5.2", f"Message contains a line longer than {max_line} octets")


LINE_TOO_LONG = line_too_long(MAX_LINE)


class DataReader:
    """Consume the raw DATA stream, yield canonical message bytes.

    ``feed`` returns the unstuffed content to store; once the end marker has
    been seen, ``done`` is true and ``remainder`` holds the bytes that followed
    it (pipelined commands). ``problem`` then says why the message must be
    refused, if it must: the stream is always read to its end first, so the
    session stays in sync whatever the content was.

    ``max_line`` is the longest line accepted, in octets with its CRLF: RFC 5321's
    1000, or more when the receive stage re-encodes long lines before they go out.
    """

    def __init__(self, max_size: int, *, normalize_bare_newlines: bool = False,
                 max_line: int = MAX_LINE) -> None:
        self.max_size = max_size
        self.normalize = normalize_bare_newlines
        self.max_line = max_line
        self.done = False
        self.remainder = b""
        self.size = 0  # canonical octets of content seen, stored or not
        self.received_headers = 0
        self.in_headers = True
        self.bare_newline = False
        self.line_too_long = False
        self._pending = b""  # an incomplete last line, kept for the next chunk
        self._line_start = True  # whether _pending begins at the start of a line

    @property
    def oversize(self) -> bool:
        return self.size > self.max_size

    @property
    def problem(self) -> Reply | None:
        if self.oversize:
            return TOO_BIG
        if self.bare_newline and not self.normalize:
            return BARE_NEWLINE
        if self.line_too_long:
            return line_too_long(self.max_line)
        return None

    def feed(self, data: bytes) -> bytes:
        if self.done:
            raise RuntimeError("DATA already complete")
        buf = self._pending + data if self._pending else data
        line_start = self._line_start
        if line_start and buf.startswith(b".\r\n"):
            end = 0
        else:
            end = buf.find(b"\r\n.\r\n")
            if end >= 0:
                end += 2  # the CRLF belongs to the last content line
        if end >= 0:
            self.done = True
            self.remainder = buf[end + 3:]
            self._pending = b""
            return self._process(buf[:end], line_start)
        cut = buf.rfind(b"\r\n") + 2
        if cut >= 2:
            lines, self._pending = buf[:cut], buf[cut:]
            self._line_start = True
        else:
            lines, self._pending = b"", buf
            self._line_start = line_start
        if len(self._pending) > self.max_line:
            # A line without end: remember it was too long, keep only the last byte
            # (it may be the CR of the coming CRLF) so memory stays bounded.
            self.line_too_long = True
            head = self._pending[:-1]
            if b"\r" in head or b"\n" in head:  # no CRLF in here: any is bare
                self.bare_newline = True
            dropped = len(head)
            if self._line_start and self._pending.startswith(b"."):
                dropped -= 1  # the stuffing dot is not content
            self.size += dropped
            self._pending = self._pending[-1:]
            self._line_start = False
        return self._process(lines, line_start) if lines else b""

    def _process(self, lines: bytes, line_start: bool) -> bytes:
        """Check and unstuff a run of complete CRLF-terminated lines."""
        if not lines:
            return b""
        crlf = lines.count(b"\r\n")
        if lines.count(b"\r") != crlf or lines.count(b"\n") != crlf:
            self.bare_newline = True
        # Unstuff: every line that starts with a dot loses that dot.
        out = lines.replace(b"\r\n.", b"\r\n")
        if line_start and out.startswith(b"."):
            out = out[1:]
        if not self.line_too_long and len(out) > self.max_line - 2:
            longest = max(map(len, out.split(b"\r\n")))
            self.line_too_long = longest + 2 > self.max_line
        if self.bare_newline and self.normalize:
            out = _ANY_NEWLINE.sub(b"\r\n", out)
        if self.in_headers:
            self._scan_headers(out, line_start)
        self.size += len(out)
        if (self.size > self.max_size or self.line_too_long
                or (self.bare_newline and not self.normalize)):
            return b""  # refused anyway: stop storing, keep reading to the end
        return out

    def _scan_headers(self, out: bytes, line_start: bool) -> None:
        if line_start and out.startswith(b"\r\n"):
            self.in_headers = False
            return
        blank = out.find(b"\r\n\r\n")
        head = out if blank < 0 else out[:blank + 2]
        self.received_headers += len(_RECEIVED.findall(head))
        if blank >= 0:
            self.in_headers = False


class DotStuffer:
    """Turn stored message bytes into a DATA stream that cannot end early.

    Whatever the input holds, the output has CRLF line ends only and every line
    that starts with a dot is stuffed, also when the dot is the first byte of a
    chunk (twisted.mail's per-chunk stuffing misses exactly that case).
    """

    def __init__(self) -> None:
        self._tail = b"\r\n"  # last bytes sent: the message starts at a line start
        self._held_cr = False  # a CR at the end of a chunk may pair with the next LF

    def feed(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            chunk = _ANY_NEWLINE.sub(b"\r\n", chunk)
        joined = self._tail + chunk
        stuffed = joined.replace(b"\r\n.", b"\r\n..")[len(self._tail):]
        self._tail = joined[-2:]
        return stuffed

    def finish(self) -> bytes:
        """The end of the stream: the missing line end, if any, and the final dot."""
        out = b""
        if self._held_cr:
            self._held_cr = False
            out = self.feed(b"\n")
        if self._tail != b"\r\n":
            out += b"\r\n"
        return out + b".\r\n"
