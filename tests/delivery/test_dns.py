"""relaygw.delivery.dns against a real DNS server on loopback (tests.support.dns_server).

Every lookup goes to the LoopbackDNSServer a test starts: this machine has no working system
resolver, so nothing here may query it or call getaddrinfo on a name.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.message
import dns.query
import dns.resolver
import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.threads import deferToThreadPool
from twisted.python import threadable
from twisted.python.threadpool import ThreadPool

from relaygw.config import HostPort
from relaygw.delivery.dns import DNSFailure, MXAnswer, MXHost, Resolver, order_mx
from relaygw.results import PERMANENT, TRANSIENT, permanent, transient
from tests.support.dns_server import LoopbackDNSServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def pool():
    threads = ThreadPool(1, 4, name="test-dns")
    threads.start()
    yield threads
    threads.stop()


@pytest.fixture
def server(reactor):
    dns_server = LoopbackDNSServer(reactor)
    dns_server.start()
    yield dns_server
    pytest_twisted.blockon(dns_server.stop())


@pytest.fixture
def resolver(reactor, pool, server):
    def make(timeout: float = 2.0, seed: int = 0) -> Resolver:
        return Resolver(reactor, pool, [server.address], timeout=timeout,
                        rng=random.Random(seed))

    return make


def failure_of(d):
    """The DNSFailure result a Deferred fired with (the Deferred must fail with one)."""
    out = []

    def caught(failure):
        failure.trap(DNSFailure)
        out.append(failure.value.result)

    d.addCallbacks(lambda value: pytest.fail(f"expected a DNSFailure, got {value!r}"), caught)
    d.addCallback(lambda _: out[0])
    return d


# -- MX ----------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_mx_hosts_sorted_by_preference(server, resolver):
    server.add_mx("example.org", 20, "mx2.example.org")
    server.add_mx("example.org", 10, "MX1.Example.Org.")
    server.add_mx("example.org", 30, "mx3.example.org")
    answer = yield resolver().mx_hosts("example.org")
    assert answer == MXAnswer((MXHost(10, "mx1.example.org"), MXHost(20, "mx2.example.org"),
                               MXHost(30, "mx3.example.org")), implicit=False)
    assert server.queries == [("example.org", "MX")]


@pytest_twisted.inlineCallbacks
def test_mx_domain_is_case_and_trailing_dot_insensitive(server, resolver):
    server.add_mx("example.org", 10, "mx1.example.org")
    answer = yield resolver().mx_hosts("EXAMPLE.Org.")
    assert answer.hosts == (MXHost(10, "mx1.example.org"),)


@pytest_twisted.inlineCallbacks
def test_equal_preferences_shuffled_by_the_seeded_rng(server, resolver):
    server.add_mx("multi.example", 10, "b.multi.example")
    server.add_mx("multi.example", 10, "a.multi.example")
    server.add_mx("multi.example", 5, "first.multi.example")
    server.add_mx("multi.example", 20, "last.multi.example")
    orders = {}
    for seed in range(16):
        answer = yield resolver(seed=seed).mx_hosts("multi.example")
        hosts = answer.hosts
        assert hosts[0] == MXHost(5, "first.multi.example")
        assert hosts[3] == MXHost(20, "last.multi.example")
        assert {h.host for h in hosts[1:3]} == {"a.multi.example", "b.multi.example"}
        assert {h.preference for h in hosts[1:3]} == {10}
        orders[seed] = tuple(h.host for h in hosts)
    assert {order[1:3] for order in orders.values()} == {
        ("a.multi.example", "b.multi.example"), ("b.multi.example", "a.multi.example")}
    for seed in (0, 7):  # the same seed gives the same order
        again = yield resolver(seed=seed).mx_hosts("multi.example")
        assert tuple(h.host for h in again.hosts) == orders[seed]


def test_order_mx_is_deterministic_per_seed_and_keeps_lowest_duplicate():
    records = [(10, "c"), (10, "a"), (5, "z"), (10, "b"), (20, "a")]
    first = order_mx(records, random.Random(3))
    assert first == order_mx(list(reversed(records)), random.Random(3))
    assert first[0] == MXHost(5, "z")
    assert sorted(first[1:], key=lambda h: h.host) == [MXHost(10, "a"), MXHost(10, "b"),
                                                     MXHost(10, "c")]
    seen = {tuple(h.host for h in order_mx(records, random.Random(s))) for s in range(50)}
    assert len(seen) == 6  # every order of the three equal-preference hosts occurs


@pytest_twisted.inlineCallbacks
def test_no_mx_uses_the_a_record_as_implicit_mx(server, resolver):
    server.add_a("implicit.example", "192.0.2.7")
    answer = yield resolver().mx_hosts("implicit.example")
    assert answer == MXAnswer((MXHost(0, "implicit.example"),), implicit=True)
    assert server.queries == [("implicit.example", "MX"), ("implicit.example", "A")]


@pytest_twisted.inlineCallbacks
def test_no_mx_uses_an_aaaa_record_as_implicit_mx(server, resolver):
    server.add_aaaa("six.example", "2001:db8::25")
    answer = yield resolver().mx_hosts("Six.Example")
    assert answer == MXAnswer((MXHost(0, "six.example"),), implicit=True)
    assert server.queries == [("six.example", "MX"), ("six.example", "A"),
                              ("six.example", "AAAA")]


@pytest_twisted.inlineCallbacks
def test_no_mx_and_no_address_is_permanent(server, resolver):
    server.add_txt("bare.example", "v=spf1 -all")
    result = yield failure_of(resolver().mx_hosts("bare.example"))
    assert result == permanent("5.1.2", "Domain bare.example has no MX or address records")
    assert server.queries == [("bare.example", "MX"), ("bare.example", "A"),
                              ("bare.example", "AAAA")]


@pytest_twisted.inlineCallbacks
def test_no_mx_and_a_temporary_address_failure_is_transient(server, resolver):
    server.add_txt("half.example", "no mx here")
    server.set_servfail("half.example", "A")
    result = yield failure_of(resolver().mx_hosts("half.example"))
    assert result == transient(
        "4.4.3", "DNS lookup of half.example failed: all nameservers failed (SERVFAIL)")


@pytest_twisted.inlineCallbacks
def test_null_mx_is_permanent_5_1_10_without_address_fallback(server, resolver):
    server.add_null_mx("nomail.example")
    server.add_a("nomail.example", "192.0.2.8")
    result = yield failure_of(resolver().mx_hosts("nomail.example"))
    assert result == permanent("5.1.10", "Domain nomail.example does not accept mail (null MX)")
    assert server.queries == [("nomail.example", "MX")]


@pytest_twisted.inlineCallbacks
def test_null_mx_beside_real_mx_records_is_ignored(server, resolver):
    server.add_null_mx("mixed.example")
    server.add_mx("mixed.example", 10, "mx.mixed.example")
    answer = yield resolver().mx_hosts("mixed.example")
    assert answer == MXAnswer((MXHost(10, "mx.mixed.example"),), implicit=False)


@pytest_twisted.inlineCallbacks
def test_nxdomain_is_permanent_5_1_2(server, resolver):
    server.add_mx("example.org", 10, "mx1.example.org")
    result = yield failure_of(resolver().mx_hosts("nothere.example.org"))
    assert result == permanent("5.1.2", "Domain nothere.example.org does not exist")
    assert result.status == PERMANENT


@pytest_twisted.inlineCallbacks
def test_servfail_is_transient_4_4_3(server, resolver):
    server.set_servfail("broken.example")
    result = yield failure_of(resolver().mx_hosts("broken.example"))
    assert result == transient(
        "4.4.3", "DNS lookup of broken.example failed: all nameservers failed (SERVFAIL)")


@pytest_twisted.inlineCallbacks
def test_unanswered_query_is_transient_within_the_timeout(server, resolver):
    server.set_timeout("slow.example")
    started = time.monotonic()
    result = yield failure_of(resolver(timeout=1.0).mx_hosts("slow.example"))
    elapsed = time.monotonic() - started
    assert result == transient("4.4.3", "DNS lookup of slow.example failed: timed out after 1s")
    assert result.status == TRANSIENT
    assert 0.9 <= elapsed < 1.9
    assert server.queries[0] == ("slow.example", "MX")


@pytest_twisted.inlineCallbacks
def test_address_literal_domain_needs_no_lookup(server, resolver):
    r = resolver()
    answer = yield r.mx_hosts("[192.0.2.1]")
    assert answer == MXAnswer((MXHost(0, "[192.0.2.1]"),), implicit=True)
    answer = yield r.mx_hosts("[ipv6:2001:DB8:0::1]")
    assert answer == MXAnswer((MXHost(0, "[IPv6:2001:db8::1]"),), implicit=True)
    result = yield failure_of(r.mx_hosts("[192.0.2.300]"))
    assert result == permanent("5.1.2", "Invalid address literal [192.0.2.300]")
    assert server.queries == []


@pytest_twisted.inlineCallbacks
def test_malformed_domain_is_permanent_without_a_query(server, resolver):
    r = resolver()
    result = yield failure_of(r.mx_hosts("a..example"))
    assert result == permanent("5.1.2", "Domain a..example is not a valid domain name")
    result = yield failure_of(r.mx_hosts(("x" * 64) + ".example"))
    assert result.status == PERMANENT and result.enhanced == "5.1.2"
    assert server.queries == []


# -- addresses ---------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_host_addresses_a_only(server, resolver):
    server.add_a("mx1.example.org", "127.0.0.1")
    server.add_a("mx1.example.org", "127.0.0.2")
    addresses = yield resolver().host_addresses("mx1.example.org")
    assert addresses == ["127.0.0.1", "127.0.0.2"]
    assert sorted(server.queries) == [("mx1.example.org", "A"), ("mx1.example.org", "AAAA")]


@pytest_twisted.inlineCallbacks
def test_host_addresses_aaaa_only(server, resolver):
    server.add_aaaa("mx6.example.org", "2001:DB8::1")
    addresses = yield resolver().host_addresses("mx6.example.org")
    assert addresses == ["2001:db8::1"]


@pytest_twisted.inlineCallbacks
def test_host_addresses_both_families_ipv4_first(server, resolver):
    server.add_aaaa("dual.example.org", "::1")
    server.add_a("dual.example.org", "127.0.0.1")
    addresses = yield resolver().host_addresses("dual.example.org.")
    assert addresses == ["127.0.0.1", "::1"]


@pytest_twisted.inlineCallbacks
def test_host_addresses_of_literals_send_no_query(server, resolver):
    r = resolver()
    assert (yield r.host_addresses("192.0.2.1")) == ["192.0.2.1"]
    assert (yield r.host_addresses("[192.0.2.1]")) == ["192.0.2.1"]
    assert (yield r.host_addresses("[IPv6:2001:db8::1]")) == ["2001:db8::1"]
    assert (yield r.host_addresses("[2001:DB8::1]")) == ["2001:db8::1"]
    assert (yield r.host_addresses("::1")) == ["::1"]
    assert server.queries == []


@pytest_twisted.inlineCallbacks
def test_host_addresses_failures(server, resolver):
    server.add_txt("noaddr.example", "nothing")
    server.set_servfail("broken.example")
    r = resolver()
    result = yield failure_of(r.host_addresses("nothere.example"))
    assert result == permanent("5.1.2", "Host nothere.example does not exist")
    result = yield failure_of(r.host_addresses("noaddr.example"))
    assert result == permanent("5.1.2", "Host noaddr.example has no address records")
    result = yield failure_of(r.host_addresses("broken.example"))
    assert result == transient(
        "4.4.3", "DNS lookup of broken.example failed: all nameservers failed (SERVFAIL)")


@pytest_twisted.inlineCallbacks
def test_host_addresses_one_family_failing(server, resolver):
    server.add_a("partial.example", "127.0.0.3")
    server.set_timeout("partial.example", "AAAA")
    server.add_txt("onlyfail.example", "x")
    server.set_servfail("onlyfail.example", "AAAA")
    r = resolver(timeout=1.0)
    started = time.monotonic()
    assert (yield r.host_addresses("partial.example")) == ["127.0.0.3"]  # what answered
    assert time.monotonic() - started < 1.9
    result = yield failure_of(r.host_addresses("onlyfail.example"))
    assert result.status == TRANSIENT and result.enhanced == "4.4.3"  # never permanent


# -- threads, configuration, caching -----------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_queries_run_in_the_pool_not_on_the_reactor_thread(server, resolver, monkeypatch):
    seen = []
    original = dns.resolver.Resolver.resolve

    def recording(self, *args, **kwargs):
        seen.append((threadable.isInIOThread(), threading.current_thread().name))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(dns.resolver.Resolver, "resolve", recording)
    server.add_mx("example.org", 10, "mx1.example.org")
    server.add_a("mx1.example.org", "127.0.0.1")
    r = resolver()
    yield r.mx_hosts("example.org")
    yield r.host_addresses("mx1.example.org")
    assert len(seen) == 3
    assert all(not in_reactor and "test-dns" in name for in_reactor, name in seen)


@pytest_twisted.inlineCallbacks
def test_reactor_stays_responsive_during_a_pending_lookup(reactor, server, resolver):
    server.set_timeout("slow.example")
    ticks = []
    loop = task.LoopingCall(lambda: ticks.append(time.monotonic()))
    loop.clock = reactor
    loop.start(0.05)
    try:
        result = yield failure_of(resolver(timeout=1.0).mx_hosts("slow.example"))
    finally:
        loop.stop()
    assert result.status == TRANSIENT
    assert len(ticks) >= 10  # about 20 expected in one second


@pytest_twisted.inlineCallbacks
def test_each_nameserver_keeps_its_own_port(reactor, pool, server):
    server.set_servfail("example.org")
    second = LoopbackDNSServer(reactor, {"mx": [["example.org", 10, "mx.second.example"]]})
    second.start()
    try:
        r = Resolver(reactor, pool, [server.address, HostPort(*second.address)], timeout=2.0)
        answer = yield r.mx_hosts("example.org")
        assert answer.hosts == (MXHost(10, "mx.second.example"),)
        assert server.queries == [("example.org", "MX")]  # asked first, then the other
        assert second.queries == [("example.org", "MX")]
    finally:
        yield second.stop()


def test_nameservers_must_be_ip_addresses(reactor, pool):
    with pytest.raises(ValueError):
        Resolver(reactor, pool, [("dns.example", 53)])
    with pytest.raises(ValueError):
        Resolver(reactor, pool, [("127.0.0.1", 53)], timeout=0)


@pytest_twisted.inlineCallbacks
def test_answers_are_cached_for_their_ttl(server, resolver):
    server.ttl = 60
    server.add_mx("example.org", 10, "mx1.example.org")
    r = resolver()
    first = yield r.mx_hosts("example.org")
    second = yield r.mx_hosts("example.org")
    assert first == second
    result = yield failure_of(r.mx_hosts("gone.example"))
    result = yield failure_of(r.mx_hosts("gone.example"))  # the negative answer is cached too
    assert result.enhanced == "5.1.2"
    assert server.queries == [("example.org", "MX"), ("gone.example", "MX")]


@pytest_twisted.inlineCallbacks
def test_negative_answers_are_not_cached_with_ttl_zero(server, resolver):
    r = resolver()
    result = yield failure_of(r.mx_hosts("later.example"))
    assert result.enhanced == "5.1.2"
    server.add_mx("later.example", 10, "mx.later.example")
    answer = yield r.mx_hosts("later.example")
    assert answer.hosts == (MXHost(10, "mx.later.example"),)


# -- the test server itself --------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_server_answers_over_tcp_too(reactor, pool, server):
    server.add_mx("example.org", 10, "mx1.example.org")
    host, port = server.address
    query = dns.message.make_query("example.org", "MX")
    response = yield deferToThreadPool(reactor, pool, dns.query.tcp, query, host,
                                       timeout=2.0, port=port)
    assert [rdata.to_text() for rdata in response.answer[0]] == ["10 mx1.example.org."]


@pytest_twisted.inlineCallbacks
def test_server_stop_closes_connections_and_frees_the_port(reactor, pool):
    dns_server = LoopbackDNSServer(reactor, {"timeout": ["slow.example"]})
    host, port = dns_server.start()
    query = dns.message.make_query("slow.example", "MX")
    pending = deferToThreadPool(reactor, pool, dns.query.tcp, query, host, timeout=10.0,
                                port=port)
    while not dns_server.queries:  # the query arrived and waits for an answer
        yield task.deferLater(reactor, 0.02, lambda: None)
    started = time.monotonic()
    yield dns_server.stop()
    with pytest.raises((EOFError, OSError)):
        yield pending  # the connection was dropped, not left to time out
    assert time.monotonic() - started < 5
    again = LoopbackDNSServer(reactor)
    assert again.start(port) == (host, port)  # UDP and TCP both free again
    yield again.stop()


def test_server_rejects_unknown_zone_keys(reactor):
    with pytest.raises(ValueError, match="unknown zone keys: cname"):
        LoopbackDNSServer(reactor, {"cname": []})
    with pytest.raises(ValueError, match="unknown record type"):
        LoopbackDNSServer(reactor).set_servfail("x.example", "BOGUS")


# -- python -m tests.support.dns_server ------------------------------------------------


def spawn_server(tmp_path, zone, *extra):
    zone_file = tmp_path / "zone.json"
    zone_file.write_text(json.dumps(zone))
    port_file = tmp_path / "port"
    stderr = open(tmp_path / "stderr", "wb")  # noqa: SIM115 - closed by the caller
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.dns_server", "--port-file", str(port_file),
         "--zone-file", str(zone_file), *extra],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    stderr.close()
    return proc, port_file


@pytest_twisted.inlineCallbacks
def test_module_entry_point_serves_a_zone_file(reactor, pool, tmp_path):
    zone = {"mx": [["example.org", 10, "mx1.example.org"], ["example.org", 20, "mx2.example.org"]],
            "a": [["mx1.example.org", "127.0.0.1"]], "aaaa": [["mx1.example.org", "::1"]],
            "txt": [["bare.example", "x"]], "null_mx": ["nomail.example"],
            "servfail": ["broken.example"], "timeout": ["slow.example"]}
    proc, port_file = spawn_server(tmp_path, zone)
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert proc.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "no port file"
            yield task.deferLater(reactor, 0.05, lambda: None)
        port = int(port_file.read_text())
        r = Resolver(reactor, pool, [("127.0.0.1", port)], timeout=1.0)
        answer = yield r.mx_hosts("example.org")
        assert answer.hosts == (MXHost(10, "mx1.example.org"), MXHost(20, "mx2.example.org"))
        assert (yield r.host_addresses("mx1.example.org")) == ["127.0.0.1", "::1"]
        result = yield failure_of(r.mx_hosts("nomail.example"))
        assert result.enhanced == "5.1.10"
        result = yield failure_of(r.mx_hosts("bare.example"))
        assert result.enhanced == "5.1.2"
        result = yield failure_of(r.mx_hosts("broken.example"))
        assert result.enhanced == "4.4.3"
        result = yield failure_of(r.mx_hosts("slow.example"))
        assert result == transient("4.4.3",
                                   "DNS lookup of slow.example failed: timed out after 1s")
    finally:
        proc.terminate()
        returncode = proc.wait(timeout=10)
    assert returncode == 0, (tmp_path / "stderr").read_text()


def test_module_entry_point_fails_on_a_busy_port(server, tmp_path):
    _, port = server.address
    proc, port_file = spawn_server(tmp_path, {}, "--port", str(port))
    try:
        returncode = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == 1
    assert "cannot start" in (tmp_path / "stderr").read_text()
    assert not port_file.exists()
