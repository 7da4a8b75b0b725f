"""The Message-ID of a message as its bytes stream in, for the ``accepted`` log line.

The receive stage never holds a whole message: this looks at the header section
only, line by line as chunks arrive, keeps nothing but the line in progress and the
Message-ID field once met, and stops at the end of the header section (or after
``HEADER_LIMIT`` bytes, or at the first line that is no header field).
"""

from __future__ import annotations

HEADER_LIMIT = 64 * 1024  # bytes of header section looked at, as SpoolContent.read_headers
FIELD_LIMIT = 2048  # bytes kept of the Message-ID field (folded lines included)
_NAME = b"message-id"


class MessageIdScan:
    """Feed it the message's bytes (CRLF lines, as the client sent them); read
    ``message_id`` at the end: the field's value, unfolded, or None."""

    __slots__ = ("done", "message_id", "_line", "_overlong", "_seen", "_field")

    def __init__(self) -> None:
        self.done = False  # nothing more to learn: the caller may stop feeding
        self.message_id: str | None = None
        self._line = b""  # the start of a line not complete yet
        self._overlong = False  # that line is over FIELD_LIMIT: the rest of it is dropped
        self._seen = 0
        self._field: bytes | None = None  # the Message-ID field being read (may be folded)

    def feed(self, data: bytes) -> bool:
        """Look at the next bytes; True once ``done``."""
        if self.done:
            return True
        self._seen += len(data)
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._overlong:
                line, self._overlong = self._line + b"\r\n", False
            else:
                line = self._line + data[start:end + 1]
            self._line = b""
            self._header_line(line)
            if self.done:
                return True
            start = end + 1
        if not self._overlong and start < len(data):
            self._line += data[start:]
            if len(self._line) > FIELD_LIMIT:
                self._line, self._overlong = self._line[:FIELD_LIMIT], True
        if self._field is not None and self._line[:1] not in (b"", b" ", b"\t"):
            self._finish()  # the next line is no continuation: the field is complete
        if self._seen > HEADER_LIMIT:
            self._finish()
        return self.done

    def end(self) -> str | None:
        """The data is over (a message of headers only has no empty line)."""
        if not self.done:
            if self._line:
                self._header_line(self._line)
            self._finish()
        return self.message_id

    def _header_line(self, line: bytes) -> None:
        line = line[:FIELD_LIMIT]
        if line in (b"\r\n", b"\n"):  # the end of the header section
            self._finish()
            return
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the field before
            if self._field is not None and len(self._field) < FIELD_LIMIT:
                self._field += line
            return
        self._close_field()
        if self.done:
            return
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")  # obsolete syntax allows blanks before the colon
        if not colon or not name or b" " in name or b"\t" in name:
            self._finish()  # not a header field: the body began without an empty line
            return
        if name.lower() == _NAME:
            self._field = line

    def _close_field(self) -> None:
        field, self._field = self._field, None
        if field is None:
            return
        value = field.partition(b":")[2]
        text = " ".join(value.decode("utf-8", "replace").split())
        self.message_id = text or None
        self.done = True  # the first Message-ID is the one

    def _finish(self) -> None:
        self._close_field()
        self.done = True
        self._line = b""
