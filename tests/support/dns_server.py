"""A real DNS server on loopback, for tests of anything that resolves MX or address records.

:class:`LoopbackDNSServer` is a ``twisted.names`` authority served over UDP and TCP on one
port of 127.0.0.1. Names hold MX, A, AAAA and TXT records; a name with no records does not
exist (NXDOMAIN), and a name with records answers an empty NOERROR for other types
(dnspython's ``NoAnswer``). Two kinds of fault can be set per name: SERVFAIL, and no answer
at all. Every query received is recorded in ``queries``.

Negative answers (NXDOMAIN, empty NOERROR) carry a root SOA whose minimum is the
server's ``ttl``, so resolvers cache them no longer than positive ones.

Zones are given in one shape, as a mapping or as a JSON file (every key optional)::

    {"mx": [["example.org", 10, "mx1.example.org"]], "a": [["mx1.example.org", "127.0.0.1"]],
     "aaaa": [], "txt": [["notmx.example", "v=spf1 -all"]], "null_mx": ["nomail.example"],
     "servfail": ["broken.example", ["half.example", "AAAA"]], "timeout": ["slow.example"]}

A fault entry is a name (every query type) or a [name, type] pair (that type only).

For end-to-end tests of the daemon, run it as its own process::

    python -m tests.support.dns_server --port-file PATH --zone-file ZONE.json [--port N]

It writes the port it listens on to PATH (atomically, once listening) and serves until it is
killed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.names import common, dns, server
from twisted.names.error import AuthoritativeDomainError

__all__ = ["LoopbackDNSServer", "ZONE_KEYS", "main"]

ZONE_KEYS = ("mx", "a", "aaaa", "txt", "null_mx", "servfail", "timeout")


class _ServFailError(Exception):
    """Raised by the authority to have the factory answer SERVFAIL, without logging it."""


class _Authority(common.ResolverBase):
    """Answers from the owning server's records; records every query it is asked."""

    def __init__(self, owner: LoopbackDNSServer) -> None:
        super().__init__()
        self._owner = owner

    def query(self, query: dns.Query, timeout: Any = None) -> Deferred:
        name = _normalize(query.name.name.decode("ascii", "replace"))
        self._owner.queries.append((name, dns.QUERY_TYPES.get(query.type, str(query.type))))
        return super().query(query, timeout)

    def _lookup(self, name: bytes, cls: int, rdtype: int, timeout: Any) -> Deferred:
        owner = self._owner
        key = _normalize(name.decode("ascii", "replace"))
        if {(key, None), (key, rdtype)} & owner._servfail:
            return fail(_ServFailError(key))
        if {(key, None), (key, rdtype)} & owner._timeout:
            never: Deferred = Deferred()
            owner._unanswered.append(never)  # dropped, unfired, by stop()
            return never
        records = owner._records.get(key)
        if records is None:
            return fail(AuthoritativeDomainError(key))
        answers = [
            dns.RRHeader(key, record.TYPE, dns.IN, owner.ttl, record, auth=True)
            for record in records
            if rdtype in (record.TYPE, dns.ALL_RECORDS) and cls in (dns.IN, dns.ANY)
        ]
        return succeed((answers, [] if answers else [owner._soa()], []))


class _Factory(server.DNSServerFactory):
    noisy = False

    def __init__(self, owner: LoopbackDNSServer) -> None:
        super().__init__(authorities=[_Authority(owner)])
        self._owner = owner
        self._drained: list[Deferred] = []

    def gotResolverError(self, failure: Any, protocol: Any, message: Any,
                         address: Any) -> None:
        if failure.check(_ServFailError):  # deliberate: answer SERVFAIL without log.err
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        if failure.check(AuthoritativeDomainError):  # NXDOMAIN, with the SOA for its TTL
            response = self._responseFromMessage(message=message, rCode=dns.ENAME,
                                                 authority=[self._owner._soa()])
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)

    def connectionLost(self, protocol: Any) -> None:
        super().connectionLost(protocol)
        if not self.connections:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def close_connections(self) -> Deferred:
        if not self.connections:
            return succeed(None)
        d: Deferred = Deferred()
        self._drained.append(d)
        for protocol in list(self.connections):
            protocol.transport.abortConnection()
        return d


class LoopbackDNSServer:
    """twisted.names authority served over UDP (and TCP, for truncated answers) on 127.0.0.1.

    ``zones`` takes the shape described in the module docstring (see :meth:`load`);
    ``ttl`` is given to every record: 0 by default, so resolver caches never hide a change
    a test makes between two lookups.
    """

    def __init__(self, reactor: Any, zones: Mapping[str, Sequence[Any]] | None = None,
                 interface: str = "127.0.0.1", ttl: int = 0) -> None:
        self._reactor = reactor
        self.interface = interface
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []  # (name, type) as received, e.g. ("x.org", "MX")
        self._records: dict[str, list[Any]] = {}
        self._servfail: set[tuple[str, int | None]] = set()  # (name, type or None for all)
        self._timeout: set[tuple[str, int | None]] = set()
        self._unanswered: list[Deferred] = []
        self._factory = _Factory(self)
        self._ports: list[Any] = []
        self.port: int | None = None
        if zones:
            self.load(zones)

    # -- records -----------------------------------------------------------------------------

    def load(self, zone: Mapping[str, Sequence[Any]]) -> None:
        """Add every record of a zone mapping (the JSON zone-file shape)."""
        unknown = set(zone) - set(ZONE_KEYS)
        if unknown:
            raise ValueError(f"unknown zone keys: {', '.join(sorted(unknown))}")
        for domain, preference, host in zone.get("mx", ()):
            self.add_mx(domain, preference, host)
        for name, ip in zone.get("a", ()):
            self.add_a(name, ip)
        for name, ip in zone.get("aaaa", ()):
            self.add_aaaa(name, ip)
        for name, text in zone.get("txt", ()):
            self.add_txt(name, text)
        for domain in zone.get("null_mx", ()):
            self.add_null_mx(domain)
        for entry in zone.get("servfail", ()):
            self.set_servfail(*([entry] if isinstance(entry, str) else entry))
        for entry in zone.get("timeout", ()):
            self.set_timeout(*([entry] if isinstance(entry, str) else entry))

    def add_mx(self, domain: str, preference: int, host: str) -> None:
        self._add(domain, dns.Record_MX(int(preference), _normalize(host).encode("idna")))

    def add_null_mx(self, domain: str) -> None:
        """RFC 7505: the single MX "0 ." of a domain that accepts no mail."""
        self._add(domain, dns.Record_MX(0, b""))

    def add_a(self, name: str, ip: str) -> None:
        self._add(name, dns.Record_A(str(ipaddress.IPv4Address(ip))))

    def add_aaaa(self, name: str, ip: str) -> None:
        self._add(name, dns.Record_AAAA(str(ipaddress.IPv6Address(ip))))

    def add_txt(self, name: str, text: str) -> None:
        """Any record makes a name exist; TXT is the one that means nothing to mail routing."""
        self._add(name, dns.Record_TXT(text.encode("utf-8")))

    def set_servfail(self, name: str, rtype: str | None = None) -> None:
        """Answer SERVFAIL to every query for ``name``, or only to ``rtype`` ("A", "MX")."""
        self._servfail.add(_fault(name, rtype))

    def set_timeout(self, name: str, rtype: str | None = None) -> None:
        """Never answer a query for ``name``, or only one of type ``rtype``."""
        self._timeout.add(_fault(name, rtype))

    def _soa(self) -> dns.RRHeader:
        """The SOA sent with negative answers: resolvers cache those for ``ttl`` seconds
        (without one, dnspython would cache them for 300).

        It is owned by the root, an ancestor of every name, since names here have no zones.
        """
        soa = dns.Record_SOA(mname=b"ns.loopback.test", rname=b"hostmaster.loopback.test",
                             serial=1, refresh=3600, retry=600, expire=86400,
                             minimum=self.ttl, ttl=self.ttl)
        return dns.RRHeader(b"", dns.SOA, dns.IN, self.ttl, soa, auth=True)

    def _add(self, name: str, record: Any) -> None:
        self._records.setdefault(_normalize(name), []).append(record)

    # -- serving -----------------------------------------------------------------------------

    def start(self, port: int = 0) -> tuple[str, int]:
        """Listen on UDP and TCP, one port number for both; return (interface, port)."""
        if self._ports:
            raise RuntimeError("already started")
        attempts = 1 if port else 20  # port 0: retry if TCP finds the UDP port taken
        for attempt in range(attempts):
            proto = dns.DNSDatagramProtocol(self._factory)
            proto.noisy = False
            udp = self._reactor.listenUDP(port, proto, interface=self.interface)
            chosen = udp.getHost().port
            try:
                tcp = self._reactor.listenTCP(chosen, self._factory, interface=self.interface)
            except Exception:
                udp.stopListening()
                if attempt == attempts - 1:
                    raise
                continue
            self._ports = [udp, tcp]
            self.port = chosen
            return self.interface, chosen
        raise AssertionError("unreachable")

    @property
    def address(self) -> tuple[str, int]:
        if self.port is None:
            raise RuntimeError("not started")
        return self.interface, self.port

    def stop(self) -> Deferred:
        """Stop listening, drop TCP connections and forget unanswered queries."""
        ports, self._ports = self._ports, []
        stopped = [maybeDeferred(p.stopListening) for p in ports]
        stopped.append(self._factory.close_connections())
        self._unanswered.clear()  # never fired: nothing is sent after the ports close
        self.port = None
        d = DeferredList(stopped, fireOnOneErrback=True, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d


def _normalize(name: str) -> str:
    return name.rstrip(".").lower()


def _fault(name: str, rtype: str | None) -> tuple[str, int | None]:
    if rtype is None:
        return _normalize(name), None
    if rtype.upper() not in dns.REV_TYPES:
        raise ValueError(f"unknown record type {rtype!r}")
    return _normalize(name), dns.REV_TYPES[rtype.upper()]


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.dns_server",
        description="Serve a JSON zone on 127.0.0.1 over UDP and TCP until killed (tests only).")
    parser.add_argument("--port-file", required=True,
                        help="where to write the port number once listening")
    parser.add_argument("--zone-file", required=True, help="JSON zone (see module docstring)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any)")
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    with open(args.zone_file, encoding="utf-8") as f:
        zone = json.load(f)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    dns_server = LoopbackDNSServer(reactor, zone, interface=args.interface)
    status = [0]

    def start() -> None:
        try:
            _, port = dns_server.start(args.port)
            _write_atomically(args.port_file, f"{port}\n")
        except Exception as e:
            print(f"testing_dns: cannot start: {e}", file=sys.stderr)
            status[0] = 1
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", dns_server.stop)
    reactor.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
