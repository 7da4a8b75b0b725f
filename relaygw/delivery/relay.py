"""SMTP delivery to smarthosts and to recipients' MX hosts.

One job is one message's recipients for one next hop. Hosts are tried in
order (smarthost list, or MX preference); a connection failure or a refused
greeting moves to the next host, and a host that keeps failing is skipped
for a while (circuit breaker). Once a transaction has started, a failure is
not retried elsewhere at once: the queue retries later, so a message is never
sent twice in one attempt. Idle connections are kept briefly for reuse.

One async style: the dialogue is coroutines awaiting Deferreds, entered through
``Deferred.fromCoroutine`` in ``deliver``, as in the SMTP client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger

from relaygw.config import Config
from relaygw.delivery.courier import ContentReader, DeliveryJob
from relaygw.delivery.dns import DNSFailure, DNSResolver
from relaygw.observe import fields
from relaygw.results import DeliveryResult, permanent, transient
from relaygw.smtp.client import (
    ClientPolicy,
    ClientReactor,
    OutboundMessage,
    SessionFailure,
    SMTPClientProtocol,
    connect,
)
from relaygw.smtp.tls import trust_root_from_pem
from relaygw.smtp.transport import Clock, stream_transport

log = Logger()

IDLE_REUSE = 5.0  # seconds an idle outbound connection waits for another message
FAILURES_TO_OPEN = 3  # consecutive connection failures before a host is skipped
OPEN_FOR = 60.0  # seconds a failing host is skipped before one trial connection
MAX_TRACKED_HOSTS = 10_000  # MX hosts come and go: forget the oldest healthy-enough ones


class HostHealth:
    """A circuit breaker per host: closed (use), open (skip), half-open (one trial)."""

    def __init__(self, clock: Clock, failures_to_open: int = FAILURES_TO_OPEN,
                 open_for: float = OPEN_FOR) -> None:
        self.clock = clock
        self.failures_to_open = failures_to_open
        self.open_for = open_for
        self._failures: dict[str, int] = {}
        self._opened_at: dict[str, float] = {}

    def state(self, host: str) -> str:
        opened = self._opened_at.get(host)
        if opened is None:
            return "closed"
        return "half-open" if self.clock.seconds() - opened >= self.open_for else "open"

    def available(self, host: str) -> bool:
        return self.state(host) != "open"

    def failed(self, host: str, queue_id: str | None = None) -> None:
        """A connection to ``host`` failed (while delivering ``queue_id``, for the log)."""
        count = self._failures.pop(host, 0) + 1
        self._failures[host] = count  # re-inserted: dict order is least recently failed first
        if len(self._failures) > MAX_TRACKED_HOSTS:
            self._forget_one()
        if count >= self.failures_to_open:
            if self.state(host) != "open":
                log.warn("delivery: circuit open id={queue_id} host={host} failures={failures} "
                         "skip_seconds={skip_seconds}", queue_id=fields.text(queue_id),
                         host=host, failures=count, skip_seconds=round(self.open_for),
                         event="circuit_open")
            self._opened_at[host] = self.clock.seconds()

    def _forget_one(self) -> None:
        """Drop the least recently failed host that is not being skipped."""
        for old in self._failures:
            if self.state(old) != "open":
                self._failures.pop(old)
                self._opened_at.pop(old, None)
                return

    def succeeded(self, host: str) -> None:
        self._failures.pop(host, None)
        self._opened_at.pop(host, None)

    def states(self) -> dict[str, str]:
        return {host: self.state(host) for host in set(self._failures) | set(self._opened_at)}


@dataclass(frozen=True)
class DeliveryFiles:
    """What the configuration's delivery files hold, read before delivery starts (at
    start-up while privileged, and at each reload), so a missing or unreadable file is
    a start-up or reload error naming its key, not a 4.3.5 retried for days."""

    passwords: Mapping[Path, str] = field(default_factory=dict)  # password_file -> password
    trust_roots: Mapping[Path, Any] = field(default_factory=dict)  # ca_file -> trust root


@dataclass(frozen=True)
class _Target:
    host: str  # a name or an IP literal
    port: int
    policy: ClientPolicy


class ConnectionPool:
    """Idle, reusable connections by (ip, port, policy).

    Each connection keeps one idle timer while it is known here: taking the
    connection leaves the timer running (it does nothing while the connection
    is busy) and giving it back moves the timer later, which is far cheaper for
    the reactor than a new timer per message.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._idle: dict[tuple, list[SMTPClientProtocol]] = {}
        self._timers: dict[SMTPClientProtocol, Any] = {}

    def take(self, key: tuple) -> SMTPClientProtocol | None:
        entries = self._idle.get(key, [])
        while entries:
            proto = entries.pop()
            if proto.usable:
                return proto
            self._forget(proto)
        return None

    def give(self, key: tuple, proto: SMTPClientProtocol) -> None:
        if not proto.usable:
            self._forget(proto)
            return
        self._idle.setdefault(key, []).append(proto)
        timer = self._timers.get(proto)
        if timer is not None and timer.active():
            timer.reset(IDLE_REUSE)
        else:
            self._timers[proto] = self.clock.callLater(IDLE_REUSE, self._expire, key, proto)

    def _expire(self, key: tuple, proto: SMTPClientProtocol) -> None:
        self._timers.pop(proto, None)
        entries = self._idle.get(key, [])
        for i, p in enumerate(entries):
            if p is proto:
                del entries[i]
                proto.quit()
                return
        # Taken and not given back (yet): the taker decides what becomes of it.

    def _forget(self, proto: SMTPClientProtocol) -> None:
        timer = self._timers.pop(proto, None)
        if timer is not None and timer.active():
            timer.cancel()

    def close_all(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for entries in self._idle.values():
            for proto in entries:
                proto.quit()
        self._idle.clear()


class RelayCourier:
    """The courier of the ``smarthost`` and ``mx`` actions."""

    def __init__(self, reactor: ClientReactor, resolver: DNSResolver,
                 config_source: Callable[[], Config], run: Callable[..., Deferred[Any]],
                 files: DeliveryFiles | None = None) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.config_source = config_source
        self.run = run
        self.health = HostHealth(reactor)
        self.pool = ConnectionPool(reactor)
        self._total: DeferredSemaphore | None = None
        self._per_destination: dict[str, DeferredSemaphore] = {}
        files = files or DeliveryFiles()
        self._secrets: dict[Path, str] = dict(files.passwords)
        self._trust: dict[Path, Any] = dict(files.trust_roots)
        # Smarthost targets by name, for the Config object they were built from.
        self._targets: dict[str, tuple[Config, list[_Target]]] = {}
        self._active: set[SMTPClientProtocol] = set()

    def reconfigured(self, resolver: DNSResolver, files: DeliveryFiles | None = None) -> None:
        """A reload: new DNS settings, and the credentials and CA files read again."""
        files = files or DeliveryFiles()
        self.resolver = resolver
        self._secrets = dict(files.passwords)
        self._trust = dict(files.trust_roots)
        self._targets.clear()

    def abort_all(self) -> None:
        """Shutdown grace is over: drop every connection (the outcome is transient)."""
        self.pool.close_all()
        for proto in list(self._active):
            if proto.transport is not None:
                stream_transport(proto.transport).abortConnection()

    # -- limits -----------------------------------------------------------------

    def _limits(self, destination: str) -> tuple[DeferredSemaphore, DeferredSemaphore]:
        delivery = self.config_source().delivery
        if self._total is None or self._total.limit != delivery.max_connections:
            self._total = DeferredSemaphore(delivery.max_connections)
        sem = self._per_destination.get(destination)
        if sem is None or sem.limit != delivery.max_connections_per_destination:
            sem = self._per_destination[destination] = DeferredSemaphore(
                delivery.max_connections_per_destination)
        return self._total, sem

    def deliver(self, job: DeliveryJob) -> Deferred[list[DeliveryResult]]:
        destination = job.decisions[0].nexthop
        total, per_destination = self._limits(destination)

        def attempt() -> Deferred[list[DeliveryResult]]:
            return Deferred.fromCoroutine(self._deliver(job))

        # Wait for the destination first, so a busy destination holds no global token.
        return per_destination.run(total.run, attempt)

    # -- targets ----------------------------------------------------------------

    async def _trust_root(self, ca_file: Path | None) -> Any:
        """A CA bundle as a trust root: from ``files``, else read once, in the spool's
        threads."""
        if ca_file is None:
            return None
        if ca_file not in self._trust:
            self._trust[ca_file] = trust_root_from_pem(await self.run(ca_file.read_bytes))
        return self._trust[ca_file]

    async def _password(self, path: Path | None) -> str | None:
        if path is None:
            return None
        if path not in self._secrets:
            text = await self.run(path.read_text)
            self._secrets[path] = text.strip("\r\n")
        return self._secrets[path]

    async def _smarthost_targets(self, name: str) -> list[_Target]:
        """Built once per configuration, not per message."""
        config = self.config_source()
        cached = self._targets.get(name)
        if cached is not None and cached[0] is config:
            return cached[1]
        targets = await self._build_smarthost_targets(config, name)
        if self.config_source() is config:  # not if a reload came in meanwhile
            self._targets[name] = (config, targets)
        return targets

    async def _build_smarthost_targets(self, config: Config, name: str) -> list[_Target]:
        smarthost = config.smarthost(name)
        trust_root = await self._trust_root(smarthost.ca_file)
        password = await self._password(smarthost.password_file)
        targets = []
        for hp in smarthost.hosts:
            policy = ClientPolicy(
                helo_name=config.server.hostname, tls=smarthost.tls, tls_hostname=hp.host,
                trust_root=trust_root, username=smarthost.username, password=password,
                timeouts=config.delivery.timeouts)
            targets.append(_Target(hp.host, hp.port, policy))
        return targets

    async def _mx_targets(self, domain: str) -> list[_Target]:
        config = self.config_source()
        answer = await self.resolver.mx_hosts(domain)
        trust_root = await self._trust_root(config.delivery.ca_file)
        targets = []
        for mx in answer.hosts:
            if mx.host == config.server.hostname:
                raise DNSFailure(permanent(
                    "5.4.6", f"mail for {domain} loops back to myself (MX {mx.host})"))
            policy = ClientPolicy(
                helo_name=config.server.hostname, tls=config.delivery.tls, tls_hostname=mx.host,
                trust_root=trust_root, timeouts=config.delivery.timeouts)
            targets.append(_Target(mx.host, config.delivery.mx_port, policy))
        return targets

    def _is_myself(self, ip: str, port: int) -> bool:
        address = ipaddress.ip_address(ip)
        for listener in self.config_source().listeners:
            if listener.port != port:
                continue
            if listener.host in ("0.0.0.0", "::") and address.is_loopback:
                return True
            if ipaddress.ip_address(listener.host) == address:
                return True
        return False

    # -- delivery ---------------------------------------------------------------

    async def _deliver(self, job: DeliveryJob) -> list[DeliveryResult]:
        decision = job.decisions[0]
        count = len(job.decisions)
        try:
            if decision.action == "smarthost":
                assert decision.smarthost is not None  # routing names the smarthost
                targets = await self._smarthost_targets(decision.smarthost)
            else:
                targets = await self._mx_targets(decision.domain)
        except DNSFailure as e:
            return [e.result] * count
        except (OSError, KeyError, ValueError) as e:
            return [transient("4.3.5", f"delivery configuration problem: {e}")] * count
        message = self._message(job)
        last: DeliveryResult = transient("4.4.1", "no host could be reached")
        usable = [t for t in targets if self.health.available(f"{t.host}:{t.port}")]
        for target in usable or targets:
            key = f"{target.host}:{target.port}"
            try:
                addresses = await self.resolver.host_addresses(target.host)
            except DNSFailure as e:
                last = transient("4.4.3", e.result.text)
                continue
            for ip in addresses:
                if decision.action == "mx" and self._is_myself(ip, target.port):
                    return [permanent("5.4.6", f"mail for {decision.domain} loops back to "
                                               f"myself ({target.host}[{ip}])")] * count
                outcome = await self._try_host(target, ip, message(), count, job.queue_id)
                if isinstance(outcome, list):
                    self.health.succeeded(key)
                    return outcome
                last = outcome
            self.health.failed(key, job.queue_id)
        return [last] * count

    def _message(self, job: DeliveryJob) -> Callable[[], tuple[OutboundMessage, ContentReader]]:
        envelope = job.envelope
        recipients = tuple(d.recipient for d in job.decisions)
        params = tuple(envelope.recipients[i].params for i in job.indexes)
        mail_params = {k: v for k, v in envelope.params.items() if k in ("RET", "ENVID")}

        def make() -> tuple[OutboundMessage, ContentReader]:
            reader = job.content.reader()
            return OutboundMessage(
                sender=envelope.sender, recipients=recipients, rcpt_params=params,
                size=job.content.size, read_chunk=reader.read, smtputf8=envelope.smtputf8,
                eight_bit=envelope.params.get("BODY") == "8BITMIME",
                mail_params=mail_params), reader

        return make

    async def _try_host(self, target: _Target, ip: str,
                        made: tuple[OutboundMessage, ContentReader],
                        count: int, queue_id: str) -> list[DeliveryResult] | DeliveryResult:
        """A list of per-recipient results once a transaction ran, or one
        transient result when this host could not be used (try the next)."""
        message, reader = made
        remote = f"{target.host}[{ip}]:{target.port}"
        key = (ip, target.port, target.policy)
        proto = self.pool.take(key)
        try:
            if proto is None:
                try:
                    proto = await connect(self.reactor, ip, target.port, target.policy, remote)
                except SessionFailure as e:
                    log.info("delivery: host unusable id={queue_id} relay={relay} reply={reply}",
                             queue_id=queue_id, relay=remote,
                             reply=fields.text(e.result.diagnostic), event="host_unusable")
                    return e.result
            self._active.add(proto)
            try:
                results = await proto.send(message)
            except SessionFailure as e:
                return [e.result] * count
            finally:
                self._active.discard(proto)
            self.pool.give(key, proto)
            return results
        finally:
            reader.close()

