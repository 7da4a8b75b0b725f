"""The courier contract: what the queue hands a delivery method, and what it gets back.

A job is the recipients of one message that share a route and a next hop. Couriers read
the message through its :class:`MessageContent` (the spool provides it); they never open
spool files themselves, and nothing here depends on the queue package.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred

from relaygw.envelope import Envelope
from relaygw.results import DeliveryResult
from relaygw.routing import RouteDecision

__all__ = ["ContentReader", "Courier", "DeliveryJob", "MessageContent"]


class ContentReader(Protocol):
    """One pass over a message, chunk by chunk, without blocking the reactor."""

    def read(self) -> Deferred[bytes]:
        """The next chunk; ``b""`` at the end."""
        ...

    def close(self) -> Deferred[None]:
        """Release the file; safe after the end and before the first read."""
        ...


class MessageContent(Protocol):
    """The bytes of one stored message (as received: CRLF, dot-unstuffed)."""

    @property
    def size(self) -> int:
        """Message bytes."""
        ...

    def reader(self) -> ContentReader:
        """A new reader; its reads run in the spool's threads."""
        ...

    def headers(self) -> Deferred[bytes]:
        """The header section (see :meth:`read_headers`), read in the spool's threads."""
        ...

    # Blocking: for code that already runs in a thread (Maildir delivery, the CLI).

    def read_headers(self) -> bytes:
        """Everything before the first empty line, line ends as stored, at most 64 KiB."""
        ...

    def read_all(self) -> bytes:
        ...

    def chunks(self, size: int) -> Iterator[bytes]:
        """The message in pieces of at most ``size`` bytes."""
        ...


@dataclass(frozen=True)
class DeliveryJob:
    """One courier call: recipients of one message that share a route and next hop."""

    queue_id: str
    envelope: Envelope
    content: MessageContent
    indexes: tuple[int, ...]  # positions in envelope.recipients
    decisions: tuple[RouteDecision, ...]  # same order as indexes


class Courier(Protocol):
    def deliver(self, job: DeliveryJob) -> Deferred[list[DeliveryResult]]:
        """One result per job recipient, in order; never fails."""
        ...
