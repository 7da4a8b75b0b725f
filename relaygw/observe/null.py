"""The metrics interface with nothing behind it.

Its own module so that processes which only report metrics (the SMTP workers) do
not import prometheus_client and twisted.web, which ``relaygw.observe.metrics`` needs.
"""

from __future__ import annotations


class NullMetrics:
    """Accepts every call and records nothing: the default for components built without metrics."""

    def connection_opened(self, listener: str, tls: bool) -> None:
        pass

    def connection_closed(self, listener: str) -> None:
        pass

    def connection_refused(self, reason: str) -> None:
        pass

    def message_accepted(self, size: int) -> None:
        pass

    def message_rejected(self, stage: str, code: int, enhanced: str | None) -> None:
        pass

    def delivery(self, route: str, status: str, enhanced: str | None, seconds: float) -> None:
        pass

    def tls_inbound(self, version: str | None) -> None:
        pass

    def tls_outbound(self, version: str | None) -> None:
        pass


NO_METRICS = NullMetrics()
