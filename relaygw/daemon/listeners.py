"""Listening ports as services that bind before privileges drop and fail start-up
with one line: the SMTP listeners of one-process mode, and /metrics."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTCP
from twisted.logger import Logger

# The namespaces log lines have always carried: operators grep for them.
log = Logger(namespace="relaygw.listener")
metrics_log = Logger(namespace="relaygw.metrics")


class ListenError(Exception):
    """A listener's address cannot be bound."""


class BindingService(service.Service):
    """Binds in privilegedStartService (before twistd drops privileges).

    A port that cannot be bound raises ListenError, naming the listener:
    the twistd plugin (``relaygw.daemon.tap``) turns it into one line on stderr
    and in the log, and exit status 1, not a traceback. Subclasses provide
    ``bind`` (raising ListenError) and ``port`` (None until bound).
    """

    port: Any = None

    def bind(self) -> None:
        raise NotImplementedError

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is not None:  # bound already (a listener added by reload)
            return
        self.bind()

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
            error = getattr(result, "value", None)
            if isinstance(error, CannotListenError) and isinstance(error.socketError, OSError):
                reason = error.socketError.strerror or reason  # as in worker mode
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


class MetricsService(BindingService):
    """Serves /metrics and /healthz (``site``) over HTTP on host:port (port 0: any free
    port, see ``port``); bound before privileges drop, like the SMTP listeners."""

    name = "metrics"

    def __init__(self, reactor: IReactorTCP, host: str, port: int,
                 site: IProtocolFactory) -> None:
        self.reactor = reactor
        self.host = host
        self.requested_port = port
        self.site = site
        self.listening: IListeningPort | None = None

    @property
    def port(self) -> int | None:  # a number here; the SMTP listeners hold the port object
        """The bound port number while listening."""
        if self.listening is None:
            return None
        address = self.listening.getHost()
        assert isinstance(address, IPv4Address | IPv6Address)  # listenTCP's port is TCP
        return address.port

    def _address(self, port: int | None) -> str:
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    def bind(self) -> None:
        """Listen now (once); ListenError names the key, the address and the reason."""
        if self.listening is not None:
            return
        try:
            # listenTCP is annotated for factories of the default protocol type only.
            self.listening = self.reactor.listenTCP(self.requested_port,
                                                    self.site,  # type: ignore[arg-type]
                                                    interface=self.host)
        except CannotListenError as e:
            raise ListenError(f"cannot listen on metrics.address "
                              f"{self._address(self.requested_port)}: "
                              f"{e.socketError}") from None
        metrics_log.info("metrics: serving /metrics and /healthz on {address}",
                         address=self._address(self.port))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.listening is None:
            return None
        listening, self.listening = self.listening, None
        # No public maybeDeferred overload takes a function returning "Deferred or None".
        return maybeDeferred(listening.stopListening)  # type: ignore[call-overload]
