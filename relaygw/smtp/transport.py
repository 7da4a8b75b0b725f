"""What both SMTP directions need of Twisted: the clock and the transport they use
(as types), and the socket setting both want.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, cast

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProducer,
    ITransport,
)
from twisted.internet.ssl import CertificateOptions

__all__ = ["Clock", "StreamTransport", "TLSOptions", "set_no_delay", "stream_transport"]

# What startTLS takes: a connection creator, or CertificateOptions, which serves as one
# without declaring the interfaces (see the note on IOpenSSLServerConnectionCreator).
TLSOptions: TypeAlias = (
    "IOpenSSLClientConnectionCreator | IOpenSSLServerConnectionCreator | CertificateOptions"
)


class Clock(Protocol):
    """The part of ``IReactorTime`` sessions use: the reactor, or ``task.Clock`` in tests."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object,
                  **kwargs: object) -> IDelayedCall: ...


class StreamTransport(Protocol):
    """What the SMTP protocols use of their transport.

    The transport is a TCP connection (``tcp.Connection``: ``ITLSTransport``, a consumer
    and a push producer) or, with implicit TLS, the TLS layer over one
    (``TLSMemoryBIOProtocol``, which hands what it lacks to the connection below).
    ``ITransport``, the type of ``Protocol.transport``, declares only part of this.
    """

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def startTLS(self, contextFactory: TLSOptions) -> None: ...  # noqa: N803 - Twisted's name

    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


def stream_transport(transport: ITransport | None) -> StreamTransport:
    """A connected protocol's ``transport`` as the ``StreamTransport`` it is.

    Only for use from ``connectionMade`` on: the protocols run over stream transports
    alone (see ``StreamTransport``), and Twisted sets ``transport`` before calling it.
    """
    assert transport is not None, "not connected yet"
    return cast(StreamTransport, transport)


def set_no_delay(transport: object) -> None:
    """SMTP is request and response in small writes: Nagle's algorithm with delayed
    ACKs would add ~40 ms to every exchange (measured: delivery 210 -> 390 msg/s)."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass
