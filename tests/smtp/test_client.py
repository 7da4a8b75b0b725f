"""Tests for relaygw.smtp.client.

Two layers: a scripted server over an in-memory transport and a fake clock (exact
bytes, every timeout), then real loopback sessions against aiosmtpd.
"""

from __future__ import annotations

import base64
import ssl
import threading
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from twisted.internet import defer, error
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from relaygw.config import DeliveryTimeouts
from relaygw.results import (
    DELIVERED,
    FINAL,
    PASSED_ON,
    PERMANENT,
    RELAYED,
    TRANSIENT,
    DeliveryResult,
)
from relaygw.smtp.client import (
    ClientPolicy,
    OutboundMessage,
    ReplyError,
    ReplyParser,
    SessionFailure,
    SMTPClientProtocol,
    connect,
)
from relaygw.testing import TLSStringTransport

REMOTE = "mx.test[192.0.2.1]:25"
GREETING = b"220 mx.test ESMTP\r\n"
EHLO = b"EHLO relay.test\r\n"
TIMEOUTS = DeliveryTimeouts(connect=1, greeting=2, helo=3, starttls=4, auth=5, mail=6, rcpt=7,
                            data_init=8, data_block=9, data_done=10, quit=11)


def make_policy(**kw: Any) -> ClientPolicy:
    kw.setdefault("helo_name", "relay.test")
    kw.setdefault("tls", "none")
    kw.setdefault("tls_hostname", "mx.test")
    kw.setdefault("timeouts", TIMEOUTS)
    return ClientPolicy(**kw)


def ehlo_reply(*extensions: str) -> bytes:
    lines = ["mx.test", *extensions]
    return b"".join(
        f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode()
        for i, line in enumerate(lines))


def outcome(d: defer.Deferred[Any]) -> list[Any]:
    """What ``d`` fired with, appended to a list (empty while it has not fired)."""
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def failure_result(out: list[Any]) -> DeliveryResult:
    assert len(out) == 1, out
    assert isinstance(out[0], Failure), out[0]
    assert out[0].check(SessionFailure), out[0]
    return out[0].value.result


class ChunkReader:
    """read_chunk for a test message: the given chunks, then b""; counts the reads."""

    def __init__(self, chunks: tuple[Any, ...]) -> None:
        self.chunks = [*chunks, b""]
        self.calls = 0

    def __call__(self) -> defer.Deferred[bytes]:
        self.calls += 1
        chunk = self.chunks.pop(0)
        return chunk if isinstance(chunk, defer.Deferred) else defer.succeed(chunk)


def message(*chunks: Any, recipients: tuple[str, ...] = ("c@d.example",),
            size: int | None = None, **kw: Any) -> OutboundMessage:
    chunks = chunks or (b"hello",)
    if size is None:
        size = sum(len(c) for c in chunks if isinstance(c, bytes))
    return OutboundMessage(sender=kw.pop("sender", "a@b.example"), recipients=recipients,
                           rcpt_params=kw.pop("rcpt_params", ()), size=size,
                           read_chunk=ChunkReader(chunks), **kw)


class Session:
    """One client protocol; the test plays the server with say() and heard()."""

    def __init__(self, **policy: Any) -> None:
        self.clock = Clock()
        self.transport = TLSStringTransport()
        self.client = SMTPClientProtocol(make_policy(**policy), self.clock, REMOTE)
        self.ready = outcome(self.client.ready)
        self.client.makeConnection(self.transport)

    def say(self, data: bytes | str) -> None:
        self.client.dataReceived(data.encode() if isinstance(data, str) else data)

    def heard(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def greet(self, *extensions: str) -> None:
        self.say(GREETING)
        assert self.heard() == EHLO
        self.say(ehlo_reply(*extensions))

    def start_tls(self, *extensions: str) -> None:
        assert self.heard() == b"STARTTLS\r\n"
        self.say("220 2.0.0 go ahead\r\n")
        assert self.transport.tls_options is not None
        assert self.heard() == EHLO
        self.say(ehlo_reply(*extensions))

    def lose(self, reason: type[Exception] = error.ConnectionLost) -> None:
        self.client.connectionLost(Failure(reason()))

    @property
    def aborted(self) -> bool:
        return self.transport.disconnected


def ready_session(*extensions: str, **policy: Any) -> Session:
    session = Session(**policy)
    session.greet(*extensions)
    assert session.ready == [None]
    assert session.client.usable
    return session


# ---------------------------------------------------------------------------
# Reply parsing


def test_parser_multiline_and_split_packets() -> None:
    parser = ReplyParser()
    parser.feed(b"250-mx.test\r\n250-PIPE")
    assert parser.next_reply() is None
    parser.feed(b"LINING\r\n250 SIZE 10\r\n550 5.1.1 no\r\n")
    reply = parser.next_reply()
    assert (reply.code, reply.enhanced) == (250, "2.0.0")
    assert reply.text == "mx.test\nPIPELINING\nSIZE 10"
    reply = parser.next_reply()
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.1.1", "no")
    assert parser.next_reply() is None


def test_parser_enhanced_codes() -> None:
    parser = ReplyParser()
    parser.feed(b"550-5.1.1 first\r\n550 5.1.1 second\r\n451 4.3.0\r\n250\r\n"
                b"554 2.0.0 class mismatch\r\n")
    replies = [parser.next_reply() for _ in range(4)]
    assert [(r.code, r.enhanced, r.text) for r in replies] == [
        (550, "5.1.1", "first\nsecond"), (451, "4.3.0", ""), (250, "2.0.0", ""),
        (554, "5.0.0", "2.0.0 class mismatch")]


@pytest.mark.parametrize("data", [
    b"25 short\r\n", b"2500 long\r\n", b"250x\r\n", b"abc ok\r\n", b"150 one\r\n",
    b"650 six\r\n", b"250-a\r\n251 b\r\n", b"250 bare\rcr\r\n",
])
def test_parser_rejects_malformed(data: bytes) -> None:
    parser = ReplyParser()
    parser.feed(data)
    with pytest.raises(ReplyError):
        parser.next_reply()


def test_parser_limits() -> None:
    parser = ReplyParser()
    parser.feed(b"250-x\r\n" * 100 + b"250 x\r\n")
    with pytest.raises(ReplyError, match="lines"):
        parser.next_reply()
    parser = ReplyParser()
    parser.feed(b"250-" + b"x" * 40000 + b"\r\n250-" + b"x" * 30000 + b"\r\n")
    with pytest.raises(ReplyError, match="bytes"):
        parser.next_reply()
    parser = ReplyParser()
    parser.feed(b"250 " + b"x" * 70000)  # no line end at all
    with pytest.raises(ReplyError, match="bytes"):
        parser.next_reply()


def test_parser_accepts_a_reply_at_the_limits() -> None:
    parser = ReplyParser()
    parser.feed(b"250-x\r\n" * 99 + b"250 x\r\n")
    assert parser.next_reply().code == 250


# ---------------------------------------------------------------------------
# Handshake


def test_multiline_greeting_and_ehlo() -> None:
    session = Session()
    session.say("220-mx.test ESMTP\r\n220-welcome\r\n")
    assert session.heard() == b""
    session.say("220 ready\r\n")
    assert session.heard() == EHLO
    session.say("250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n")
    assert session.ready == []
    session.say("250-auth=LOGIN\r\n250 8BITMIME\r\n")
    assert session.ready == [None]
    assert session.client.extensions == {
        "PIPELINING": "", "SIZE": "1000", "AUTH": "LOGIN", "8BITMIME": ""}


def test_helo_fallback() -> None:
    session = Session()
    session.say(GREETING)
    assert session.heard() == EHLO
    session.say("502 5.5.1 what is EHLO\r\n")
    assert session.heard() == b"HELO relay.test\r\n"
    session.say("250 mx.test\r\n")
    assert session.ready == [None]
    assert session.client.extensions == {}
    d = outcome(session.client.send(message()))
    assert session.heard() == b"MAIL FROM:<a@b.example>\r\n"  # no SIZE without EHLO
    session.say("250 ok\r\n")
    assert session.heard() == b"RCPT TO:<c@d.example>\r\n"
    session.say("250 ok\r\n")
    assert session.heard() == b"DATA\r\n"
    session.say("354 go\r\n")
    assert session.heard() == b"hello\r\n.\r\n"
    session.say("250 ok\r\n")
    assert [r.status for r in d[0]] == [DELIVERED]


@pytest.mark.parametrize("reply", ["421 4.3.2 busy\r\n", "554 no service here\r\n"])
def test_bad_greeting_is_transient_and_keeps_the_peer_reply(reply: str) -> None:
    session = Session()
    session.say(reply)
    result = failure_result(session.ready)
    assert result.status == TRANSIENT
    assert result.code == int(reply[:3])
    assert result.enhanced.startswith("4.")
    assert result.text == reply[4:].strip().removeprefix("4.3.2 ")
    assert result.remote == REMOTE
    assert session.heard() == b"QUIT\r\n"
    assert session.transport.disconnecting
    assert not session.client.usable


def test_ehlo_and_helo_refused() -> None:
    session = Session()
    session.say(GREETING)
    session.say("550 no\r\n")
    session.say("550 5.7.1 go away\r\n")
    result = failure_result(session.ready)
    assert (result.status, result.code, result.enhanced) == (TRANSIENT, 550, "4.7.1")


def test_malformed_reply_fails_the_session() -> None:
    session = Session()
    session.say("220 mx\r\n")
    session.say("2xx nonsense\r\n")
    result = failure_result(session.ready)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.5.0")
    assert session.aborted


def test_reply_over_100_lines_fails_the_session() -> None:
    session = Session()
    session.say(GREETING)
    session.heard()
    session.say(b"250-x\r\n" * 100 + b"250 x\r\n")
    result = failure_result(session.ready)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.5.0")
    assert "100 lines" in result.text
    assert session.aborted


def test_unsolicited_reply_ends_the_session() -> None:
    session = ready_session()
    session.say("421 4.3.2 shutting down\r\n")
    assert not session.client.usable
    failed = outcome(session.client.send(message()))
    assert failure_result(failed).code == 421


def test_helo_name_and_policy_are_checked() -> None:
    with pytest.raises(ValueError):
        make_policy(helo_name="relay.test\r\nRCPT TO:<x@y>")
    with pytest.raises(ValueError):
        make_policy(tls="sometimes")
    with pytest.raises(ValueError):
        make_policy(tls="verify", tls_hostname="")


# ---------------------------------------------------------------------------
# STARTTLS and AUTH


def test_starttls_response_injection_is_discarded() -> None:
    session = Session(tls="opportunistic", username="u", password="p")
    session.greet("STARTTLS")
    assert session.heard() == b"STARTTLS\r\n"
    # A forged "250 AUTH PLAIN" in the same packet as the 220 must not count as the
    # post-TLS EHLO reply (twisted.mail defect 16).
    session.say("220 go ahead\r\n250 AUTH PLAIN\r\n")
    assert session.transport.tls_options is not None
    assert session.heard() == EHLO
    assert session.ready == []
    session.say(ehlo_reply("SIZE 100"))  # the real reply, through TLS: no AUTH offered
    result = failure_result(session.ready)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.7.0")
    assert b"AUTH" not in session.heard()
    assert session.client.extensions == {"SIZE": "100"}


def test_starttls_then_new_extension_list() -> None:
    session = Session(tls="opportunistic")
    session.greet("STARTTLS", "SIZE 10", "PIPELINING")
    session.start_tls("SIZE 2000")
    assert session.ready == [None]
    assert session.client.extensions == {"SIZE": "2000"}
    assert session.client.tls_version == "TLS"  # encrypted; the fake transport has no version
    assert isinstance(session.transport.tls_options, CertificateOptions)
    assert session.transport.tls_options.verify is False
    d = outcome(session.client.send(message()))
    assert session.heard() == b"MAIL FROM:<a@b.example> SIZE=5\r\n"  # no pipelining any more
    session.say("250 ok\r\n")
    session.say("250 ok\r\n")
    session.say("354 go\r\n")
    session.say("250 2.0.0 done\r\n")
    assert d[0][0].tls == "TLS"


def test_verify_uses_a_verifying_context() -> None:
    session = Session(tls="verify", tls_hostname="smarthost.example")
    session.greet("STARTTLS")
    session.start_tls()
    assert session.ready == [None]
    # optionsForClientTLS: a connection creator that checks the name (the loopback
    # tests below show a wrong name failing).
    assert IOpenSSLClientConnectionCreator.providedBy(session.transport.tls_options)
    assert not isinstance(session.transport.tls_options, CertificateOptions)


@pytest.mark.parametrize("mode", ["require", "verify"])
def test_required_tls_not_offered(mode: str) -> None:
    session = Session(tls=mode)
    session.greet("SIZE 100")
    result = failure_result(session.ready)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.7.5")
    assert "not offered" in result.text
    assert session.heard() == b"QUIT\r\n"


def test_required_tls_refused() -> None:
    session = Session(tls="require")
    session.greet("STARTTLS")
    assert session.heard() == b"STARTTLS\r\n"
    session.say("454 4.7.0 TLS not available\r\n")
    result = failure_result(session.ready)
    assert (result.status, result.enhanced, result.code) == (TRANSIENT, "4.7.5", 454)
    assert session.transport.tls_options is None


def test_opportunistic_tls_refused_goes_on_in_plaintext() -> None:
    session = Session(tls="opportunistic")
    session.greet("STARTTLS", "PIPELINING")
    session.say("454 4.7.0 TLS not available\r\n")
    assert session.ready == [None]
    assert session.client.tls_version is None
    assert session.client.extensions == {"STARTTLS": "", "PIPELINING": ""}


def test_opportunistic_without_starttls() -> None:
    session = Session(tls="opportunistic")
    session.greet("SIZE 100")
    assert session.ready == [None]
    assert session.heard() == b""


def test_none_never_starts_tls() -> None:
    session = Session(tls="none")
    session.greet("STARTTLS")
    assert session.ready == [None]
    assert session.heard() == b""


def test_tls_handshake_failure() -> None:
    session = Session(tls="opportunistic")
    session.greet("STARTTLS")
    session.heard()
    session.say("220 go\r\n")
    assert session.heard() == EHLO
    session.lose()  # before the EHLO reply: the handshake failed
    result = failure_result(session.ready)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.7.5")
    assert "TLS handshake failed" in result.text


@pytest.mark.parametrize("mode", ["none", "opportunistic"])
def test_auth_never_without_tls(mode: str) -> None:
    session = Session(tls=mode, username="u", password="p")
    session.greet("AUTH PLAIN LOGIN")
    result = failure_result(session.ready)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.7.0")
    assert b"AUTH" not in session.heard()


def test_auth_plain() -> None:
    session = Session(tls="require", username="alice", password="s3cret")
    session.greet("STARTTLS")
    session.start_tls("AUTH LOGIN PLAIN")
    token = base64.b64encode(b"\0alice\0s3cret").decode()
    assert session.heard() == f"AUTH PLAIN {token}\r\n".encode()
    assert session.ready == []
    session.say("235 2.7.0 ok\r\n")
    assert session.ready == [None]


def test_auth_login() -> None:
    session = Session(tls="require", username="alice", password="s3cret")
    session.greet("STARTTLS")
    session.start_tls("AUTH LOGIN")
    assert session.heard() == b"AUTH LOGIN\r\n"
    session.say("334 VXNlcm5hbWU6\r\n")
    assert session.heard() == b"YWxpY2U=\r\n"
    session.say("334 UGFzc3dvcmQ6\r\n")
    assert session.heard() == b"czNjcmV0\r\n"
    session.say("235 2.7.0 ok\r\n")
    assert session.ready == [None]


def test_auth_rejected_is_transient() -> None:
    session = Session(tls="require", username="alice", password="wrong")
    session.greet("STARTTLS")
    session.start_tls("AUTH PLAIN")
    session.heard()
    session.say("535 5.7.8 bad credentials\r\n")
    result = failure_result(session.ready)
    assert (result.status, result.enhanced, result.code) == (TRANSIENT, "4.7.8", 535)
    assert result.tls == "TLS"


def test_auth_without_a_known_mechanism() -> None:
    session = Session(tls="require", username="alice", password="p")
    session.greet("STARTTLS")
    session.start_tls("AUTH CRAM-MD5")
    result = failure_result(session.ready)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.7.0")


# ---------------------------------------------------------------------------
# Transactions


def test_pipelined_transaction_bytes() -> None:
    session = ready_session("PIPELINING", "SIZE 1000")
    msg = message(b"hello")
    d = outcome(session.client.send(msg))
    assert session.heard() == (b"MAIL FROM:<a@b.example> SIZE=5\r\n"
                               b"RCPT TO:<c@d.example>\r\nDATA\r\n")
    assert not session.client.usable
    session.say("250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
    assert msg.read_chunk.calls == 0
    session.say("354 go ahead\r\n")
    assert session.heard() == b"hello\r\n.\r\n"
    assert d == []
    session.say("250 2.0.0 queued as 1234\r\n")
    assert d == [[DeliveryResult(DELIVERED, "2.0.0", "queued as 1234", code=250,
                                 remote=REMOTE, tls=None, handoff=RELAYED)]]
    assert session.client.usable


def test_non_pipelined_ordering() -> None:
    session = ready_session("SIZE 1000")
    d = outcome(session.client.send(message(recipients=("c@d.example", "e@f.example"))))
    assert session.heard() == b"MAIL FROM:<a@b.example> SIZE=5\r\n"
    session.say("250 ok\r\n")
    assert session.heard() == b"RCPT TO:<c@d.example>\r\n"
    session.say("250 ok\r\n")
    assert session.heard() == b"RCPT TO:<e@f.example>\r\n"
    session.say("250 ok\r\n")
    assert session.heard() == b"DATA\r\n"
    session.say("354 go\r\n")
    assert session.heard() == b"hello\r\n.\r\n"
    session.say("250 ok\r\n")
    assert [r.status for r in d[0]] == [DELIVERED, DELIVERED]


def test_per_recipient_results() -> None:
    session = ready_session("PIPELINING")
    rcpts = ("ok@d.example", "later@d.example", "gone@d.example")
    d = outcome(session.client.send(message(recipients=rcpts)))
    assert session.heard().count(b"RCPT TO:") == 3
    session.say("250 2.1.0 ok\r\n250 2.1.5 ok\r\n450 4.2.1 mailbox busy\r\n"
                "550-5.1.1 no such user\r\n550 5.1.1 really\r\n354 go\r\n")
    assert session.heard() == b"hello\r\n.\r\n"
    session.say("250 2.0.0 queued\r\n")
    assert d[0] == [
        DeliveryResult(DELIVERED, "2.0.0", "queued", 250, REMOTE, handoff=RELAYED),
        DeliveryResult(TRANSIENT, "4.2.1", "mailbox busy", 450, REMOTE),
        DeliveryResult(PERMANENT, "5.1.1", "no such user really", 550, REMOTE),
    ]


def test_final_reply_applies_to_accepted_recipients_only() -> None:
    session = ready_session()
    d = outcome(session.client.send(message(recipients=("a@x", "b@x"))))
    for reply in ("250 ok", "250 ok", "550 5.1.1 no", "354 go"):
        session.say(reply + "\r\n")
    session.say("452 4.3.1 disk full\r\n")
    assert [(r.status, r.enhanced) for r in d[0]] == [
        (TRANSIENT, "4.3.1"), (PERMANENT, "5.1.1")]
    assert session.client.usable


@pytest.mark.parametrize("pipelining", [True, False])
def test_no_recipient_accepted(pipelining: bool) -> None:
    session = ready_session(*(["PIPELINING"] if pipelining else []))
    msg = message(recipients=("a@x", "b@x"))
    d = outcome(session.client.send(msg))
    session.say("250 ok\r\n550 5.1.1 no\r\n")
    session.say("450 4.2.0 later\r\n")
    if pipelining:
        session.say("554 5.5.1 no valid recipients\r\n")
    written = session.heard()
    assert written.endswith(b"RSET\r\n")
    assert written.count(b"DATA") == (1 if pipelining else 0)
    assert d == []
    session.say("250 2.0.0 reset\r\n")
    assert [r.status for r in d[0]] == [PERMANENT, TRANSIENT]
    assert msg.read_chunk.calls == 0
    assert session.client.usable


@pytest.mark.parametrize("pipelining", [True, False])
def test_mail_rejected(pipelining: bool) -> None:
    session = ready_session(*(["PIPELINING"] if pipelining else []))
    msg = message(recipients=("a@x", "b@x"))
    d = outcome(session.client.send(msg))
    session.say("553 5.1.7 bad sender\r\n")
    if pipelining:
        session.say("503 5.5.1 need MAIL\r\n" * 2 + "503 5.5.1 need MAIL\r\n")
    assert session.heard().endswith(b"RSET\r\n")
    session.say("250 ok\r\n")
    assert [(r.status, r.enhanced, r.code) for r in d[0]] == [(PERMANENT, "5.1.7", 553)] * 2
    assert msg.read_chunk.calls == 0


def test_data_refused() -> None:
    session = ready_session("PIPELINING")
    msg = message(recipients=("a@x", "b@x"))
    d = outcome(session.client.send(msg))
    session.heard()
    session.say("250 ok\r\n250 ok\r\n550 5.1.1 no\r\n451 4.3.0 try later\r\n")
    assert session.heard() == b"RSET\r\n"
    session.say("250 ok\r\n")
    assert [(r.status, r.enhanced) for r in d[0]] == [(TRANSIENT, "4.3.0"), (PERMANENT, "5.1.1")]
    assert msg.read_chunk.calls == 0


def test_data_accepted_without_recipients_drops_the_connection() -> None:
    session = ready_session("PIPELINING")
    msg = message()
    d = outcome(session.client.send(msg))
    session.heard()
    session.say("250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert [r.status for r in d[0]] == [PERMANENT]
    assert session.heard() == b""  # not even an empty message
    assert session.aborted
    assert not session.client.usable


def test_size_too_big() -> None:
    session = ready_session("SIZE 1000", "PIPELINING")
    d = outcome(session.client.send(message(size=1001, recipients=("a@x", "b@x"))))
    assert session.heard() == b""
    assert [(r.status, r.enhanced, r.text) for r in d[0]] == [
        (PERMANENT, "5.3.4", "message too big for the next hop")] * 2
    assert session.client.usable


def test_size_zero_means_no_limit() -> None:
    session = ready_session("SIZE 0")
    outcome(session.client.send(message(size=10**9)))
    assert session.heard() == b"MAIL FROM:<a@b.example> SIZE=1000000000\r\n"


def test_smtputf8_missing() -> None:
    session = ready_session("SIZE 1000")
    d = outcome(session.client.send(message(recipients=("jörg@d.example",), smtputf8=True)))
    assert session.heard() == b""
    assert [(r.status, r.enhanced) for r in d[0]] == [(PERMANENT, "5.6.7")]


def test_smtputf8_and_8bitmime_parameters() -> None:
    session = ready_session("SMTPUTF8", "8BITMIME")
    outcome(session.client.send(message(sender="jörg@b.example", smtputf8=True,
                                        eight_bit=True)))
    assert session.heard() == "MAIL FROM:<jörg@b.example> BODY=8BITMIME SMTPUTF8\r\n".encode()


def test_eight_bit_without_8bitmime_is_sent_anyway() -> None:
    session = ready_session()
    outcome(session.client.send(message(eight_bit=True)))
    assert session.heard() == b"MAIL FROM:<a@b.example>\r\n"


def test_dsn_parameters_only_when_offered() -> None:
    kw = {"rcpt_params": ({"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;c@d.example"},),
          "mail_params": {"RET": "HDRS", "ENVID": "QQ314159"}}
    session = ready_session("PIPELINING", "DSN")
    outcome(session.client.send(message(**kw)))
    assert session.heard() == (b"MAIL FROM:<a@b.example> RET=HDRS ENVID=QQ314159\r\n"
                               b"RCPT TO:<c@d.example> NOTIFY=FAILURE,DELAY"
                               b" ORCPT=rfc822;c@d.example\r\nDATA\r\n")
    session = ready_session("PIPELINING")
    outcome(session.client.send(message(**kw)))
    assert session.heard() == b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"


@pytest.mark.parametrize("extensions,handoff", [(("PIPELINING", "DSN"), PASSED_ON),
                                                (("PIPELINING",), RELAYED)])
def test_delivered_result_says_whether_the_next_hop_took_the_dsn_parameters(
        extensions: tuple[str, ...], handoff: str) -> None:
    session = ready_session(*extensions)
    d = outcome(session.client.send(message(recipients=("c@d.example", "e@d.example"),
                                            rcpt_params=({"NOTIFY": "SUCCESS"}, {}))))
    wire = session.heard()
    assert (b" NOTIFY=SUCCESS\r\n" in wire) == ("DSN" in extensions)
    session.say("250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
    session.heard()
    session.say("250 2.0.0 queued as 4XyZ\r\n")
    assert [(r.status, r.handoff, r.diagnostic) for r in d[0]] == [
        (DELIVERED, handoff, "250 2.0.0 queued as 4XyZ"), (PERMANENT, FINAL, "550 5.1.1 no")]


def test_null_sender() -> None:
    session = ready_session()
    outcome(session.client.send(message(sender="")))
    assert session.heard() == b"MAIL FROM:<>\r\n"


@pytest.mark.parametrize("field", ["sender", "recipient", "param"])
@pytest.mark.parametrize("bad", ["\r", "\n", "\0"])
def test_no_cr_lf_nul_in_commands(field: str, bad: str) -> None:
    session = ready_session("DSN")
    kw: dict[str, Any] = {"sender": "a@b.example", "recipients": ("c@d.example",)}
    if field == "sender":
        kw["sender"] = f"a{bad}@b.example"
    elif field == "recipient":
        kw["recipients"] = (f"c@d.example>{bad}DATA",)
    else:
        kw["mail_params"] = {"ENVID": f"x{bad}y"}
    with pytest.raises(ValueError):
        session.client.send(message(**kw))
    assert session.heard() == b""
    assert session.client.usable  # nothing was sent: the session is intact


def test_non_ascii_without_smtputf8_is_refused() -> None:
    session = ready_session("SMTPUTF8")
    with pytest.raises(ValueError):
        session.client.send(message(recipients=("jörg@d.example",)))


def test_dot_stuffing_across_a_chunk_boundary() -> None:
    session = ready_session("PIPELINING")
    msg = message(b"a" * 16382 + b"\r\n", b".\r\nMAIL FROM:<evil@x>\r\n")
    d = outcome(session.client.send(msg))
    session.heard()
    session.say("250 ok\r\n250 ok\r\n354 go\r\n")
    wire = session.heard()
    assert b"\r\n..\r\nMAIL FROM" in wire
    assert wire.count(b"\r\n.\r\n") == 1
    assert wire.endswith(b"MAIL FROM:<evil@x>\r\n.\r\n")
    session.say("250 ok\r\n")
    assert d[0][0].status == DELIVERED


def test_bare_lf_goes_out_as_crlf() -> None:
    session = ready_session("PIPELINING")
    outcome(session.client.send(message(b"line1\nline2\n.\nend\r", b"\nlast")))
    session.heard()
    session.say("250 ok\r\n250 ok\r\n354 go\r\n")
    wire = session.heard()
    assert wire == b"line1\r\nline2\r\n..\r\nend\r\nlast\r\n.\r\n"
    assert wire.count(b"\n") == wire.count(b"\r\n") == wire.count(b"\r")


def test_data_waits_for_the_transport_to_drain() -> None:
    session = ready_session("PIPELINING")
    first, second = defer.Deferred(), defer.Deferred()
    msg = message(first, second)
    d = outcome(session.client.send(msg))
    session.say("250 ok\r\n250 ok\r\n354 go\r\n")
    session.heard()
    producer = session.transport.producer
    assert session.transport.streaming is True
    producer.pauseProducing()  # the transport's buffer is full
    first.callback(b"one\r\n")
    assert session.heard() == b"one\r\n"
    session.clock.advance(8)  # less than data_block
    assert msg.read_chunk.calls == 1  # nothing more read while paused
    producer.resumeProducing()
    assert msg.read_chunk.calls == 2
    session.clock.advance(8)  # 16 s in all: the timer restarted with the next chunk
    assert d == []
    producer.pauseProducing()
    second.callback(b"two\r\n")
    producer.resumeProducing()
    assert session.heard() == b"two\r\n.\r\n"
    assert session.transport.producer is None  # unregistered after the dot
    session.say("250 ok\r\n")
    assert d[0][0].status == DELIVERED


def test_data_block_timeout_while_the_transport_does_not_drain() -> None:
    session = ready_session("PIPELINING")
    d = outcome(session.client.send(message(b"one\r\n", b"two\r\n")))
    session.transport.registerProducer = _registering_paused(session.transport)
    session.say("250 ok\r\n250 ok\r\n354 go\r\n")
    assert session.heard().endswith(b"one\r\n")
    session.clock.advance(9)
    assert failure_result(d).text == "timeout sending message data"
    assert session.aborted


def _registering_paused(transport: TLSStringTransport) -> Any:
    register = transport.registerProducer

    def registering(producer: Any, streaming: bool) -> None:
        register(producer, streaming)
        producer.pauseProducing()

    return registering


def test_unreadable_message_aborts_without_a_final_dot() -> None:
    session = ready_session("PIPELINING")
    msg = message(b"first\r\n", defer.fail(OSError("disk gone")))
    d = outcome(session.client.send(msg))
    session.heard()
    session.say("250 ok\r\n250 ok\r\n354 go\r\n")
    assert session.heard() == b"first\r\n"
    result = failure_result(d)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.3.0")
    assert session.aborted


def test_connection_lost_after_the_dot() -> None:
    session = ready_session("PIPELINING")
    d = outcome(session.client.send(message()))
    session.say("250 ok\r\n250 ok\r\n354 go\r\n")
    assert session.heard().endswith(b"hello\r\n.\r\n")
    session.lose()
    result = failure_result(d)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.4.2")
    assert result.text == "connection lost during end of DATA"
    assert session.heard() == b""  # never resent
    assert not session.client.usable


def test_connection_lost_mid_pipeline() -> None:
    session = ready_session("PIPELINING")
    d = outcome(session.client.send(message()))
    session.say("250 ok\r\n")
    session.lose(error.ConnectionDone)
    assert failure_result(d).text == "connection lost during RCPT TO"


def test_two_transactions_on_one_connection() -> None:
    session = ready_session("PIPELINING")
    first = outcome(session.client.send(message(recipients=("x@y",))))
    session.say("250 ok\r\n550 no\r\n554 no valid recipients\r\n250 reset\r\n")
    assert first[0][0].status == PERMANENT
    session.heard()
    second = outcome(session.client.send(message()))
    assert session.heard().startswith(b"MAIL FROM:")
    session.say("250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
    assert second[0][0].status == DELIVERED


def test_send_while_busy_is_an_error() -> None:
    session = ready_session()
    session.client.send(message())
    with pytest.raises(RuntimeError):
        session.client.send(message())


def test_quit() -> None:
    session = ready_session()
    done = outcome(session.client.quit())
    assert session.heard() == b"QUIT\r\n"
    assert not session.client.usable
    session.say("221 2.0.0 bye\r\n")
    assert session.transport.disconnecting
    assert done == []
    session.lose(error.ConnectionDone)
    assert done == [None]
    assert outcome(session.client.quit()) == [None]


def test_421_mid_transaction_ends_reuse() -> None:
    session = ready_session("PIPELINING")
    d = outcome(session.client.send(message(recipients=("a@x", "b@x"))))
    session.say("250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n354 go\r\n")
    session.say("250 2.0.0 queued\r\n")
    assert [r.status for r in d[0]] == [DELIVERED, TRANSIENT]
    assert not session.client.usable


def test_starttls_that_raises_never_sends_ehlo() -> None:
    session = Session(tls="opportunistic")
    session.greet("STARTTLS")
    session.heard()

    def broken(options: Any) -> None:
        raise RuntimeError("no TLS here")

    session.transport.startTLS = broken  # type: ignore[method-assign]
    session.say("220 go\r\n")
    result = failure_result(session.ready)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.7.5")
    assert session.heard() == b""
    assert session.aborted


@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::1"])
def test_connect_in_memory(host: str) -> None:
    reactor = MemoryReactorClock()
    connected = outcome(connect(reactor, host, 2525, make_policy(), REMOTE))
    [(address, port, factory, timeout, _)] = reactor.tcpClients
    assert (address, port, timeout) == (host, 2525, TIMEOUTS.connect)
    transport = TLSStringTransport()
    wrapper = factory.buildProtocol(None)
    wrapper.makeConnection(transport)
    wrapper.dataReceived(GREETING)
    assert transport.value() == EHLO
    assert connected == []
    wrapper.dataReceived(ehlo_reply("SIZE 100"))
    [client] = connected
    assert isinstance(client, SMTPClientProtocol) and client.usable
    assert client.remote == REMOTE


def test_connect_failure_in_memory() -> None:
    reactor = MemoryReactorClock()
    connected = outcome(connect(reactor, "192.0.2.1", 25, make_policy(), REMOTE))
    [(_, _, factory, _, _)] = reactor.tcpClients
    factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    result = failure_result(connected)
    assert (result.status, result.enhanced, result.remote) == (TRANSIENT, "4.4.1", REMOTE)
    assert result.text.startswith("connection refused/failed: ")


def test_connect_greeting_refused_in_memory() -> None:
    reactor = MemoryReactorClock()
    connected = outcome(connect(reactor, "192.0.2.1", 25, make_policy(), REMOTE))
    wrapper = reactor.tcpClients[0][2].buildProtocol(None)
    wrapper.makeConnection(TLSStringTransport())
    wrapper.dataReceived(b"554 5.7.1 not you\r\n")
    result = failure_result(connected)
    assert (result.status, result.code, result.text) == (TRANSIENT, 554, "not you")


# ---------------------------------------------------------------------------
# Timeouts: each stage with its own timer (RFC 5321 4.5.3.2)


def _to_greeting(s: Session) -> list[Any]:
    return s.ready


def _to_ehlo(s: Session) -> list[Any]:
    s.say(GREETING)
    return s.ready


def _to_helo(s: Session) -> list[Any]:
    s.say(GREETING)
    s.say("500 no EHLO\r\n")
    return s.ready


def _to_starttls(s: Session) -> list[Any]:
    s.greet("STARTTLS")
    return s.ready


def _to_tls_ehlo(s: Session) -> list[Any]:
    s.greet("STARTTLS")
    s.say("220 go\r\n")
    return s.ready


def _to_auth(s: Session) -> list[Any]:
    s.greet("STARTTLS")
    s.start_tls("AUTH PLAIN")
    return s.ready


def _sending(s: Session, *replies: str, chunks: tuple[Any, ...] = (), **kw: Any) -> list[Any]:
    s.greet()
    d = outcome(s.client.send(message(*chunks, **kw)))
    for reply in replies:
        s.say(reply + "\r\n")
    return d


TIMEOUT_CASES = {
    # stage: (policy, driver, seconds)
    "greeting": ({}, _to_greeting, 2),
    "EHLO": ({}, _to_ehlo, 3),
    "HELO": ({}, _to_helo, 3),
    "STARTTLS": ({"tls": "require"}, _to_starttls, 4),
    "EHLO after STARTTLS": ({"tls": "require"}, _to_tls_ehlo, 3),
    "AUTH": ({"tls": "require", "username": "u", "password": "p"}, _to_auth, 5),
    "MAIL FROM": ({}, lambda s: _sending(s), 6),
    "RCPT TO": ({}, lambda s: _sending(s, "250 ok"), 7),
    "DATA": ({}, lambda s: _sending(s, "250 ok", "250 ok"), 8),
    "message data": ({}, lambda s: _sending(s, "250 ok", "250 ok", "354 go",
                                            chunks=(b"first\r\n", defer.Deferred())), 9),
    "end of DATA": ({}, lambda s: _sending(s, "250 ok", "250 ok", "354 go"), 10),
}


@pytest.mark.parametrize("stage", list(TIMEOUT_CASES))
def test_timeouts(stage: str) -> None:
    policy, driver, seconds = TIMEOUT_CASES[stage]
    session = Session(**policy)
    out = driver(session)
    session.clock.advance(seconds - 0.5)
    assert out == [] and not session.aborted
    session.clock.advance(0.5)
    result = failure_result(out)
    assert (result.status, result.enhanced) == (TRANSIENT, "4.4.2")
    name = stage.removesuffix(" after STARTTLS")
    expected = ("timeout sending message data" if stage == "message data"
                else f"timeout waiting for {name} reply")
    assert result.text == expected
    assert session.aborted
    assert not session.client.usable
    assert session.clock.getDelayedCalls() == []


PIPELINED_TIMEOUTS = DeliveryTimeouts(mail=30, rcpt=20, data_init=5, data_block=15,
                                      data_done=40)


@pytest.mark.parametrize(("replies", "seconds", "stage"), [
    ((), 30, "MAIL FROM"),
    (("250 ok",), 20, "RCPT TO"),
    (("250 ok", "250 ok"), 5, "DATA"),  # shorter than the RCPT timer it follows
    (("250 ok", "250 ok", "354 go"), 40, "end of DATA"),
])
def test_pipelined_stage_timeouts_count_from_the_previous_reply(
        replies: tuple[str, ...], seconds: float, stage: str) -> None:
    session = ready_session("PIPELINING", timeouts=PIPELINED_TIMEOUTS)
    session.clock.advance(100)
    out = outcome(session.client.send(message()))
    for reply in replies:
        session.clock.advance(1)
        session.say(reply + "\r\n")
    assert len(session.clock.getDelayedCalls()) == 1  # one timer, moved from stage to stage
    session.clock.advance(seconds - 0.5)
    assert out == [] and not session.aborted
    session.clock.advance(0.5)
    result = failure_result(out)
    assert result.text == f"timeout waiting for {stage} reply"
    assert session.clock.getDelayedCalls() == []


def test_pipelined_transaction_leaves_no_timer_behind() -> None:
    session = ready_session("PIPELINING")
    out = outcome(session.client.send(message()))
    session.say("250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
    assert [r.status for r in out[0]] == [DELIVERED]
    assert session.clock.getDelayedCalls() == []


def test_rset_timeout_keeps_the_results() -> None:
    session = ready_session()
    d = outcome(session.client.send(message()))
    session.say("250 ok\r\n550 5.1.1 no\r\n")
    assert session.heard().endswith(b"RSET\r\n")
    session.clock.advance(6)
    assert [r.status for r in d[0]] == [PERMANENT]
    assert session.aborted
    assert not session.client.usable


def test_quit_timeout_aborts_and_never_fails() -> None:
    session = ready_session()
    done = outcome(session.client.quit())
    session.clock.advance(11)
    assert session.aborted
    session.lose()
    assert done == [None]


def test_idle_connection_has_no_timer() -> None:
    session = ready_session()
    assert session.clock.getDelayedCalls() == []


# ---------------------------------------------------------------------------
# Real loopback sessions against aiosmtpd

MX = "mx.example.test"
LOOP_TIMEOUT = 15  # seconds; a wedged test fails instead of hanging


@pytest.fixture
def reactor() -> Any:
    # The global reactor, which pytest-twisted installed before any test ran.
    from twisted.internet import reactor

    return reactor


class Sink:
    """An aiosmtpd handler that keeps what it receives."""

    def __init__(self, pipelining: bool = False) -> None:
        self.pipelining = pipelining
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 OK queued"


class EphemeralController(Controller):
    """aiosmtpd 1.4.6 cannot use port 0 as is: start() connects to ``self.port`` to
    wake the server up. Read the port the listener was given before that."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def smtpd() -> Generator[Any, None, None]:
    """Start aiosmtpd servers on 127.0.0.1; every one is stopped at teardown."""
    controllers: list[Controller] = []

    def start(handler: Sink, **kw: Any) -> int:
        controller = EphemeralController(handler, hostname="127.0.0.1", port=0,
                                         server_hostname=MX, decode_data=False, **kw)
        controller.start()
        controllers.append(controller)
        return controller.port

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
def clients(reactor: Any) -> Generator[list[SMTPClientProtocol], None, None]:
    """Client protocols to close at teardown, so that no connection outlives its test."""
    protocols: list[SMTPClientProtocol] = []
    yield protocols
    closing = [p.quit().addTimeout(LOOP_TIMEOUT, reactor) for p in protocols]
    pytest_twisted.blockon(defer.DeferredList(closing))


def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(MX).configure_cert(context)
    return context


def loop_policy(**kw: Any) -> ClientPolicy:
    kw.setdefault("tls", "none")
    kw.setdefault("tls_hostname", MX)
    kw.setdefault("timeouts", DeliveryTimeouts(connect=5, greeting=10, helo=10, starttls=10,
                                               auth=10, mail=10, rcpt=10, data_init=10,
                                               data_block=10, data_done=10, quit=5))
    return make_policy(**kw)


def spooled(content: bytes, reactor: Any, chunk_size: int = 16384,
            recipients: tuple[str, ...] = ("rcpt@example.test",)) -> OutboundMessage:
    """A message whose chunks arrive later, like reads off the reactor thread."""
    offsets = iter(range(0, len(content) + 1, chunk_size))

    def read_chunk() -> defer.Deferred[bytes]:
        start = next(offsets, len(content))
        return deferLater(reactor, 0, lambda: content[start:start + chunk_size])

    return OutboundMessage(sender="sender@example.test", recipients=recipients,
                           rcpt_params=(), size=len(content), read_chunk=read_chunk)


@defer.inlineCallbacks
def open_client(reactor: Any, clients: list[SMTPClientProtocol], port: int,
                policy: ClientPolicy) -> Generator[Any, Any, SMTPClientProtocol]:
    client = yield connect(reactor, "127.0.0.1", port, policy,
                           f"{MX}[127.0.0.1]:{port}").addTimeout(LOOP_TIMEOUT, reactor)
    clients.append(client)
    return client


def boundary_message() -> bytes:
    line = b"x" * 62 + b"\r\n"
    content = b"Subject: dots\r\n\r\n" + line * 300
    content = content[:16384 - 2] + b"\r\n"  # the next byte starts a line at 16 KiB
    assert len(content) == 16384
    return content + b".\r\nMAIL FROM:<evil@x>\r\n.. two dots\r\n.\r\nend\r\n"


@pytest_twisted.inlineCallbacks
def test_loopback_plain_delivery_is_byte_exact(reactor: Any, smtpd: Any,
                                               clients: list[Any]) -> Generator[Any, Any, None]:
    sink = Sink()
    port = smtpd(sink)
    client = yield open_client(reactor, clients, port, loop_policy())
    content = boundary_message()
    results = yield client.send(spooled(content, reactor)).addTimeout(LOOP_TIMEOUT, reactor)
    assert [(r.status, r.code, r.text) for r in results] == [(DELIVERED, 250, "OK queued")]
    assert results[0].tls is None
    assert results[0].remote == f"{MX}[127.0.0.1]:{port}"
    assert sink.messages == [("sender@example.test", ["rcpt@example.test"], content)]


@pytest_twisted.inlineCallbacks
def test_loopback_pipelined_large_message(reactor: Any, smtpd: Any,
                                          clients: list[Any]) -> Generator[Any, Any, None]:
    sink = Sink(pipelining=True)
    port = smtpd(sink)
    client = yield open_client(reactor, clients, port, loop_policy())
    assert "PIPELINING" in client.extensions
    content = b"".join(b"%07d " % i + b"y" * 90 + b"\r\n" for i in range(40000))  # ~4 MB
    rcpts = ("one@example.test", "two@example.test")
    for _ in range(2):  # the connection is reusable
        results = yield client.send(spooled(content, reactor, 65536, rcpts)).addTimeout(
            LOOP_TIMEOUT, reactor)
        assert [r.status for r in results] == [DELIVERED, DELIVERED]
    assert [m[2] == content for m in sink.messages] == [True, True]
    assert sink.messages[0][1] == list(rcpts)


@pytest_twisted.inlineCallbacks
def test_loopback_starttls_verified(reactor: Any, smtpd: Any, clients: list[Any],
                                    ca: trustme.CA) -> Generator[Any, Any, None]:
    sink = Sink()
    port = smtpd(sink, tls_context=tls_server_context(ca), require_starttls=True)
    trust = Certificate.loadPEM(ca.cert_pem.bytes())
    client = yield open_client(reactor, clients, port, loop_policy(tls="verify",
                                                                   trust_root=trust))
    assert client.tls_version in ("TLSv1.2", "TLSv1.3")
    assert "STARTTLS" not in client.extensions
    content = boundary_message() * 64  # 1 MiB through the TLS layer's flow control
    results = yield client.send(spooled(content, reactor)).addTimeout(LOOP_TIMEOUT, reactor)
    assert results[0].status == DELIVERED
    assert results[0].tls == client.tls_version
    assert [m[2] for m in sink.messages] == [content]


@pytest_twisted.inlineCallbacks
def test_loopback_starttls_wrong_name(reactor: Any, smtpd: Any, clients: list[Any],
                                      ca: trustme.CA) -> Generator[Any, Any, None]:
    sink = Sink()
    port = smtpd(sink, tls_context=tls_server_context(ca), require_starttls=True)
    trust = Certificate.loadPEM(ca.cert_pem.bytes())
    policy = loop_policy(tls="verify", tls_hostname="wrong.example.test", trust_root=trust)
    with pytest.raises(SessionFailure) as caught:
        yield open_client(reactor, clients, port, policy)
    result = caught.value.result
    assert (result.status, result.enhanced) == (TRANSIENT, "4.7.5")
    assert "verification failed" in result.text
    assert sink.messages == []


@pytest_twisted.inlineCallbacks
def test_loopback_starttls_untrusted(reactor: Any, smtpd: Any, clients: list[Any],
                                     ca: trustme.CA) -> Generator[Any, Any, None]:
    sink = Sink()
    port = smtpd(sink, tls_context=tls_server_context(ca), require_starttls=True)
    other = Certificate.loadPEM(trustme.CA().cert_pem.bytes())
    with pytest.raises(SessionFailure) as caught:
        yield open_client(reactor, clients, port, loop_policy(tls="verify", trust_root=other))
    assert caught.value.result.enhanced == "4.7.5"
    assert "verification failed" in caught.value.result.text
    assert sink.messages == []


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                  auth_data: Any) -> AuthResult:
    # handled=False: aiosmtpd itself then answers a failure with 535 5.7.8.
    ok = (auth_data.login, auth_data.password) == (b"alice", b"s3cret")
    return AuthResult(success=ok, handled=False)


@pytest_twisted.inlineCallbacks
def test_loopback_auth_plain_over_starttls(reactor: Any, smtpd: Any, clients: list[Any],
                                           ca: trustme.CA) -> Generator[Any, Any, None]:
    sink = Sink()
    port = smtpd(sink, tls_context=tls_server_context(ca), auth_require_tls=True,
                 authenticator=authenticator, auth_required=True)
    trust = Certificate.loadPEM(ca.cert_pem.bytes())
    policy = loop_policy(tls="verify", trust_root=trust, username="alice", password="s3cret")
    client = yield open_client(reactor, clients, port, policy)
    results = yield client.send(spooled(b"Subject: auth\r\n\r\nbody\r\n", reactor)).addTimeout(
        LOOP_TIMEOUT, reactor)
    assert results[0].status == DELIVERED
    assert len(sink.messages) == 1

    wrong = loop_policy(tls="verify", trust_root=trust, username="alice", password="nope")
    with pytest.raises(SessionFailure) as caught:
        yield open_client(reactor, clients, port, wrong)
    assert (caught.value.result.status, caught.value.result.enhanced) == (TRANSIENT, "4.7.8")


@pytest_twisted.inlineCallbacks
def test_loopback_opportunistic_without_starttls(reactor: Any, smtpd: Any,
                                                 clients: list[Any]) -> Generator[Any, Any, None]:
    sink = Sink()
    port = smtpd(sink)
    client = yield open_client(reactor, clients, port, loop_policy(tls="opportunistic"))
    assert client.tls_version is None
    results = yield client.send(spooled(b"Subject: plain\r\n\r\nbody\r\n", reactor)).addTimeout(
        LOOP_TIMEOUT, reactor)
    assert (results[0].status, results[0].tls) == (DELIVERED, None)
    assert len(sink.messages) == 1


@pytest_twisted.inlineCallbacks
def test_loopback_implicit_tls(reactor: Any, smtpd: Any, clients: list[Any],
                               ca: trustme.CA) -> Generator[Any, Any, None]:
    sink = Sink()
    port = smtpd(sink, ssl_context=tls_server_context(ca))
    trust = Certificate.loadPEM(ca.cert_pem.bytes())
    client = yield open_client(reactor, clients, port, loop_policy(tls="implicit",
                                                                   trust_root=trust))
    assert client.tls_version in ("TLSv1.2", "TLSv1.3")
    results = yield client.send(spooled(b"Subject: tls\r\n\r\nbody\r\n", reactor)).addTimeout(
        LOOP_TIMEOUT, reactor)
    assert (results[0].status, results[0].tls) == (DELIVERED, client.tls_version)

    wrong = loop_policy(tls="implicit", tls_hostname="wrong.example.test", trust_root=trust)
    with pytest.raises(SessionFailure) as caught:
        yield open_client(reactor, clients, port, wrong)
    assert caught.value.result.enhanced == "4.7.5"
    assert "verification failed" in caught.value.result.text
    assert len(sink.messages) == 1


@pytest_twisted.inlineCallbacks
def test_loopback_connection_refused(reactor: Any) -> Generator[Any, Any, None]:
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory, Protocol

    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol))
    number = port.getHost().port
    yield port.stopListening()  # nothing listens there now
    with pytest.raises(SessionFailure) as caught:
        yield connect(reactor, "127.0.0.1", number, loop_policy(), "closed").addTimeout(
            LOOP_TIMEOUT, reactor)
    assert (caught.value.result.status, caught.value.result.enhanced) == (TRANSIENT, "4.4.1")
    assert "connection refused/failed" in caught.value.result.text
