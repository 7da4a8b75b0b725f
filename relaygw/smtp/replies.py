"""SMTP reply values: what the server's verb handlers, the policies and the receive stage
answer with, what the client parses the next hop's replies into, and the one place that
formats them for the wire."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: RFC 5321 code, RFC 3463 enhanced code, text.

    ``text`` may hold several lines separated by ``\\n``; each becomes its own
    reply line. ``close`` asks the protocol to drop the connection once sent.
    """

    code: int
    enhanced: str | None
    text: str
    close: bool = False

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced is not None and self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced code {self.enhanced} does not match {self.code}")
        if "\r" in self.text:
            raise ValueError("reply text must not contain CR")

    def lines(self) -> list[str]:
        parts = self.text.split("\n") or [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        last = len(parts) - 1
        return [
            self._trimmed(f"{self.code}{' ' if i == last else '-'}{prefix}{part}")
            for i, part in enumerate(parts)
        ]

    def to_bytes(self) -> bytes:
        if "\n" not in self.text:  # one line, what nearly every reply is: lines() inlined
            prefix = f"{self.code} {self.enhanced} " if self.enhanced else f"{self.code} "
            return (self._trimmed(prefix + self.text) + "\r\n").encode("utf-8")
        return "".join(line + "\r\n" for line in self.lines()).encode("utf-8")

    def _trimmed(self, line: str) -> str:
        # A reply's text is optional, and so is the space before it ("250"). An AUTH
        # challenge's is not: RFC 4954 4 writes it "334" SP [base64], so an empty
        # challenge is "334 " (clients such as s-nail wait for the space).
        return line if self.code == 334 else line.rstrip(" ")

    def __str__(self) -> str:
        return " | ".join(self.lines())


# Replies used in several places; handlers build specific ones inline.
OK = Reply(250, "2.0.0", "OK")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_NEWLINE_COMMAND = Reply(500, "5.5.2", "Bare CR or LF in command")
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command not recognized")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection", close=True)
TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection", close=True)
TEMP_LOCAL_ERROR = Reply(451, "4.3.0", "Temporary local problem, try again later")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
