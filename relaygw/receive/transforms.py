"""Message transforms: what the receive stage does to a message's bytes before the 250.

Each transform is applied to every accepted message, in a fixed order, as the bytes
stream into the spool, so what is stored (and later sent, and signed) is the
transformed message. A transform starts one ``TransformStream`` per message:

- ``head()``: bytes that go before the message (trace and signature headers);
- ``feed(data)``: message bytes in, transformed bytes out (may hold some back);
- ``end()``: whatever it held back, at the end of the data.

A later transform sees the output of the earlier ones, their heads included.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Protocol

from relaygw.envelope import Envelope
from relaygw.smtp.server import Session


class TransformStream(Protocol):
    def head(self) -> bytes: ...

    def feed(self, data: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class MessageTransform(Protocol):
    def start(self, envelope: Envelope, session: Session) -> TransformStream: ...


class Pipeline:
    """The transforms of one message, chained: each one's output is the next one's input."""

    def __init__(self, streams: Sequence[TransformStream]) -> None:
        self._streams = tuple(streams)

    def head(self) -> bytes:
        # The last transform's head comes first: it is outside everything before it.
        return b"".join(self._through(i + 1, self._streams[i].head())
                        for i in reversed(range(len(self._streams))))

    def feed(self, data: bytes) -> bytes:
        return self._through(0, data)

    def end(self) -> bytes:
        return b"".join(self._through(i + 1, stream.end())
                        for i, stream in enumerate(self._streams))

    def _through(self, first: int, data: bytes) -> bytes:
        for stream in self._streams[first:]:
            if not data:
                break
            data = stream.feed(data)
        return data


class ReceivedHeader:
    """Prepends the ``Received:`` trace header (RFC 5321 4.4), built only from
    validated values, never from raw client input."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def start(self, envelope: Envelope, session: Session) -> TransformStream:
        return _Prepend(received_header(self.hostname, session, envelope))


class _Prepend:
    def __init__(self, header: bytes) -> None:
        self._header = header

    def head(self) -> bytes:
        return self._header

    def feed(self, data: bytes) -> bytes:
        return data

    def end(self) -> bytes:
        return b""


def received_header(hostname: str, session: Session, envelope: Envelope) -> bytes:
    proto = "UTF8SMTP" if envelope.smtputf8 else ("ESMTP" if session.esmtp else "SMTP")
    if session.tls:
        proto += "S"
    if session.auth_user:
        proto += "A"
    lines = [f"Received: from {session.helo} ({address_literal(session.client_ip)})"]
    if session.tls_info:
        version, _, cipher = session.tls_info.partition(" ")
        lines.append(f"\t(using {version} with cipher {cipher})")
    lines.append(f"\tby {hostname} (relaygw) with {proto} id {envelope.queue_id}")
    stamp = format_datetime(datetime.fromtimestamp(envelope.arrived, UTC))
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{envelope.recipients[0].address}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{stamp}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def address_literal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The client's address as RFC 5321 4.1.3 writes a literal: ``[192.0.2.7]``,
    ``[IPv6:2001:db8::7]``. An IPv4-mapped address (a dual-stack listener's IPv4 client)
    is the IPv4 host it maps; a scope (``%eth0``) has no place in the grammar."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"[{ip.ipv4_mapped}]"
        return f"[IPv6:{ip.compressed.partition('%')[0]}]"
    return f"[{ip}]"
