"""MX and address lookups: dnspython, run in a dedicated ThreadPool, answered as Deferreds.

``dns.resolver`` blocks, so every query runs in the ThreadPool handed to :class:`Resolver`
(never the reactor thread, never the reactor's own pool). A blocked thread cannot be
cancelled, so each call is bounded by ``timeout`` (dnspython's ``lifetime``), counted from
when a pool thread takes the work: the queries of ``mx_hosts`` share that budget, and the A
and AAAA queries of ``host_addresses`` run in parallel, each within it.

Outcomes follow RFC 5321 5.1 and RFC 7505 (see docs: smtp.md 1 and 2.10):

- MX records: hosts by preference, random order among equal preferences.
- No MX records: the domain itself is an implicit MX, if it has an A or AAAA record.
- Null MX (``0 .``): permanent ``5.1.10``; never a fall-back to A/AAAA.
- NXDOMAIN, or no MX and no address: permanent ``5.1.2``.
- Timeouts, SERVFAIL/REFUSED from every server, anything else: transient ``4.4.3``.
  A temporary DNS error never becomes a permanent result.

Failures are :class:`DNSFailure` exceptions carrying a :class:`DeliveryResult`.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.threads import deferToThreadPool

from relaygw.results import DeliveryResult, permanent, transient

__all__ = ["DNSFailure", "MXAnswer", "MXHost", "Resolver", "order_mx"]


@dataclass(frozen=True)
class MXHost:
    preference: int
    host: str  # lowercased, no trailing dot; or an address literal such as "[192.0.2.1]"


@dataclass(frozen=True)
class MXAnswer:
    hosts: tuple[MXHost, ...]
    implicit: bool  # True: no MX records, the domain's own A/AAAA is used (RFC 5321 5.1)


class DNSFailure(Exception):  # noqa: N818 - the agreed name
    """A lookup that gave no usable answer; ``result`` is transient or permanent."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.diagnostic)
        self.result = result


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> tuple[MXHost, ...]:
    """Sort by preference, shuffle each group of equal preference (RFC 5321 5.1).

    A host listed twice keeps only its lowest preference.
    """
    best: dict[str, int] = {}
    for preference, host in records:
        if host not in best or preference < best[host]:
            best[host] = preference
    groups: dict[int, list[str]] = {}
    for host, preference in best.items():
        groups.setdefault(preference, []).append(host)
    hosts: list[MXHost] = []
    for preference in sorted(groups):
        group = sorted(groups[preference])  # a fixed start, so a seeded rng gives one order
        rng.shuffle(group)
        hosts.extend(MXHost(preference, host) for host in group)
    return tuple(hosts)


class DNSResolver(Protocol):
    """What delivery asks of DNS (``Resolver``; a fake in tests)."""

    def mx_hosts(self, domain: str) -> Deferred[MXAnswer]: ...

    def host_addresses(self, host: str) -> Deferred[list[str]]: ...


class Resolver:
    """MX and address lookups over dnspython in ``threadpool``.

    ``nameservers``: ``(ip, port)`` pairs (or objects with ``host`` and ``port``, such as
    ``relaygw.config.HostPort``); empty means the system configuration (/etc/resolv.conf),
    read once here. ``timeout`` bounds each ``mx_hosts``/``host_addresses`` call as a whole.
    ``rng`` orders MX hosts of equal preference; seed it for reproducible tests.
    """

    def __init__(self, reactor: Any, threadpool: Any, nameservers: Sequence[Any] = (),
                 timeout: float = 5.0, rng: random.Random | None = None) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._reactor = reactor
        self._threadpool = threadpool
        self.timeout = float(timeout)
        self._rng = rng if rng is not None else random.Random()
        self._resolver = _build_resolver(nameservers, self.timeout)

    def mx_hosts(self, domain: str) -> Deferred[MXAnswer]:
        """The hosts to deliver mail for ``domain`` to, or a :class:`DNSFailure`."""
        try:
            literal = _address_literal(domain)
            if literal is not None:
                return succeed(MXAnswer((MXHost(0, literal[0]),), implicit=True))
            name, label = _domain_name(domain, "Domain")
        except DNSFailure as e:
            return fail(e)
        d = deferToThreadPool(self._reactor, self._threadpool, self._lookup_mx, name, label)
        return d.addCallback(self._mx_answer, name)  # shuffled here, on the reactor thread

    def host_addresses(self, host: str) -> Deferred[list[str]]:
        """The IP addresses of ``host``: IPv4 first, then IPv6, in DNS order within each.

        IPv4 first rather than the happy-eyeballs AAAA-then-A: the test and development
        machines reach loopback peers over IPv4 only. An IP or address literal is returned
        as it is (canonical form), without a query. No address: a permanent ``5.1.2``
        failure, which a caller walking an MX list treats as "try the next host".
        """
        try:
            literal = _address_literal(host, bare=True)
            if literal is not None:
                return succeed([literal[1]])
            name, label = _domain_name(host, "Host")
        except DNSFailure as e:
            return fail(e)
        queries = [  # in parallel: each bounded by timeout, so the pair is too
            deferToThreadPool(self._reactor, self._threadpool, self._lookup_addresses,
                              name, rdtype)
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        ]
        d = DeferredList(queries, consumeErrors=True)
        return d.addCallback(_combine_addresses, label, self.timeout)

    # -- in the thread pool ------------------------------------------------------------------

    def _resolve(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                 deadline: float) -> dns.resolver.Answer:
        return self._resolver.resolve(name, rdtype, search=False,
                                      lifetime=deadline - time.monotonic())

    def _lookup_mx(self, name: dns.name.Name, label: str) -> list[tuple[int, str]] | None:
        """MX records as (preference, host); None for an implicit MX."""
        deadline = time.monotonic() + self.timeout
        try:
            try:
                answer = self._resolve(name, dns.rdatatype.MX, deadline)
            except dns.resolver.NoAnswer:
                for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    try:
                        self._resolve(name, rdtype, deadline)
                    except dns.resolver.NoAnswer:
                        continue
                    return None
                raise DNSFailure(permanent(
                    "5.1.2", f"Domain {label} has no MX or address records")) from None
        except dns.resolver.NXDOMAIN:
            raise DNSFailure(permanent("5.1.2", f"Domain {label} does not exist")) from None
        except (dns.exception.DNSException, OSError) as e:
            raise DNSFailure(transient(
                "4.4.3", f"DNS lookup of {label} failed: {_reason(e, self.timeout)}")) from e
        records = [(rdata.preference, rdata.exchange) for rdata in answer]
        targets = [(pref, exchange) for pref, exchange in records if exchange != dns.name.root]
        if not targets:
            # RFC 7505: "0 ." is the null MX. A root target at any preference cannot take
            # mail either, and falling back to A/AAAA would defeat the owner's intent.
            raise DNSFailure(permanent(
                "5.1.10", f"Domain {label} does not accept mail (null MX)"))
        # A null MX beside real ones is a misconfiguration (RFC 7505 3): use the real ones.
        return [(pref, _host_text(exchange)) for pref, exchange in targets]

    def _lookup_addresses(self, name: dns.name.Name,
                          rdtype: dns.rdatatype.RdataType) -> list[str]:
        """Addresses of one family; [] for none; NXDOMAIN and DNSException pass through."""
        try:
            answer = self._resolve(name, rdtype, time.monotonic() + self.timeout)
        except dns.resolver.NoAnswer:
            return []
        return [rdata.address for rdata in answer]

    # -- on the reactor thread ---------------------------------------------------------------

    def _mx_answer(self, records: list[tuple[int, str]] | None,
                   name: dns.name.Name) -> MXAnswer:
        if records is None:
            return MXAnswer((MXHost(0, _host_text(name)),), implicit=True)
        return MXAnswer(order_mx(records, self._rng), implicit=False)


def _build_resolver(nameservers: Sequence[Any], timeout: float) -> dns.resolver.Resolver:
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for server in nameservers:
            host, port = (server.host, server.port) if hasattr(server, "host") else server
            ipaddress.ip_address(host)  # ValueError: a nameserver must be an IP address
            # Do53Nameserver objects carry their own port; the classic API shares one.
            servers.append(dns.nameserver.Do53Nameserver(host, int(port)))
        resolver.nameservers = servers
    else:
        try:
            resolver = dns.resolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            # No nameservers known: every lookup fails with NoNameservers, which is
            # transient, so mail waits in the queue instead of the daemon refusing to start
            # (routes through smarthosts or local delivery need no DNS at all).
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = []
    resolver.lifetime = timeout
    resolver.cache = dns.resolver.LRUCache()  # lock-protected: safe across pool threads
    return resolver


def _domain_name(text: str, kind: str) -> tuple[dns.name.Name, str]:
    """An absolute dnspython name and the label messages use; DNSFailure if malformed."""
    label = text.rstrip(".").lower()
    if not label:
        raise DNSFailure(permanent("5.1.2", f"{kind} name is empty"))
    try:
        name = dns.name.from_text(label, origin=dns.name.root)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        raise DNSFailure(permanent(
            "5.1.2", f"{kind} {label} is not a valid domain name")) from None
    return name, label


@functools.lru_cache(maxsize=1024)  # smarthosts are often IP literals: one parse each
def _address_literal(text: str, bare: bool = False) -> tuple[str, str] | None:
    """For "[192.0.2.1]", "[IPv6:2001:db8::1]" (and, with ``bare``, "192.0.2.1", "::1"):
    the canonical literal and the address; None for a domain name.

    A bracketed text that is no valid literal is a permanent 5.1.2 DNSFailure.
    """
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                address: ipaddress.IPv4Address | ipaddress.IPv6Address = (
                    ipaddress.IPv6Address(inner[5:]))
            elif bare and ":" in inner:  # "[2001:db8::1]", as in host[:port] notation
                address = ipaddress.IPv6Address(inner)
            else:
                address = ipaddress.IPv4Address(inner)
        except ValueError:
            raise DNSFailure(permanent(
                "5.1.2", f"Invalid address literal {text}")) from None
    elif bare:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return None
    else:
        return None
    if address.version == 6:
        return f"[IPv6:{address.compressed}]", address.compressed
    return f"[{address}]", str(address)


def _host_text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _combine_addresses(results: list[tuple[bool, Any]], label: str,
                       timeout: float) -> list[str]:
    """Merge the A and AAAA outcomes: any address wins; else transient beats permanent."""
    addresses: list[str] = []
    nxdomain = False
    temporary: BaseException | None = None
    for ok, value in results:
        if ok:
            addresses.extend(a for a in value if a not in addresses)
        elif value.check(dns.resolver.NXDOMAIN):
            nxdomain = True
        elif value.check(dns.exception.DNSException, OSError):
            temporary = value.value
        else:
            value.raiseException()  # a bug, not a DNS outcome
    if addresses:
        return addresses
    if temporary is not None:
        raise DNSFailure(transient(
            "4.4.3", f"DNS lookup of {label} failed: {_reason(temporary, timeout)}"))
    if nxdomain:
        raise DNSFailure(permanent("5.1.2", f"Host {label} does not exist"))
    raise DNSFailure(permanent("5.1.2", f"Host {label} has no address records"))


def _reason(e: BaseException, timeout: float) -> str:
    """A short, single-line cause for a transient diagnostic."""
    if isinstance(e, dns.exception.Timeout):
        return f"timed out after {timeout:g}s"
    if isinstance(e, dns.resolver.NoNameservers):
        causes: list[str] = []
        for error in e.kwargs.get("errors") or ():
            cause = error[3] if isinstance(error[3], str) else type(error[3]).__name__
            if cause not in causes:
                causes.append(cause)
        if not causes:
            return "no nameservers configured"
        return "all nameservers failed (" + ", ".join(causes) + ")"
    if isinstance(e, dns.resolver.YXDOMAIN):
        return "name too long after DNAME substitution"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]


# -- blocking lookups, for command-line tools ----------------------------------------------------


class _CallingThread:
    """Reactor and thread pool in one, for :func:`blocking_resolver`: both run work at once,
    in the calling thread, so a lookup's Deferred has fired by the time it is returned."""

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any,
                                 **kwargs: Any) -> None:
        from twisted.python.failure import Failure  # here: this section only adds to the module

        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


def blocking_resolver(nameservers: Sequence[Any] = (), timeout: float = 5.0,
                      rng: random.Random | None = None) -> Resolver:
    """A :class:`Resolver` whose lookups block the calling thread, for command-line tools.

    Same answers and the same :class:`DNSFailure` classification as the daemon's resolver
    (it is one); only the threading differs. The A and AAAA queries of ``host_addresses``
    run one after the other, each bounded by ``timeout``. Never use it in the daemon: it
    would block the reactor. Read answers with :func:`blocking_result`.
    """
    here = _CallingThread()
    return Resolver(here, here, nameservers, timeout, rng)


def blocking_result(d: Deferred[Any]) -> Any:
    """The result of a :func:`blocking_resolver` lookup; its failure (a DNSFailure) raised."""
    from twisted.python.failure import Failure

    out: list[Any] = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("the Deferred has not fired: not from a blocking_resolver")
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]
