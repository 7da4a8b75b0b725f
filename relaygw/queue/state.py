"""Per-recipient delivery state and the hold flag: what changes while a message
waits, and its JSON form on disk.

The envelope (``relaygw.envelope``) is written once, with the message; this state
changes after every delivery attempt and lives in its own small file beside it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from relaygw.envelope import Envelope

PENDING = "pending"      # not yet delivered; next attempt at next_attempt
DELIVERED = "delivered"  # accepted by the next hop or written to the mailbox
FAILED = "failed"        # permanent failure (bounce generated or not needed)
RECIPIENT_STATES = (PENDING, DELIVERED, FAILED)


@dataclass(frozen=True)
class RecipientState:
    address: str
    status: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    last_reply: str | None = None  # the peer's or our own diagnostic, for logs and DSNs
    enhanced: str | None = None  # "4.4.1", "5.1.1"
    remote_host: str | None = None
    # Final recipients: the DSN the sender asked for (failed, delivered or relayed) is
    # durably queued, or none is due.
    notified: bool = False
    relayed: bool = False  # DELIVERED to a next hop without DSN: a success DSN says "relayed"
    delay_warned: bool = False  # PENDING: the one delay warning is durably queued

    @property
    def is_final(self) -> bool:
        return self.status != PENDING

    @property
    def needs_bounce(self) -> bool:
        return self.status == FAILED and not self.notified

    @property
    def needs_dsn(self) -> bool:
        """Final, and the sender's DSN for it (if one is due) not yet queued."""
        return self.is_final and not self.notified


@dataclass(frozen=True)
class QueueState:
    """What changes while a message waits: recipient states and the hold flag."""

    recipients: tuple[RecipientState, ...]
    held: bool = False

    @classmethod
    def initial(cls, envelope: Envelope) -> QueueState:
        return cls(tuple(RecipientState(r.address, next_attempt=envelope.arrived)
                         for r in envelope.recipients))

    @property
    def is_complete(self) -> bool:
        """Nothing left to do: every recipient delivered, or failed and reported."""
        return all(r.is_final and not r.needs_dsn for r in self.recipients)

    def with_recipient(self, index: int, state: RecipientState) -> QueueState:
        rcpts = list(self.recipients)
        rcpts[index] = state
        return replace(self, recipients=tuple(rcpts))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, envelope: Envelope) -> QueueState:
        data: dict[str, Any] = json.loads(raw)
        rcpts = tuple(RecipientState(**r) for r in data["recipients"])
        if [r.address for r in rcpts] != [r.address for r in envelope.recipients]:
            raise ValueError("recipient state does not match the envelope")
        for r in rcpts:
            if r.status not in RECIPIENT_STATES:
                raise ValueError(f"unknown recipient status {r.status!r}")
        return cls(rcpts, bool(data.get("held", False)))
