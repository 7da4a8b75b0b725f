"""A listening port as a service that fails start-up cleanly."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()


class ListenerService(service.Service):
    """Bind in privilegedStartService (before twistd drops privileges).

    A port that cannot be bound stops start-up with one line naming the
    listener, not a traceback: the operator has a config or port problem.
    """

    def __init__(self, endpoint: Any, factory: Any, address: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.address = address
        self.port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._bind()

    def _bind(self) -> None:
        results: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(results.append)
        result = results[0] if results else None
        if result is None or hasattr(result, "getErrorMessage"):
            reason = result.getErrorMessage() if result is not None else "no answer"
            print(f"relaygw: cannot listen on {self.address}: {reason}", file=sys.stderr)
            raise SystemExit(1)
        self.port = result

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
