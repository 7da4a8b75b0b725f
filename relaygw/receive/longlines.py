"""Lines over 998 octets, made fit to forward (RFC 5321 4.5.3.1.6, RFC 5322 2.1.1).

With ``[server] long_lines = "accept"`` the SMTP reader takes DATA lines up to
``max_line_length`` octets. This transform, in the receive stage, makes sure that
none of them leaves the relay (or lands in a Maildir) longer than 998 octets:

- A text part in 7bit or 8bit (or without a Content-Transfer-Encoding) is
  re-encoded as quoted-printable, which is lossless once decoded. That is a
  message that is not multipart and whose type is text/* (the default when there
  is no Content-Type), or a text/* leaf of a multipart. Only its
  Content-Transfer-Encoding field changes: replaced where it was, or added at the
  end of the part's header (a message without MIME-Version also gets
  ``MIME-Version: 1.0``). Every other header line stays byte for byte, and so do
  the boundary lines and the other parts.
- Elsewhere a long line is folded. A header line is broken before a space or tab
  it already has (unfolding gives it back), else with CRLF + space. A line of a
  quoted-printable part gets soft line breaks (lossless). Any other line gets
  CRLF + space, as Postfix does; base64 decoders ignore the space, other content
  keeps the extra line break.
- Padding after a boundary that makes its line too long is dropped (RFC 2046
  says to ignore it).

It streams. The structure of a part is known from its header, before its body,
but a long line in the body shows up only after the header that must change.
So the first ``lookahead`` octets of every candidate text part, its header
included, are held back. A long line among them gets the part re-encoded. A part that ends
first, or outgrows the window, goes out unchanged, and a long line after the
window is folded. Memory per message: the window plus one line.

Boundary lines are recognised as RFC 2046 writes them (``--boundary``, optional
``--``, optional trailing space or tab). A line of the output that would read as
one of them gets ``=2D`` (quoted-printable's ``-``) for its first ``-``, so the
structure never changes.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from twisted.logger import Logger

from relaygw.envelope import Envelope
from relaygw.receive.transforms import TransformStream
from relaygw.smtp.server import Session

# The inbound log: a session's lines share one namespace, whichever stage writes them.
log = Logger(namespace="relaygw.smtp.server")

LIMIT = 998  # octets of a line, before its CRLF, in what leaves (RFC 5322 2.1.1)
LOOKAHEAD = 256 * 1024  # octets of a text part held back while its encoding is open

# What a stream is doing with the lines it reads.
_HEADERS = "headers"  # an entity's header, held back until its blank line
_HOLD = "hold"  # a candidate text part's body, held back: re-encode or not is open
_ENCODE = "encode"  # a text part being re-encoded as quoted-printable
_SOFT = "soft"  # a quoted-printable part: long lines get soft line breaks
_FOLD = "fold"  # anything else: long lines get CRLF + space

_REENCODABLE = ("", "7bit", "8bit")


class LongLines:
    """The transform: per message, an ``Optimistic`` stream in front of a
    ``LongLineStream``."""

    def __init__(self, lookahead: int = LOOKAHEAD) -> None:
        self.lookahead = lookahead

    def start(self, envelope: Envelope, session: Session) -> TransformStream:
        queue_id, lookahead = envelope.queue_id, self.lookahead
        return Optimistic(lambda: LongLineStream(queue_id, lookahead), lookahead)


class Optimistic:
    """Almost every message has no long line, and for it ``LongLineStream`` changes
    nothing: parsing its header and holding its lines one by one would cost more than
    the rest of the receive stage together. So the message is held back as it is,
    with one C-speed look at its line lengths per chunk, until it ends (it goes out
    unchanged), a line over ``LIMIT`` shows up, or more than ``lookahead`` octets
    are held. Then everything held goes through a ``LongLineStream``, which gives the
    same bytes as if it had read the message from the start."""

    def __init__(self, make: Callable[[], TransformStream], lookahead: int) -> None:
        self._make = make
        self._lookahead = lookahead
        self._held: list[bytes] = []
        self._size = 0
        self._open = b""  # the unterminated last line (at most LIMIT octets while held)
        self._stream: TransformStream | None = None

    def head(self) -> bytes:
        return b""

    def feed(self, data: bytes) -> bytes:
        if self._stream is not None:
            return self._stream.feed(data)
        self._held.append(data)
        self._size += len(data)
        lines = (self._open + data).split(b"\r\n")
        if self._size > self._lookahead or max(map(len, lines)) > LIMIT:
            return self._read_it_all()
        self._open = lines[-1]
        return b""

    def end(self) -> bytes:
        if self._stream is None:
            held, self._held = b"".join(self._held), []
            return held
        return self._stream.end()

    def _read_it_all(self) -> bytes:
        self._stream = stream = self._make()
        held, self._held, self._open = b"".join(self._held), [], b""
        return stream.feed(held)


@dataclass(frozen=True)
class _Multipart:
    boundary: bytes
    digest: bool  # multipart/digest: a part without Content-Type is message/rfc822


@dataclass(frozen=True)
class _Entity:
    """What a header says about the body after it."""

    boundary: bytes | None  # a multipart's boundary
    digest: bool
    reencodable: bool  # text/*, in 7bit, 8bit or nothing declared
    quoted_printable: bool


class LongLineStream:
    """One message's long lines; the counts say what was done (logged at the end)."""

    def __init__(self, queue_id: str, lookahead: int = LOOKAHEAD) -> None:
        self.queue_id = queue_id
        self.lookahead = lookahead
        self.reencoded = 0  # long lines that went out inside quoted-printable
        self.parts = 0  # parts re-encoded
        self.folded = 0  # long lines folded
        self._partial = b""  # an incomplete last line, kept for the next chunk
        self._out: list[bytes] = []
        self._mode = _HEADERS
        self._top = True  # the header being read is the message's own
        self._in_digest = False  # the enclosing multipart is a digest
        self._stack: list[_Multipart] = []  # the enclosing multiparts, outermost first
        self._head: list[bytes] = []  # header lines held back, each with its CRLF
        self._body: list[bytes] = []  # body lines held back
        self._held = 0  # octets in _head and _body

    def head(self) -> bytes:
        return b""

    def feed(self, data: bytes) -> bytes:
        buf = self._partial + data if self._partial else data
        cut = buf.rfind(b"\r\n") + 2
        if cut < 2:
            self._partial = buf
            return b""
        self._partial = buf[cut:]
        self._lines(buf[:cut] if cut < len(buf) else buf)
        return self._take()

    def end(self) -> bytes:
        last = self._partial
        if last:
            # A last line without CRLF (never from the SMTP reader): handled as if
            # it had one, which is then left off.
            self._partial = b""
            self._lines(last + b"\r\n")
        self._release()
        out = self._take()
        if last:
            out = out[:-2]
        if self.reencoded or self.folded:
            log.info("long lines id={queue_id} reencoded={reencoded} parts={parts} "
                     "folded={folded}", queue_id=self.queue_id, reencoded=self.reencoded,
                     parts=self.parts, folded=self.folded, event="long_lines")
        return out

    def _take(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # -- lines ------------------------------------------------------------------------

    def _lines(self, data: bytes) -> None:
        """Complete CRLF-terminated lines: one at a time while something is held
        back, else in runs up to the next line that may be a boundary."""
        pos, size = 0, len(data)
        while pos < size:
            if self._mode in (_HEADERS, _HOLD):
                end = data.index(b"\r\n", pos) + 2
                self._held_line(data[pos:end])
                pos = end
                continue
            dash = self._next_dash_line(data, pos)
            stop = size if dash < 0 else dash
            if stop > pos:
                self._run(data[pos:stop])
            if dash >= 0:
                stop = data.index(b"\r\n", dash) + 2
                line = data[dash:stop]
                if not self._delimiter(line):
                    self._run(line)
            pos = stop

    def _next_dash_line(self, data: bytes, pos: int) -> int:
        """Where the next line starting with ``--`` starts, if a boundary is open."""
        if not self._stack:
            return -1
        if data.startswith(b"--", pos):
            return pos
        found = data.find(b"\r\n--", pos)
        return -1 if found < 0 else found + 2

    def _held_line(self, line: bytes) -> None:
        if self._stack and line.startswith(b"--") and self._delimiter(line):
            return
        if self._mode == _HEADERS:
            self._hold(self._head, line)
            if line == b"\r\n":
                self._decide()
            elif self._held > self.lookahead:
                self._release()  # no MIME structure in this much header: treat it as body
                self._mode = _FOLD
            return
        if len(line) - 2 > LIMIT:
            self._start_encoding()
            self._encode(line)
            return
        self._hold(self._body, line)
        if self._held > self.lookahead:
            self._release()
            self._mode = _FOLD

    def _hold(self, into: list[bytes], line: bytes) -> None:
        into.append(line)
        self._held += len(line)

    def _run(self, run: bytes) -> None:
        """Body lines, none of them a boundary, in the current mode."""
        if self._mode == _ENCODE:
            self._encode(run)
        elif len(run) - 2 <= LIMIT or _longest(run) <= LIMIT:
            self._out.append(run)
        else:
            fold = _soft_break if self._mode == _SOFT else _fold_space
            lines = run.split(b"\r\n")
            for i, line in enumerate(lines):
                if len(line) > LIMIT:
                    lines[i] = self._guard(fold(line))
                    self.folded += 1
            self._out.append(b"\r\n".join(lines))

    def _encode(self, run: bytes) -> None:
        if len(run) - 2 > LIMIT:
            self.reencoded += sum(1 for line in run.split(b"\r\n") if len(line) > LIMIT)
        self._out.append(self._guard(_quoted_printable(run)))

    # -- structure --------------------------------------------------------------------

    def _delimiter(self, line: bytes) -> bool:
        """Handle ``line`` if it is a boundary line of an open multipart."""
        found = self._match(line[:-2])
        if found is None:
            return False
        index, close = found
        self._release()  # a part that ends undecided goes out as it came
        del self._stack[index + 1:]  # inner multiparts left open end here too
        if len(line) - 2 > LIMIT:
            line = line[:-2].rstrip(b" \t") + b"\r\n"  # only padding made it long
            self.folded += 1
        self._out.append(line)
        if close:
            self._stack.pop()
            self._mode = _FOLD  # the epilogue
        else:
            self._mode, self._top = _HEADERS, False
            self._in_digest = self._stack[index].digest
        return True

    def _match(self, text: bytes) -> tuple[int, bool] | None:
        """(index in the stack, whether it closes) for a boundary line's text."""
        if not text.startswith(b"--"):
            return None
        text = text[2:].rstrip(b" \t")
        for i in range(len(self._stack) - 1, -1, -1):
            boundary = self._stack[i].boundary
            if text == boundary:
                return i, False
            if text == boundary + b"--":
                return i, True
        return None

    def _guard(self, out: bytes) -> bytes:
        """``out`` with no line that reads as a boundary line (QP or soft-broken output)."""
        if not self._stack or not (out.startswith(b"--") or b"\r\n--" in out):
            return out
        lines = out.split(b"\r\n")
        for i, line in enumerate(lines):
            if self._match(line) is not None:
                lines[i] = b"=2D" + line[1:]
        return b"\r\n".join(lines)

    def _decide(self) -> None:
        """The blank line after a header: what the body is."""
        entity = _entity(b"".join(self._head), self._in_digest)
        if entity.boundary is not None:
            self._stack.append(_Multipart(entity.boundary, entity.digest))
            self._release()
            self._mode = _FOLD  # the preamble
        elif entity.reencodable:
            self._mode = _HOLD
        else:
            self._release()
            self._mode = _SOFT if entity.quoted_printable else _FOLD

    def _release(self) -> None:
        """What is held back goes out unchanged (long header lines folded)."""
        for line in self._head:
            self._header_line(line)
        self._out.extend(self._body)
        self._head.clear()
        self._body.clear()
        self._held = 0

    def _start_encoding(self) -> None:
        """A long line in a held text part: out goes its header, changed, and its body
        so far in quoted-printable."""
        for line in _declare_quoted_printable(self._head, mime_version=self._top):
            self._header_line(line)
        body = b"".join(self._body)
        self._head.clear()
        self._body.clear()
        self._held = 0
        self._mode = _ENCODE
        self.parts += 1
        if body:
            self._encode(body)

    def _header_line(self, line: bytes) -> None:
        if len(line) - 2 > LIMIT:
            line = _fold_header(line[:-2]) + b"\r\n"
            self.folded += 1
        self._out.append(line)


def _entity(header: bytes, in_digest: bool) -> _Entity:
    message = BytesHeaderParser(policy=compat32).parsebytes(header)
    if in_digest:
        message.set_default_type("message/rfc822")
    maintype = message.get_content_maintype()
    if maintype == "multipart":
        boundary = message.get_boundary()
        if boundary:
            try:
                # parsebytes decoded with surrogateescape: this gives the bytes back.
                return _Entity(boundary.encode("ascii", "surrogateescape"),
                               message.get_content_subtype() == "digest", False, False)
            except UnicodeEncodeError:  # an RFC 2231 value beyond ASCII: not a boundary
                pass
        return _Entity(None, False, False, False)  # a multipart without a usable boundary
    encodings = [str(value).strip().lower()
                 for value in message.get_all("Content-Transfer-Encoding") or []]
    single = len(encodings) <= 1 and len(message.get_all("Content-Type") or []) <= 1
    encoding = encodings[0] if encodings else ""
    return _Entity(None, False, maintype == "text" and single and encoding in _REENCODABLE,
                   single and encoding == "quoted-printable")


def _field_name(line: bytes) -> bytes | None:
    """The lower-cased name of the field a header line starts, None for a continuation."""
    if line[:1] in (b" ", b"\t") or b":" not in line:
        return None
    return line.split(b":", 1)[0].rstrip(b" \t").lower()


def _declare_quoted_printable(head: list[bytes], *, mime_version: bool) -> list[bytes]:
    """The header lines (the blank line last) with Content-Transfer-Encoding set to
    quoted-printable: the old field (with its continuation lines) replaced in place,
    or the new one added at the end; MIME-Version added when asked and missing."""
    cte = b"Content-Transfer-Encoding: quoted-printable\r\n"
    out: list[bytes] = []
    replaced = in_old = has_version = False
    for line in head[:-1]:
        name = _field_name(line)
        if in_old and name is None:
            continue  # a continuation of the field being replaced
        in_old = name == b"content-transfer-encoding"
        if in_old:
            if not replaced:
                out.append(cte)
                replaced = True
            continue
        has_version = has_version or name == b"mime-version"
        out.append(line)
    if mime_version and not has_version:
        out.append(b"MIME-Version: 1.0\r\n")
    if not replaced:
        out.append(cte)
    out.append(head[-1])
    return out


def _longest(run: bytes) -> int:
    return max(map(len, run.split(b"\r\n")))


def _quoted_printable(run: bytes) -> bytes:
    """Quoted-printable for complete CRLF lines, each CRLF a hard line break.

    Each line is encoded on its own terms, so how the lines were grouped into
    chunks never changes the output: a line without a bare CR or LF in text mode
    (its CRLF is the line break), a line with one in binary mode, where they
    become =0D and =0A, then its CRLF.
    """
    crlf = run.count(b"\r\n")
    if run.count(b"\r") == crlf and run.count(b"\n") == crlf:
        return binascii.b2a_qp(run, istext=True)
    out = []
    for line in run.split(b"\r\n")[:-1]:
        if b"\r" in line or b"\n" in line:
            out.append(binascii.b2a_qp(line, istext=False) + b"\r\n")
        else:
            out.append(binascii.b2a_qp(line + b"\r\n", istext=True))
    return b"".join(out)


def _fold_space(line: bytes) -> bytes:
    """Postfix's fold: CRLF + space every 998 octets."""
    pieces = [line[:LIMIT]]
    pieces += [b" " + line[i:i + LIMIT - 1] for i in range(LIMIT, len(line), LIMIT - 1)]
    return b"\r\n".join(pieces)


def _soft_break(line: bytes) -> bytes:
    """Quoted-printable soft line breaks (``=`` CRLF), never inside an ``=XX``."""
    pieces, start = [], 0
    while len(line) - start > LIMIT:
        cut = start + LIMIT - 1  # room for the "="
        if line[cut - 1:cut] == b"=":
            cut -= 1
        elif line[cut - 2:cut - 1] == b"=":
            cut -= 2
        pieces.append(line[start:cut] + b"=")
        start = cut
    pieces.append(line[start:])
    return b"\r\n".join(pieces)


def _fold_header(line: bytes) -> bytes:
    """A header line folded to 998 octets a line: before a space or tab it holds,
    so that unfolding gives the line back, else with CRLF + space."""
    pieces, start, prefix = [], 0, b""
    last = len(line.rstrip(b" \t"))  # a fold must leave something other than blanks
    while len(prefix) + len(line) - start > LIMIT:
        end = start + LIMIT - len(prefix)
        cut = max(line.rfind(b" ", start + 1, end + 1), line.rfind(b"\t", start + 1, end + 1))
        if start < cut < last and line[start:cut].strip(b" \t"):
            pieces.append(prefix + line[start:cut])
            start, prefix = cut, b""  # the next line begins with that space or tab
        else:
            pieces.append(prefix + line[start:end])
            start, prefix = end, b" "
    pieces.append(prefix + line[start:])
    return b"\r\n".join(pieces)
