"""A listening port as a service that fails start-up cleanly."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.listener")


class ListenError(Exception):
    """A listener's address cannot be bound."""


class BindingService(service.Service):
    """Binds in privilegedStartService (before twistd drops privileges).

    A port that cannot be bound stops start-up with one line naming the
    listener, not a traceback: the operator has a config or port problem.
    Subclasses provide ``bind`` (raising ListenError) and ``port`` (None
    until bound).
    """

    port: Any = None

    def bind(self) -> None:
        raise NotImplementedError

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:  # bound already (a listener added by reload)
            return
        try:
            self.bind()
        except ListenError as e:
            print(f"relaygw: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self.bind()


class ListenerService(BindingService):
    """A Twisted listening port for the sessions of one listener."""

    def __init__(self, endpoint: Any, factory: Any, address: str, *,
                 sessions: Any = None, grace: float = 30.0) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.address = address
        self.sessions = sessions  # the SMTP factory (inside any TLS wrapper): drains sessions
        self.grace = grace
        self.port: Any = None

    def bind(self) -> None:
        """Listen now; ListenError names the address and the reason."""
        results: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(results.append)
        result = results[0] if results else None
        if result is None or hasattr(result, "getErrorMessage"):
            reason = result.getErrorMessage() if result is not None else "no answer"
            raise ListenError(f"cannot listen on {self.address}: {reason}")
        self.port = result

    def stopService(self) -> Deferred | None:
        """Stop accepting, then let sessions finish their transactions (grace period)."""
        super().stopService()
        d = succeed(None)
        if self.port is not None:
            port, self.port = self.port, None
            d = maybeDeferred(port.stopListening)
        if self.sessions is not None:
            d.addCallback(lambda _: self.sessions.drain(self.grace))
        return d
