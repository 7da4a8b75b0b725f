"""How the server reads and writes: one write per batch of replies, sent at once on
plain TCP, reading paused only while input waits behind a pending answer, and the
idle timer measured from the last complete line."""

from __future__ import annotations

import itertools

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol

from relaygw.smtp.replies import Reply
from tests.smtp.conftest import SlowPolicy

MESSAGE = "Subject: hi\r\n\r\nbody\r\n.\r\n"
PIPELINED = ("EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<b@relay.example>\r\n"
             "DATA\r\n")


class CountingTransportWrites:
    def __init__(self, transport):
        self.writes = []
        real = transport.write
        transport.write = lambda data: (self.writes.append(data), real(data))


def test_pipelined_replies_leave_in_one_write(harness):
    s = harness.connect()
    writes = CountingTransportWrites(s.transport).writes
    replies = s.send(PIPELINED)
    assert replies[-3:] == ["250 2.1.0 Sender <a@c.example> OK",
                            "250 2.1.5 Recipient <b@relay.example> OK",
                            "354 End data with <CR><LF>.<CR><LF>"]
    assert len(writes) == 1


def test_reading_pauses_only_when_input_waits_behind_a_pending_answer(harness):
    factory = harness.factory()
    factory.policy = SlowPolicy()
    s = harness.session(factory)
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\nRCPT TO:<b@x.example>\r\n")
    assert s.transport.producerState == "producing"  # nothing is waiting
    assert s.send("NOOP\r\n") == []  # held until the RCPT is answered
    assert s.transport.producerState == "paused"
    factory.policy.pending[0].callback(None)
    assert s.take() == ["250 2.1.5 Recipient <b@x.example> OK", "250 2.0.0 OK"]
    assert s.transport.producerState == "producing"


def test_activity_moves_the_idle_deadline(harness):
    s = harness.connect()
    harness.clock.advance(200)
    assert s.send("NOOP\r\n") == ["250 2.0.0 OK"]
    harness.clock.advance(299)
    assert s.take() == [] and not s.closed
    harness.clock.advance(1)
    assert s.take() == ["421 4.4.2 Idle timeout, closing connection"]
    assert s.closed


@pytest.mark.parametrize(("code", "enhanced", "text"), list(itertools.product(
    (220, 250, 554), (None, "2.0.0", "5.5.1"), ("", "OK", "trailing ", "two\nlines", "end\n"))))
def test_reply_bytes_are_the_lines_with_crlf(code, enhanced, text):
    if enhanced is not None and enhanced[0] != str(code)[0]:
        return
    reply = Reply(code, enhanced, text)
    assert reply.to_bytes() == "".join(f"{line}\r\n" for line in reply.lines()).encode()


# -- real TCP: replies go straight to the socket ----------------------------------------


class _Client(Protocol):
    def __init__(self):
        self.received = b""
        self.closed: Deferred = Deferred()

    def dataReceived(self, data):  # noqa: N802 - Twisted's name
        self.received += data
        if self.received.endswith(b"221 2.0.0 Bye\r\n") and not self.closed.called:
            self.transport.loseConnection()

    def connectionLost(self, reason):  # noqa: N802 - Twisted's name
        if not self.closed.called:
            self.closed.callback(self.received)


def _dialogue(reactor, factory, lines, on_connect=None):
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = _Client()
    connected: Deferred = Deferred()

    class Factory(ClientFactory):
        def buildProtocol(self, addr):  # noqa: N802 - Twisted's name
            return client

        def clientConnectionFailed(self, connector, reason):  # noqa: N802
            connected.errback(reason)

    def send_all(_):
        for chunk in lines:
            client.transport.write(chunk.encode())

    reactor.connectTCP("127.0.0.1", port.getHost().port, Factory())
    server = []

    def started():
        if factory.sessions:
            server.extend(factory.sessions)
            if on_connect is not None:
                on_connect(server[0])
            connected.callback(None)
        else:
            reactor.callLater(0.005, started)

    reactor.callLater(0, started)
    connected.addCallback(send_all)
    return client.closed.addBoth(lambda r: (port.stopListening(), r)[1]), server


@pytest_twisted.inlineCallbacks
def test_replies_over_tcp_are_sent_at_once_and_in_order(harness):
    from twisted.internet import reactor

    factory = harness.factory(tls_mode="none")
    done, server = _dialogue(reactor, factory, [PIPELINED, MESSAGE, "QUIT\r\n"])
    received = yield done
    lines = received.decode().split("\r\n")[:-1]
    assert [line[:4] for line in lines] == (["220 "] + ["250-"] * 6 + ["250 "] * 3
                                            + ["354 ", "250 ", "221 "])
    assert server[0]._direct  # never needed the transport's buffer
    assert len(harness.queue_files()) == 1


@pytest_twisted.inlineCallbacks
def test_a_partial_send_hands_the_rest_to_the_transport_in_order(harness):
    from twisted.internet import reactor

    def short_writes(proto):
        real = proto.transport.writeSomeData
        proto.transport.writeSomeData = lambda data: real(data[:5])

    factory = harness.factory(tls_mode="none")
    done, server = _dialogue(reactor, factory, [PIPELINED, MESSAGE, "QUIT\r\n"],
                             on_connect=short_writes)
    received = yield done
    lines = received.decode().split("\r\n")[:-1]
    assert lines[0] == "220 relay.test ESMTP relaygw"
    assert [line[:4] for line in lines[1:]] == (["250-"] * 6 + ["250 "] * 3
                                                + ["354 ", "250 ", "221 "])
    assert not server[0]._direct
