"""Sender/login binding: may this authenticated user send as this envelope sender? Pure, no I/O.

``[auth] senders`` binds a user to address patterns (the syntax of a route's ``senders``). A
user it does not list, and a client that has not authenticated, may use any sender, as before
the table existed. The null sender ``<>`` is allowed to every user: it claims no one's address
(Postfix's ``reject_sender_login_mismatch`` does not check it either), and refusing it would
refuse the bounces and receipts some clients send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relaygw.config import Pattern
from relaygw.smtp.replies import Reply

__all__ = ["SenderDecision", "sender_decision"]


@dataclass(frozen=True)
class SenderDecision:
    allowed: bool
    reason: str  # not_authenticated | unbound | null_sender | pattern | mismatch
    pattern: str | None = None  # the pattern that allowed it
    reply: Reply | None = None  # None when allowed


_NOT_AUTHENTICATED = SenderDecision(True, "not_authenticated")
_UNBOUND = SenderDecision(True, "unbound")
_NULL_SENDER = SenderDecision(True, "null_sender")


def sender_decision(user: str | None, sender: str,
                    allowed: Sequence[Pattern] | None) -> SenderDecision:
    """Decide whether ``user`` (None: not authenticated) may use ``sender`` ("" is ``<>``).

    ``allowed`` is what ``[auth] senders`` lists for the user (``AuthConfig.allowed_senders``),
    None when it lists nothing. Patterns match the whole address, case-insensitively.
    """
    if user is None:
        return _NOT_AUTHENTICATED
    if allowed is None:
        return _UNBOUND
    if sender == "":
        return _NULL_SENDER
    for pattern in allowed:
        if pattern.matches(sender):
            return SenderDecision(True, "pattern", pattern.text)
    return SenderDecision(False, "mismatch", None, Reply(
        553, "5.7.1", f"Sender address <{sender}> not allowed for user {user}"))
