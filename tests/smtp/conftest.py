"""A server protocol over an in-memory transport, a fake clock, and the real receive
stage writing to a real spool."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relaygw.config import parse_config
from relaygw.daemon.wiring import build_cleanup
from relaygw.observe.null import NO_METRICS
from relaygw.receive.policy import ConfiguredPolicy
from relaygw.smtp.server import ConnectionCounter, ServerSettings, SMTPServerFactory
from relaygw.testing import FakeAuthenticator, SynchronousSpool, TLSStringTransport


class Session:
    """Drives one server session; send() returns the reply lines it caused."""

    def __init__(self, factory, client_ip="127.0.0.1"):
        self.factory = factory
        self.transport = TLSStringTransport(
            peerAddress=IPv4Address("TCP", client_ip, 40000))
        self.proto = factory.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> list[str]:
        data = self.transport.value().decode("utf-8")
        self.transport.clear()
        return [line for line in data.split("\r\n") if line]

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.proto.dataReceived(data)
        return self.take()

    def ehlo(self, name: str = "client.example") -> list[str]:
        return self.send(f"EHLO {name}\r\n")

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


class Harness:
    def __init__(self, tmp_path):
        self.spool = SynchronousSpool(tmp_path / "spool")
        self.spool.recover()
        self.clock = Clock()
        self.settings = ServerSettings(hostname="relay.test", max_message_size=10000,
                                       max_recipients=5, max_hops=3, idle_timeout=300,
                                       max_errors=20, tls_mode="starttls",
                                       auth_mode="optional", tls_options=object())
        self.authenticator = FakeAuthenticator({"alice": "s3cret"})
        self.relay_domains = ["relay.example"]
        self.min_free_space = 0
        self.aliases = {}
        self.routes = [{"action": "mx"}]
        self.auth = {}  # the [auth] table
        self.queued = []

    def config(self):
        return parse_config({
            "server": {"hostname": "relay.test", "min_free_space": self.min_free_space},
            "listeners": [{"address": "127.0.0.1:0"}],
            "access": {"trusted_networks": ["127.0.0.0/8"], "relay_domains": self.relay_domains},
            "aliases": self.aliases,
            "routes": self.routes,
            "auth": self.auth,
        }, Path("/nonexistent"))

    def factory(self, policy=None, **settings):
        config = self.config()
        sink = build_cleanup(self.spool, self.queued.append, lambda: config, NO_METRICS)
        return SMTPServerFactory(replace(self.settings, **settings),
                                 policy or ConfiguredPolicy(lambda: config, self.spool), sink,
                                 self.authenticator, self.clock,
                                 counter=ConnectionCounter(10, 3))

    def connect(self, client_ip="127.0.0.1", **settings) -> Session:
        return Session(self.factory(**settings), client_ip)

    def session(self, factory, client_ip="127.0.0.1") -> Session:
        return Session(factory, client_ip)

    def queue_files(self) -> list[str]:
        return sorted(p.name for p in self.spool.queue_dir.iterdir())

    def message(self, queue_id: str) -> bytes:
        return self.spool.content(self.spool._load(queue_id)).read_all()


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


@pytest.fixture
def harness_factory(tmp_path_factory):
    """Fresh harnesses inside one test (hypothesis runs many examples per test)."""
    return lambda: Harness(tmp_path_factory.mktemp("h"))


class SlowPolicy:
    """Accepts every sender; each RCPT check stays pending until the test fires it."""

    def __init__(self):
        self.pending = []

    def check_mail(self, session, mail):
        return None

    def check_rcpt(self, session, mail, rcpt):
        d = Deferred()
        self.pending.append(d)
        return d
