"""RelayCourier's host loop: failover between smarthosts and MX hosts, the circuit
breaker (HostHealth) as the loop uses it, and mail that would loop back to this host.

No sockets: a fake resolver answers at once, ``relaygw.delivery.relay.connect`` is
replaced by a fake that refuses or answers per IP address, and the reactor is a
``Clock`` (the circuit breaker's time and the connection pool's idle timers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import Clock

from relaygw.config import parse_config
from relaygw.delivery import relay
from relaygw.delivery.courier import DeliveryJob
from relaygw.delivery.dns import DNSFailure, MXAnswer, MXHost
from relaygw.delivery.relay import FAILURES_TO_OPEN, OPEN_FOR, RelayCourier
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.results import DeliveryResult, delivered, permanent, transient
from relaygw.routing import RouteDecision
from relaygw.smtp.client import OutboundMessage, SessionFailure

BODY = b"Subject: failover\r\n\r\nfirst line\r\n.starts with a dot\r\n"
RECIPIENTS = ("b@remote.example", "c@remote.example")


# -- fakes ------------------------------------------------------------------------------


class Content:
    """A MessageContent held in memory; counts the readers opened and closed."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.opened = 0
        self.closed = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def reader(self) -> Reader:
        self.opened += 1
        return Reader(self)


class Reader:
    def __init__(self, content: Content) -> None:
        self.content = content
        self.chunks = [content.data[:10], content.data[10:]]

    def read(self) -> Deferred[bytes]:
        return succeed(self.chunks.pop(0) if self.chunks else b"")

    def close(self) -> Deferred[None]:
        self.content.closed += 1
        return succeed(None)


class Resolver:
    """Answers at once from dicts: host -> addresses, domain -> MX host names."""

    def __init__(self, addresses: dict[str, list[str]],
                 mx: dict[str, list[str]] | None = None) -> None:
        self.addresses = addresses
        self.mx = mx or {}
        self.asked: list[str] = []

    def mx_hosts(self, domain: str) -> Deferred[MXAnswer]:
        hosts = tuple(MXHost(10 * (i + 1), name) for i, name in enumerate(self.mx[domain]))
        return succeed(MXAnswer(hosts, implicit=False))

    def host_addresses(self, host: str) -> Deferred[list[str]]:
        self.asked.append(host)
        if host not in self.addresses:
            return fail(DNSFailure(permanent("5.1.2", f"{host}: no address (NXDOMAIN)")))
        return succeed(list(self.addresses[host]))


class Protocol:
    """What the courier uses of SMTPClientProtocol: send, usable, quit, transport."""

    def __init__(self, network: Network, ip: str, remote: str) -> None:
        self.network = network
        self.ip = ip
        self.remote = remote
        self.usable = True
        self.transport = None
        self.quits = 0

    def send(self, message: OutboundMessage) -> Deferred[list[DeliveryResult]]:
        body = b""
        while chunk := _result(message.read_chunk()):
            body += chunk
        self.network.sent.append((self.ip, message.recipients, body))
        # One transaction per connection (the pool then drops it): every try connects.
        self.usable = False
        outcome = self.network.transaction.get(self.ip)
        if isinstance(outcome, DeliveryResult):  # the transaction broke off
            return fail(SessionFailure(outcome))
        if outcome is not None:  # the server's answers, one per recipient
            return succeed(list(outcome))
        return succeed([delivered("2.0.0 Ok: queued", code=250, remote=self.remote)
                        for _ in message.recipients])

    def quit(self) -> Deferred[None]:
        self.quits += 1
        self.usable = False
        return succeed(None)


class Network:
    """The fake ``connect``: IPs in ``down`` refuse (with their reason), the others
    greet; ``transaction`` scripts what happens once a transaction has started."""

    def __init__(self) -> None:
        self.down: dict[str, str] = {}
        self.transaction: dict[str, Any] = {}
        self.connects: list[str] = []
        self.sent: list[tuple[str, tuple[str, ...], bytes]] = []

    def connect(self, reactor: Any, ip: str, port: int, policy: Any,
                remote: str) -> Deferred[Protocol]:
        self.connects.append(ip)
        if ip in self.down:
            return fail(SessionFailure(transient(
                "4.4.1", f"connection refused/failed: {self.down[ip]}", remote=remote)))
        return succeed(Protocol(self, ip, remote))


def _result(d: Deferred) -> Any:
    """The result of a Deferred that has fired (every fake here answers at once)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


# -- set-up -----------------------------------------------------------------------------


def make_config(tmp_path: Path, smarthost_hosts: list[str], mx_port: int = 25,
                listener: str = "127.0.0.1:2525"):
    return parse_config({
        "server": {"hostname": "relay.test", "spool_dir": str(tmp_path / "spool")},
        "listeners": [{"address": listener, "tls": "none", "auth": "none"}],
        "smarthosts": {"up": {"hosts": smarthost_hosts, "tls": "none"}},
        "delivery": {"mx_port": mx_port, "tls": "none"},
        "dns": {"nameservers": ["127.0.0.1:9"]},
        "routes": [{"action": "smarthost", "smarthost": "up"}],
    }, tmp_path)


@pytest.fixture
def network(monkeypatch) -> Network:
    net = Network()
    monkeypatch.setattr(relay, "connect", net.connect)
    return net


class Relay:
    """A RelayCourier on a Clock, with the fakes, and a way to hand it jobs."""

    def __init__(self, config: Any, resolver: Resolver) -> None:
        self.clock = Clock()
        self.resolver = resolver
        self.courier = RelayCourier(self.clock, resolver, lambda: config,
                                    lambda fn, *args: maybeDeferred(fn, *args))
        self.contents: list[Content] = []

    def deliver(self, action: str = "smarthost", domain: str = "remote.example",
                recipients: tuple[str, ...] = RECIPIENTS) -> list[DeliveryResult]:
        envelope = Envelope("1A0000000000ABCDE", "a@local.example",
                            tuple(EnvelopeRecipient(r) for r in recipients), 1_700_000_000.0)
        nexthop = "smarthost:up" if action == "smarthost" else f"mx:{domain}"
        decisions = tuple(
            RouteDecision(action, r, 0, nexthop, smarthost="up" if action == "smarthost"
                          else None, domain=domain)
            for r in recipients)
        content = Content(BODY)
        self.contents.append(content)
        job = DeliveryJob(envelope.queue_id, envelope, content, tuple(range(len(recipients))),
                          decisions)
        return _result(self.courier.deliver(job))

    def every_reader_closed(self) -> bool:
        return all(c.opened == c.closed for c in self.contents)


def refused(ip: str, host: str, why: str = "Connection refused") -> DeliveryResult:
    return transient("4.4.1", f"connection refused/failed: {why}", remote=f"{host}[{ip}]:25")


def ok(ip: str, host: str) -> DeliveryResult:
    return delivered("2.0.0 Ok: queued", code=250, remote=f"{host}[{ip}]:25")


# -- failover ---------------------------------------------------------------------------


def test_first_smarthost_refuses_the_second_gets_the_message_once(tmp_path, network):
    r = Relay(make_config(tmp_path, ["a.example", "b.example"]),
              Resolver({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}))
    network.down["192.0.2.1"] = "Connection refused"
    assert r.deliver() == [ok("192.0.2.2", "b.example")] * 2
    assert network.connects == ["192.0.2.1", "192.0.2.2"]
    assert network.sent == [("192.0.2.2", RECIPIENTS, BODY)]
    assert r.courier.health.states() == {"a.example:25": "closed"}  # one failure so far
    assert r.every_reader_closed()


def test_first_mx_refuses_the_second_gets_the_message_once(tmp_path, network):
    resolver = Resolver({"mx1.remote.example": ["192.0.2.11"],
                         "mx2.remote.example": ["192.0.2.12"]},
                        mx={"remote.example": ["mx1.remote.example", "mx2.remote.example"]})
    r = Relay(make_config(tmp_path, ["a.example"]), resolver)
    network.down["192.0.2.11"] = "Connection refused"
    assert r.deliver("mx") == [ok("192.0.2.12", "mx2.remote.example")] * 2
    assert network.connects == ["192.0.2.11", "192.0.2.12"]
    assert network.sent == [("192.0.2.12", RECIPIENTS, BODY)]


def test_next_address_of_the_same_host_is_tried_before_the_next_host(tmp_path, network):
    r = Relay(make_config(tmp_path, ["a.example", "b.example"]),
              Resolver({"a.example": ["192.0.2.1", "2001:db8::1"],
                        "b.example": ["192.0.2.2"]}))
    network.down["192.0.2.1"] = "Connection refused"
    assert r.deliver() == [delivered("2.0.0 Ok: queued", code=250,
                                     remote="a.example[2001:db8::1]:25")] * 2
    assert network.connects == ["192.0.2.1", "2001:db8::1"]
    assert [ip for ip, _, _ in network.sent] == ["2001:db8::1"]
    assert r.courier.health.states() == {}  # the host answered: no failure kept


def test_a_host_without_an_address_is_skipped(tmp_path, network):
    r = Relay(make_config(tmp_path, ["gone.example", "b.example"]),
              Resolver({"b.example": ["192.0.2.2"]}))
    assert r.deliver() == [ok("192.0.2.2", "b.example")] * 2
    assert r.resolver.asked == ["gone.example", "b.example"]
    assert network.connects == ["192.0.2.2"]


def test_a_transaction_that_broke_off_is_not_retried_on_another_host(tmp_path, network):
    r = Relay(make_config(tmp_path, ["a.example", "b.example"]),
              Resolver({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}))
    lost = transient("4.4.2", "connection lost during message data",
                     remote="a.example[192.0.2.1]:25")
    network.transaction["192.0.2.1"] = lost
    assert r.deliver() == [lost, lost]
    assert network.connects == ["192.0.2.1"]  # b never: the queue retries later
    assert [ip for ip, _, _ in network.sent] == ["192.0.2.1"]
    assert r.every_reader_closed()


def test_a_transaction_answered_4xx_is_not_retried_on_another_host(tmp_path, network):
    r = Relay(make_config(tmp_path, ["a.example", "b.example"]),
              Resolver({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}))
    answers = [transient("4.3.0", "try later", code=421, remote="a.example[192.0.2.1]:25"),
               ok("192.0.2.1", "a.example")]
    network.transaction["192.0.2.1"] = answers
    assert r.deliver() == answers
    assert network.connects == ["192.0.2.1"]
    assert len(network.sent) == 1


def test_all_hosts_down_gives_one_transient_result_per_recipient_with_the_last_reason(
        tmp_path, network):
    r = Relay(make_config(tmp_path, ["a.example", "b.example"]),
              Resolver({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}))
    network.down.update({"192.0.2.1": "Connection refused", "192.0.2.2": "timed out"})
    last = refused("192.0.2.2", "b.example", "timed out")
    assert r.deliver(recipients=("x@remote.example", "y@remote.example", "z@remote.example")) \
        == [last, last, last]
    assert network.connects == ["192.0.2.1", "192.0.2.2"]
    assert network.sent == []
    assert r.every_reader_closed()


def test_all_hosts_without_an_address_gives_4_4_3_with_the_last_reason(tmp_path, network):
    r = Relay(make_config(tmp_path, ["gone.example", "lost.example"]), Resolver({}))
    last = transient("4.4.3", "lost.example: no address (NXDOMAIN)")
    assert r.deliver() == [last, last]
    assert network.connects == []


# -- the circuit breaker ------------------------------------------------------------------


def open_a(tmp_path, network) -> Relay:
    """a.example refuses FAILURES_TO_OPEN messages in a row (b.example takes them)."""
    r = Relay(make_config(tmp_path, ["a.example", "b.example"]),
              Resolver({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}))
    network.down["192.0.2.1"] = "Connection refused"
    for n in range(FAILURES_TO_OPEN):
        assert r.courier.health.state("a.example:25") == "closed", n
        assert r.deliver() == [ok("192.0.2.2", "b.example")] * 2
    assert network.connects == ["192.0.2.1", "192.0.2.2"] * FAILURES_TO_OPEN
    assert r.courier.health.state("a.example:25") == "open"
    network.connects.clear()
    network.sent.clear()
    return r


def test_a_host_that_keeps_failing_is_skipped_until_open_for_has_passed(tmp_path, network):
    r = open_a(tmp_path, network)
    assert r.deliver() == [ok("192.0.2.2", "b.example")] * 2
    r.clock.advance(OPEN_FOR - 0.5)
    assert r.deliver() == [ok("192.0.2.2", "b.example")] * 2
    assert network.connects == ["192.0.2.2", "192.0.2.2"]  # a skipped both times
    assert r.courier.health.state("a.example:25") == "open"


def test_half_open_host_gets_one_trial_and_success_closes_it(tmp_path, network):
    r = open_a(tmp_path, network)
    r.clock.advance(OPEN_FOR)
    assert r.courier.health.state("a.example:25") == "half-open"
    del network.down["192.0.2.1"]  # a is back
    assert r.deliver() == [ok("192.0.2.1", "a.example")] * 2
    assert network.connects == ["192.0.2.1"]
    assert r.courier.health.states() == {}  # closed, its failures forgotten
    # Closed means the whole count starts again: one failure does not open it.
    network.down["192.0.2.1"] = "Connection refused"
    r.deliver()
    assert r.courier.health.state("a.example:25") == "closed"


def test_half_open_host_that_fails_its_trial_is_skipped_again(tmp_path, network):
    r = open_a(tmp_path, network)
    r.clock.advance(OPEN_FOR)
    assert r.deliver() == [ok("192.0.2.2", "b.example")] * 2
    assert network.connects == ["192.0.2.1", "192.0.2.2"]  # the one trial, then b
    assert r.courier.health.state("a.example:25") == "open"
    network.connects.clear()
    r.clock.advance(OPEN_FOR - 0.5)  # open again for a full OPEN_FOR from the trial
    assert r.deliver() == [ok("192.0.2.2", "b.example")] * 2
    assert network.connects == ["192.0.2.2"]


def test_when_every_host_is_open_they_are_all_tried_anyway(tmp_path, network):
    r = Relay(make_config(tmp_path, ["a.example", "b.example"]),
              Resolver({"a.example": ["192.0.2.1"], "b.example": ["192.0.2.2"]}))
    network.down.update({"192.0.2.1": "Connection refused", "192.0.2.2": "Connection refused"})
    for _ in range(FAILURES_TO_OPEN):
        r.deliver()
    assert r.courier.health.states() == {"a.example:25": "open", "b.example:25": "open"}
    network.connects.clear()
    del network.down["192.0.2.2"]
    assert r.deliver() == [ok("192.0.2.2", "b.example")] * 2
    assert network.connects == ["192.0.2.1", "192.0.2.2"]
    assert r.courier.health.states() == {"a.example:25": "open"}


# -- mail that would come back here ------------------------------------------------------


def test_an_mx_named_as_this_host_is_a_permanent_5_4_6(tmp_path, network):
    resolver = Resolver({"relay.test": ["192.0.2.1"]},
                        mx={"remote.example": ["relay.test"]})
    r = Relay(make_config(tmp_path, ["a.example"]), resolver)
    loop = permanent("5.4.6", "mail for remote.example loops back to myself (MX relay.test)")
    assert r.deliver("mx") == [loop, loop]
    assert network.connects == []
    assert resolver.asked == []


@pytest.mark.parametrize("listener,ip", [("127.0.0.1:2525", "127.0.0.1"),
                                         ("0.0.0.0:2525", "127.0.0.2"),
                                         ("192.0.2.25:2525", "192.0.2.25")])
def test_an_mx_whose_address_is_one_of_our_listeners_is_a_permanent_5_4_6(
        tmp_path, network, listener, ip):
    resolver = Resolver({"mx.remote.example": [ip]}, mx={"remote.example": ["mx.remote.example"]})
    r = Relay(make_config(tmp_path, ["a.example"], mx_port=2525, listener=listener), resolver)
    loop = permanent("5.4.6", f"mail for remote.example loops back to myself "
                              f"(mx.remote.example[{ip}])")
    assert r.deliver("mx") == [loop, loop]
    assert network.connects == []


def test_an_mx_on_our_address_but_another_port_is_not_this_host(tmp_path, network):
    resolver = Resolver({"mx.remote.example": ["127.0.0.1"]},
                        mx={"remote.example": ["mx.remote.example"]})
    r = Relay(make_config(tmp_path, ["a.example"], mx_port=25), resolver)
    assert r.deliver("mx") == [ok("127.0.0.1", "mx.remote.example")] * 2
    assert network.connects == ["127.0.0.1"]


# -- log lines --------------------------------------------------------------------------


def test_the_delivery_lines_about_a_message_carry_its_queue_id(tmp_path, network):
    from twisted.logger import capturedLogs, formatEvent

    r = Relay(make_config(tmp_path, ["a.example"]), Resolver({"a.example": ["192.0.2.1"]}))
    network.down["192.0.2.1"] = "Connection refused"
    with capturedLogs() as events:
        for _ in range(FAILURES_TO_OPEN):
            r.deliver()
    lines = [formatEvent(e) for e in events]
    unusable = ('delivery: host unusable id=1A0000000000ABCDE relay=a.example[192.0.2.1]:25 '
                'reply="4.4.1 connection refused/failed: Connection refused"')
    assert lines == [unusable] * FAILURES_TO_OPEN + [
        f"delivery: circuit open id=1A0000000000ABCDE host=a.example:25 "
        f"failures={FAILURES_TO_OPEN} skip_seconds={round(OPEN_FOR)}"]
    assert [e["event"] for e in events] == ["host_unusable"] * FAILURES_TO_OPEN + [
        "circuit_open"]
    assert all(e["queue_id"] == "1A0000000000ABCDE" for e in events)
