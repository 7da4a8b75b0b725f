"""What every courier reports, per recipient: delivered, transient or permanent.

The queue decides retry or bounce from this value alone.
"""

from __future__ import annotations

from dataclasses import dataclass

DELIVERED = "delivered"
TRANSIENT = "transient"
PERMANENT = "permanent"

# Where a delivered message went, for RFC 3461 success notices (NOTIFY=SUCCESS):
FINAL = "final"  # into the recipient's mailbox: the sender may get a "delivered" DSN
RELAYED = "relayed"  # to a next hop without DSN: the sender may get a "relayed" DSN
PASSED_ON = "passed-on"  # to a next hop that took the DSN parameters: it reports from now on
HANDOFFS = (FINAL, RELAYED, PASSED_ON)


@dataclass(frozen=True)
class DeliveryResult:
    status: str  # DELIVERED | TRANSIENT | PERMANENT
    enhanced: str  # RFC 3463 code, e.g. "2.0.0", "4.4.1", "5.1.1"
    text: str  # the peer's reply text, or our own diagnostic
    code: int | None = None  # the peer's SMTP reply code; None for local or synthetic results
    remote: str | None = None  # "mx.example.net[192.0.2.1]:25" when a peer answered
    tls: str | None = None  # "TLSv1.3" when the hop was encrypted
    handoff: str = FINAL  # DELIVERED only: FINAL, RELAYED or PASSED_ON

    def __post_init__(self) -> None:
        if self.status not in (DELIVERED, TRANSIENT, PERMANENT):
            raise ValueError(f"unknown delivery status {self.status!r}")
        if self.handoff not in HANDOFFS:
            raise ValueError(f"unknown handoff {self.handoff!r}")

    @property
    def diagnostic(self) -> str:
        """The reply as a log line or DSN Diagnostic-Code shows it."""
        if self.code is not None:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.enhanced} {self.text}"


def delivered(text: str = "OK", *, enhanced: str = "2.0.0", code: int | None = None,
              remote: str | None = None, tls: str | None = None,
              handoff: str = FINAL) -> DeliveryResult:
    return DeliveryResult(DELIVERED, enhanced, text, code, remote, tls, handoff)


def transient(enhanced: str, text: str, *, code: int | None = None, remote: str | None = None,
              tls: str | None = None) -> DeliveryResult:
    return DeliveryResult(TRANSIENT, enhanced, text, code, remote, tls)


def permanent(enhanced: str, text: str, *, code: int | None = None, remote: str | None = None,
              tls: str | None = None) -> DeliveryResult:
    return DeliveryResult(PERMANENT, enhanced, text, code, remote, tls)
