"""The envelope of one accepted message, and its JSON form on disk.

A value type every layer shares: the receive stage builds it, the spool stores it
once beside the message, couriers read the sender, the recipients and their DSN
parameters from it. Per-recipient delivery state is the queue's
(``relaygw.queue.state``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class EnvelopeRecipient:
    address: str
    params: dict[str, str | None] = field(default_factory=dict)  # NOTIFY, ORCPT

    def notify_on(self, event: str) -> bool:
        """Whether the sender asked for a DSN on ``event`` (``"SUCCESS"``, ``"FAILURE"`` or
        ``"DELAY"``) for this recipient. Without NOTIFY: failures and delays, as RFC 3461
        §4.1 lets an MTA choose (delays only where the queue sends delay warnings at all);
        ``NEVER``: nothing."""
        notify = self.params.get("NOTIFY")
        if notify is None:
            return event in ("FAILURE", "DELAY")
        return event in notify.upper().split(",")


@dataclass(frozen=True)
class Envelope:
    queue_id: str
    sender: str  # "" for the null reverse-path
    recipients: tuple[EnvelopeRecipient, ...]
    arrived: float  # Unix time
    client_ip: str = ""
    client_port: int = 0
    helo: str = ""
    tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when received under TLS
    auth_user: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)  # BODY, SMTPUTF8, RET, ENVID
    smtputf8: bool = False

    @property
    def return_full(self) -> bool:
        """RET=FULL: a failure DSN returns the whole message, not only its header."""
        return (self.params.get("RET") or "").upper() == "FULL"

    def to_json(self) -> bytes:
        # What asdict() gives, built directly: asdict deep-copies every value
        # and costs more than the rest of the encoding (one envelope per message).
        data = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}
        data["recipients"] = [{name: getattr(r, name) for name in _RECIPIENT_FIELDS}
                              for r in self.recipients]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data = json.loads(raw)
        data["recipients"] = tuple(EnvelopeRecipient(**r) for r in data["recipients"])
        return cls(**data)


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
_RECIPIENT_FIELDS = tuple(f.name for f in fields(EnvelopeRecipient))
