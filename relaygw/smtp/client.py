"""The outbound SMTP client: one connection, one or more transactions, per-recipient results.

Written on a bare Protocol rather than twisted.mail (see docs of its defects): the
dialogue is a pair of coroutines (handshake, transaction) that await one reply at a
time, while dataReceived only splits bytes into replies. Every reply wait has its own
timer (RFC 5321 4.5.3.2), and any failure of the connection reaches whatever the
dialogue awaits at that moment as a SessionFailure carrying a transient result.

Async style: the dialogue is coroutines. Callbacks appear only at the edges, where a
coroutine's Deferred is handed to Twisted (connecting, the end of a session, QUIT),
since Protocol methods cannot await.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, NoReturn, TypeVar
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw.results import (
    DELIVERED,
    FINAL,
    PASSED_ON,
    PERMANENT,
    RELAYED,
    TRANSIENT,
    DeliveryResult,
    permanent,
    transient,
)
from relaygw.smtp.framing import DotStuffer
from relaygw.smtp.replies import Reply
from relaygw.smtp.tls import tls_session_info
from relaygw.smtp.transport import Clock, StreamTransport, set_no_delay, stream_transport

if TYPE_CHECKING:
    # Twisted exports the trust root interface only through optionsForClientTLS's signature.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = [
    "ClientPolicy",
    "ClientReactor",
    "StageTimeouts",
    "OutboundMessage",
    "ReplyError",
    "ReplyParser",
    "SMTPClientProtocol",
    "SessionFailure",
    "connect",
]

_T = TypeVar("_T")

TLS_MODES = ("none", "opportunistic", "require", "verify", "implicit")
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024

# Which StageTimeouts field times each stage; RSET has none of its own and gets MAIL's.
_STAGE_TIMEOUTS = {
    "greeting": "greeting", "EHLO": "helo", "HELO": "helo", "STARTTLS": "starttls",
    "AUTH": "auth", "MAIL FROM": "mail", "RCPT TO": "rcpt", "DATA": "data_init",
    "message data": "data_block", "end of DATA": "data_done", "RSET": "mail", "QUIT": "quit",
}
_CLASS = {DELIVERED: "2", TRANSIENT: "4", PERMANENT: "5"}
_LINE = re.compile(rb"([2-5][0-9]{2})(?:([ -])(.*))?")
_ENHANCED = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: +|$)")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# esmtp-value (RFC 5321 4.1.2), with UTF-8 as RFC 6531 allows; ASCII-only is enforced
# when the line is encoded for a transaction without SMTPUTF8.
_PARAM_VALUE = re.compile(r"[^\x00-\x20=\x7f]+")
_MAIL_DSN_KEYS = ("RET", "ENVID")
_RCPT_DSN_KEYS = ("NOTIFY", "ORCPT")


@dataclass(frozen=True)
class OutboundMessage:
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    rcpt_params: tuple[dict[str, str | None], ...]  # one per recipient, or () for none at all
    size: int
    read_chunk: Callable[[], Deferred[bytes]]  # next chunk, b"" at the end; used only in DATA
    smtputf8: bool = False
    eight_bit: bool = False
    mail_params: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.recipients:
            raise ValueError("a message needs at least one recipient")
        if self.rcpt_params and len(self.rcpt_params) != len(self.recipients):
            raise ValueError("rcpt_params must have one entry per recipient")


class StageTimeouts(TypingProtocol):
    """Seconds per client step (RFC 5321 4.5.3.2); ``[delivery.timeouts]`` in the config."""

    @property
    def connect(self) -> float: ...
    @property
    def greeting(self) -> float: ...
    @property
    def helo(self) -> float: ...
    @property
    def starttls(self) -> float: ...
    @property
    def auth(self) -> float: ...
    @property
    def mail(self) -> float: ...
    @property
    def rcpt(self) -> float: ...
    @property
    def data_init(self) -> float: ...
    @property
    def data_block(self) -> float: ...
    @property
    def data_done(self) -> float: ...
    @property
    def quit(self) -> float: ...


@dataclass(frozen=True)
class ClientPolicy:
    helo_name: str
    tls: str
    tls_hostname: str
    trust_root: IOpenSSLTrustRoot | None = None  # None: the system trust store
    username: str | None = None
    password: str | None = None
    timeouts: StageTimeouts = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"unknown TLS mode {self.tls!r}")
        if not self.helo_name or any(c in self.helo_name for c in " \r\n\0"):
            raise ValueError(f"bad HELO name {self.helo_name!r}")
        if self.tls in ("verify", "implicit") and not self.tls_hostname:
            raise ValueError("TLS verification needs tls_hostname")


class SessionFailure(Exception):  # noqa: N818 - the name others code against
    """The connection failed or refused us; ``result`` applies to every recipient concerned."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.diagnostic)
        self.result = result


class ReplyError(Exception):
    """The server's bytes are not a well-formed reply, or one beyond our limits."""


class ReplyParser:
    """Split the server's byte stream into replies, one at a time.

    ``next_reply`` hands out one complete reply per call so that the caller can
    ``clear`` everything behind a reply (the STARTTLS 220) before it is read.
    """

    def __init__(self, max_lines: int = MAX_REPLY_LINES, max_bytes: int = MAX_REPLY_BYTES) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.clear()

    def clear(self) -> None:
        self._buffer = b""
        self._pos = 0  # where the unread part of _buffer starts
        self._lines: list[bytes] = []
        self._size = 0  # bytes of the reply being assembled

    def feed(self, data: bytes) -> None:
        self._buffer = self._buffer[self._pos:] + data
        self._pos = 0

    def next_reply(self) -> Reply | None:
        while True:
            end = self._buffer.find(b"\n", self._pos)
            if end < 0:
                if self._size + len(self._buffer) - self._pos > self.max_bytes:
                    raise ReplyError(f"reply longer than {self.max_bytes} bytes")
                return None
            raw = self._buffer[self._pos:end]
            self._size += end + 1 - self._pos
            self._pos = end + 1
            if self._size > self.max_bytes:
                raise ReplyError(f"reply longer than {self.max_bytes} bytes")
            # A bare LF as line end is tolerated (it cannot inject anything here); a CR
            # anywhere else is not.
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            match = _LINE.fullmatch(raw)
            if match is None or b"\r" in raw:
                raise ReplyError(f"malformed reply line {raw[:80]!r}")
            if self._lines and match.group(1) != self._lines[0][:3]:
                raise ReplyError("reply code changed within a multi-line reply")
            self._lines.append(raw)
            if len(self._lines) > self.max_lines:
                raise ReplyError(f"reply longer than {self.max_lines} lines")
            if match.group(2) != b"-":
                lines, self._lines, self._size = self._lines, [], 0
                return _build_reply(lines)


def _build_reply(lines: list[bytes]) -> Reply:
    code = int(lines[0][:3])
    texts = [line[4:].decode("utf-8", "replace") for line in lines]
    found = _ENHANCED.match(texts[0])
    enhanced = None
    if found and found.group(1) == str(code)[0]:
        enhanced = found.group(0).strip()
        texts = [t[len(m.group(0)):] if (m := _ENHANCED.match(t)) else t for t in texts]
    elif code // 100 in (2, 4, 5):
        enhanced = f"{code // 100}.0.0"
    return Reply(code, enhanced, "\n".join(texts))


def _ok(reply: Reply) -> bool:
    return reply.code // 100 == 2


def _check_param(key: str, value: str | None) -> str:
    if not _PARAM_KEY.fullmatch(key) or (value is not None and not _PARAM_VALUE.fullmatch(value)):
        raise ValueError(f"bad ESMTP parameter {key}={value!r}")
    return key if value is None else f"{key}={value}"


def _dsn_params(params: dict[str, str | None], keys: tuple[str, ...]) -> list[str]:
    return [_check_param(k, v) for k, v in params.items() if k.upper() in keys]


@implementer(IPushProducer)
class _Drain:
    """Told by the transport when its buffer is full and when it has drained."""

    def __init__(self) -> None:
        self.paused = False
        self.drained: Deferred[None] = Deferred()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        drained, self.drained = self.drained, Deferred()
        drained.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()  # connectionLost fails the dialogue itself


class _Pending(TypingProtocol):
    """What failing the session needs of a Deferred the dialogue awaits, whatever it yields."""

    called: bool

    def errback(self, fail: Failure | BaseException | None = None) -> None: ...


class SMTPClientProtocol(Protocol):
    """One SMTP client connection; see ``ready``, ``send`` and ``quit``."""

    def __init__(self, policy: ClientPolicy, clock: Clock, remote: str) -> None:
        self.policy = policy
        self.clock = clock
        self.remote = remote
        self.ready: Deferred[None] = Deferred()
        self.tls_version: str | None = None
        self.extensions: dict[str, str] = {}  # EHLO keyword -> parameters, as last advertised
        self._parser = ReplyParser()
        self._expected: deque[str] = deque()  # stages of the commands awaiting a reply
        self._replies: deque[Reply] = deque()  # replies not yet taken by the dialogue
        # What the dialogue awaits: one reply, or (pipelined) _replies_wanted of them.
        self._reply_waiter: Deferred[Reply] | None = None
        self._replies_waiter: Deferred[list[Reply]] | None = None
        self._replies_wanted = 0
        self._other_waiter: _Pending | None = None  # a chunk read or a drain
        self._activity: str | None = None  # what runs when no reply is due ("message data")
        self._timer: IDelayedCall | None = None
        self._timeout_text = ""  # what the running timer reports when it fires
        self._failure: SessionFailure | None = None
        self._connected = False
        self._busy = True  # handshake or transaction running; true until ready
        self._closing = False  # QUIT sent or 421 seen: no new transactions
        self._tls = policy.tls == "implicit"
        self._tls_pending = self._tls  # TLS started but not yet proven by a reply through it
        self._lost_waiters: list[Deferred[None]] = []

    # -- public API

    @property
    def usable(self) -> bool:
        """Connected, idle and not failed: may take another send()."""
        return (self._connected and not self._busy and not self._closing
                and self._failure is None)

    def send(self, message: OutboundMessage) -> Deferred[list[DeliveryResult]]:
        """One transaction; one result per recipient, in order, or a SessionFailure."""
        if self._busy and self._failure is None and self._connected:
            raise RuntimeError("another handshake or transaction is in progress")
        if self._failure is not None:
            return fail(self._failure)
        if not self.usable:
            return fail(SessionFailure(self._transient("4.4.2", "connection not usable")))
        # Bad input raises here, before a byte is sent, and leaves the session usable.
        mail, rcpts = self._envelope_lines(message)
        for line in (mail, *rcpts):
            _encode(line, message.smtputf8)
        self._busy = True
        d = Deferred.fromCoroutine(self._transaction(message, mail, rcpts))
        return d.addBoth(self._finished)

    def quit(self) -> Deferred[None]:
        """QUIT politely if idle, else abort; fires once the connection is closed."""
        lost = self._when_lost()
        if not self._connected:
            return lost
        if self._busy or self._failure is not None:
            self._stream.abortConnection()
            return lost
        self._busy = self._closing = True
        self._write_lines(["QUIT"])
        self._expect("QUIT")
        self._read_reply().addBoth(self._quit_answered)
        return lost

    @property
    def _stream(self) -> StreamTransport:
        """The transport; what uses it runs from connectionMade on."""
        return stream_transport(self.transport)

    # -- Twisted callbacks

    def connectionMade(self) -> None:
        self._connected = True
        set_no_delay(self.transport)
        self._expect("greeting")
        Deferred.fromCoroutine(self._handshake()).addBoth(self._finished_handshake)

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._parser.feed(data)
        # One reply at a time: the dialogue runs synchronously on each and may clear
        # the parser (after the STARTTLS 220) before the next one is looked at.
        while self._failure is None:
            try:
                reply = self._parser.next_reply()
            except ReplyError as e:
                self._fail(self._transient("4.5.0", f"bad reply from the next hop: {e}"))
                return
            if reply is None:
                return
            self._reply_arrived(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self._cancel_timer()
        stage = self._stage()
        if self._tls_pending and stage is not None:
            self._fail(self._tls_failure(reason), close=False)
        elif stage is not None:
            # At "end of DATA" this is RFC 1047's duplicate window: the peer may have
            # taken the message. The result stays transient (the queue decides) and
            # nothing is ever resent on this connection.
            self._fail(self._transient("4.4.2", f"connection lost during {stage}"), close=False)
        else:
            self._fail(self._transient("4.4.2", "connection closed"), close=False)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    # -- the dialogue

    async def _handshake(self) -> None:
        greeting = await self._read_reply()
        if self._tls_pending:
            self._tls_established()  # implicit TLS: the greeting came through it
        if not _ok(greeting):
            raise self._give_up(self._outcome(greeting, TRANSIENT))
        await self._hello()
        if self.policy.tls in ("opportunistic", "require", "verify") and not self._tls:
            await self._starttls()
        if self.policy.username is not None:
            await self._authenticate()

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self.policy.helo_name}", "EHLO")
        if _ok(reply):
            self.extensions = _parse_extensions(reply)
            return
        self.extensions = {}
        if reply.code // 100 == 5:
            reply = await self._command(f"HELO {self.policy.helo_name}", "HELO")
            if _ok(reply):
                return
        raise self._give_up(self._outcome(reply, TRANSIENT))

    async def _starttls(self) -> None:
        mode = self.policy.tls
        if "STARTTLS" not in self.extensions:
            if mode == "opportunistic":
                return
            raise self._give_up(self._transient("4.7.5", "STARTTLS not offered by the next hop"))
        reply = await self._command("STARTTLS", "STARTTLS")
        if reply.code != 220:
            if mode == "opportunistic":
                return  # RFC 3207 4.1: the session goes on in plaintext (twisted#10334 quit)
            raise self._give_up(self._transient(
                "4.7.5", f"STARTTLS refused: {reply.code} {_one_line(reply)}", code=reply.code))
        # Whatever followed the 220 came in plaintext and may be a forged reply (response
        # injection, twisted.mail defect 16): drop it, and every extension learnt so far.
        self._parser.clear()
        self._replies.clear()
        self.extensions = {}
        self._tls = self._tls_pending = True
        try:
            self._stream.startTLS(self._tls_options())
        except Exception as e:
            raise self._fail(self._transient("4.7.5", f"TLS setup failed: {e}")) from e
        # The TLS layer holds this EHLO until the handshake is done; a connection lost
        # before its reply is a failed handshake (see connectionLost).
        await self._hello()
        self._tls_established()

    async def _authenticate(self) -> None:
        # Never AUTH in plaintext, whatever the policy says (twisted.mail defect 17).
        if not self._tls:
            raise self._give_up(self._transient(
                "4.7.0", "authentication not possible without TLS"))
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user = (self.policy.username or "").encode("utf-8")
        password = (self.policy.password or "").encode("utf-8")
        if "PLAIN" in mechanisms:
            token = _b64(b"\0" + user + b"\0" + password)
            reply = await self._command(f"AUTH PLAIN {token}", "AUTH")
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN", "AUTH")
            for secret in (user, password):
                if reply.code != 334:
                    break
                reply = await self._command(_b64(secret), "AUTH")
        else:
            raise self._give_up(self._transient(
                "4.7.0", "authentication not possible: the next hop offers no PLAIN or LOGIN"))
        if reply.code != 235:
            # Rejected credentials are our configuration's fault: defer, never bounce.
            enhanced = "4.7.8" if reply.code // 100 == 5 else None
            raise self._give_up(self._outcome(reply, TRANSIENT, enhanced))

    async def _transaction(self, message: OutboundMessage, mail: str,
                           rcpts: list[str]) -> list[DeliveryResult]:
        count = len(message.recipients)
        refusal = self._refusal(message)
        if refusal is not None:
            return [refusal] * count
        utf8 = message.smtputf8
        data_reply: Reply | None = None
        if "PIPELINING" in self.extensions:
            # RFC 2920: one write, then the replies in command order.
            self._write_lines([mail, *rcpts, "DATA"], utf8=utf8)
            for stage in ("MAIL FROM", *("RCPT TO",) * count, "DATA"):
                self._expect(stage)
            # All the replies at once: they usually arrive together.
            mail_reply, *rcpt_replies, data_reply = await self._read_replies(count + 2)
        else:
            mail_reply = await self._command(mail, "MAIL FROM", utf8=utf8)
            rcpt_replies = []
            if _ok(mail_reply):
                for line in rcpts:
                    rcpt_replies.append(await self._command(line, "RCPT TO", utf8=utf8))
                if any(_ok(r) for r in rcpt_replies):
                    data_reply = await self._command("DATA", "DATA")
        if not _ok(mail_reply):
            return await self._abandon([self._outcome(mail_reply)] * count, data_reply)
        results = [self._outcome(r) for r in rcpt_replies]
        accepted = [i for i, r in enumerate(rcpt_replies) if _ok(r)]
        if not accepted:
            return await self._abandon(results, data_reply)
        assert data_reply is not None
        if data_reply.code != 354:
            failed = self._outcome(data_reply, TRANSIENT if _ok(data_reply) else None)
            return await self._abandon([failed if i in accepted else r
                                        for i, r in enumerate(results)], None)
        await self._send_data(message)
        final = self._outcome(await self._read_reply())
        return [final if i in accepted else r for i, r in enumerate(results)]

    async def _send_data(self, message: OutboundMessage) -> None:
        # The transport pauses us when its buffer fills: a 35 MB message is never held
        # whole, and each chunk has data_block seconds to be read and drained.
        drain = _Drain()
        stuffer = DotStuffer()  # one per message: its state spans chunk boundaries
        self._activity = "message data"
        stream = self._stream
        stream.registerProducer(drain, True)
        try:
            while True:
                self._arm_timer("message data", "timeout sending message data")
                try:
                    chunk = await self._guard(maybeDeferred(message.read_chunk))
                except SessionFailure:
                    raise
                except Exception as e:
                    # Never end DATA on a message we could not read whole.
                    raise self._fail(
                        self._transient("4.3.0", f"cannot read the message: {e}")) from e
                if not chunk:
                    stream.write(stuffer.finish())
                    break
                out = stuffer.feed(chunk)
                if out:
                    stream.write(out)
                if drain.paused:
                    await self._guard(drain.drained)
        finally:
            self._activity = None
            if self._connected:
                stream.unregisterProducer()
        self._expect("end of DATA")

    async def _abandon(self, results: list[DeliveryResult],
                       data_reply: Reply | None) -> list[DeliveryResult]:
        """End a transaction that sends no data; the results stand whatever happens next."""
        if data_reply is not None and data_reply.code == 354:
            # A peer that wants data although it accepted no recipient is confused; even an
            # empty message could go somewhere. Drop the connection instead.
            self._fail(self._transient("4.5.0", "DATA accepted without recipients"))
            return results
        if not self._closing:
            try:
                reply = await self._command("RSET", "RSET")
            except SessionFailure:
                return results  # the connection is gone; the results are still right
            if not _ok(reply):
                self._closing = True
        return results

    # -- replies, commands, timers

    def _command(self, line: str, stage: str, *, utf8: bool = False) -> Deferred[Reply]:
        self._write_lines([line], utf8=utf8)
        self._expect(stage)
        return self._read_reply()

    def _write_lines(self, lines: list[str], *, utf8: bool = False) -> None:
        data = b"".join([_encode(line, utf8) for line in lines])
        if self._failure is None:
            self._stream.write(data)

    def _expect(self, stage: str) -> None:
        if self._failure is not None:
            return  # nothing will answer; _read_reply fails at once
        self._expected.append(stage)
        if len(self._expected) == 1:
            self._arm_timer(stage, f"timeout waiting for {stage} reply")

    def _read_reply(self) -> Deferred[Reply]:
        if self._replies:
            return succeed(self._replies.popleft())
        if self._failure is not None:
            return fail(self._failure)
        waiter: Deferred[Reply] = Deferred()
        self._reply_waiter = waiter
        return waiter

    def _read_replies(self, count: int) -> Deferred[list[Reply]]:
        """The next ``count`` replies, in order, in one list (pipelined commands)."""
        if len(self._replies) >= count:
            return succeed([self._replies.popleft() for _ in range(count)])
        if self._failure is not None:
            return fail(self._failure)
        waiter: Deferred[list[Reply]] = Deferred()
        self._replies_waiter = waiter
        self._replies_wanted = count
        return waiter

    def _reply_arrived(self, reply: Reply) -> None:
        if not self._expected:
            # Nothing was asked: a server shutting down (421) or a confused one.
            text = f"unexpected reply: {_one_line(reply)}"
            self._fail(self._outcome(reply, TRANSIENT, text=text))
            return
        self._expected.popleft()
        if self._expected:
            head = self._expected[0]
            self._arm_timer(head, f"timeout waiting for {head} reply")
        else:
            self._cancel_timer()
        if reply.code == 421:
            self._closing = True  # the server is going away; finish what is in flight
        waiter = self._reply_waiter
        if waiter is not None:
            self._reply_waiter = None
            waiter.callback(reply)
            return
        self._replies.append(reply)
        batch = self._replies_waiter
        if batch is not None and len(self._replies) >= self._replies_wanted:
            self._replies_waiter = None
            batch.callback([self._replies.popleft() for _ in range(self._replies_wanted)])

    def _guard(self, d: Deferred[_T]) -> Deferred[_T]:
        """Wait for ``d``, or fail at once if the session fails first."""
        if self._failure is not None:
            d.addErrback(lambda _: None)
            return fail(self._failure)
        proxy: Deferred[_T] = Deferred()
        self._other_waiter = proxy

        def done(result: _T | Failure) -> None:
            if self._other_waiter is proxy:
                self._other_waiter = None
                proxy.errback(result) if isinstance(result, Failure) else proxy.callback(result)

        d.addBoth(done)
        return proxy

    def _arm_timer(self, stage: str, text: str) -> None:
        """Time ``stage`` from now, replacing whatever was timed before."""
        seconds = getattr(self.policy.timeouts, _STAGE_TIMEOUTS[stage])
        self._timeout_text = text
        timer = self._timer
        if timer is not None and timer.active():
            if self.clock.seconds() + seconds >= timer.getTime():
                # Moving a call later costs the reactor nothing until it comes due; one
                # stage after another in a transaction mostly does just that.
                timer.reset(seconds)
                return
            timer.cancel()
        self._timer = self.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._failure is None:
            self._fail(self._transient("4.4.2", self._timeout_text))
        elif self._connected:
            self._stream.abortConnection()  # a polite close that did not finish

    def _stage(self) -> str | None:
        return self._expected[0] if self._expected else self._activity

    # -- failure and closing

    def _fail(self, result: DeliveryResult, *, close: bool = True,
              polite: bool = False) -> SessionFailure:
        """End the session with ``result``; returns the failure for the caller to raise."""
        if self._failure is not None:
            return self._failure
        failure = self._failure = SessionFailure(result)
        self._cancel_timer()
        self._expected.clear()
        if close and self._connected:
            stream = self._stream
            if polite:
                stream.write(b"QUIT\r\n")
                stream.loseConnection()
                self._arm_timer("QUIT", "timeout closing the connection")
            else:
                stream.abortConnection()
        waiters: tuple[_Pending | None, ...] = (
            self._reply_waiter, self._replies_waiter, self._other_waiter)
        for waiter in waiters:
            if waiter is not None and not waiter.called:
                waiter.errback(failure)
        self._reply_waiter = self._replies_waiter = None
        self._other_waiter = None
        return failure

    def _give_up(self, result: DeliveryResult) -> SessionFailure:
        """The peer answered but we cannot go on with it: QUIT and close."""
        return self._fail(result, polite=True)

    def _finished_handshake(self, result: None | Failure) -> None:
        if isinstance(result, Failure):
            if not result.check(SessionFailure):
                self._fail(self._transient("4.4.2", f"client error: {result.value}"))
            self.ready.errback(result)
        else:
            self._busy = False
            self.ready.callback(None)

    def _finished(self, result: list[DeliveryResult] | Failure,
                  ) -> list[DeliveryResult] | Failure:
        if isinstance(result, Failure) and not result.check(SessionFailure):
            # A bug or bad input mid-dialogue: the session state is unknown now.
            self._fail(self._transient("4.4.2", f"client error: {result.value}"))
        self._busy = False
        return result

    def _quit_answered(self, result: Reply | Failure) -> None:
        if self._connected and self._failure is None:
            self._stream.loseConnection()
            self._arm_timer("QUIT", "timeout closing the connection")

    def _when_lost(self) -> Deferred[None]:
        if not self._connected and self.transport is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    # -- TLS

    def _tls_options(self) -> IOpenSSLClientConnectionCreator | CertificateOptions:
        if self.policy.tls in ("verify", "implicit"):
            return client_tls_options(self.policy)
        # RFC 7435: unverified TLS beats plaintext, and a verification failure must not
        # push an MX back to plaintext, so opportunistic TLS does not verify at all.
        return CertificateOptions(verify=False)

    def _tls_established(self) -> None:
        self._tls_pending = False
        info = tls_session_info(self.transport)
        self.tls_version = info[0] if info else "TLS"  # "TLS": encrypted, version unknown

    def _tls_failure(self, reason: Failure | None) -> DeliveryResult:
        detail = reason.getErrorMessage() if reason is not None else "connection lost"
        verified = self.policy.tls in ("verify", "implicit")
        if reason is not None and (reason.check(VerificationError) or (
                verified and reason.check(SSL.Error) and "certificate" in detail.lower())):
            return self._transient("4.7.5", f"TLS certificate verification failed: {detail}")
        return self._transient("4.7.5", f"TLS handshake failed: {detail}")

    # -- results

    def _transient(self, enhanced: str, text: str, code: int | None = None) -> DeliveryResult:
        return transient(enhanced, text, code=code, remote=self.remote, tls=self.tls_version)

    def _outcome(self, reply: Reply, status: str | None = None, enhanced: str | None = None,
                 text: str | None = None) -> DeliveryResult:
        """A result that keeps the peer's code and text; ``status`` overrides its class."""
        if status is None:
            status = (DELIVERED if _ok(reply) else
                      PERMANENT if reply.code // 100 == 5 else TRANSIENT)
        enhanced = enhanced or _CLASS[status] + (reply.enhanced or "4.0.0")[1:]
        handoff = FINAL
        if status == DELIVERED:
            # A peer that offers DSN got the parameters (see _envelope_lines) and reports
            # from here on; one without leaves the sender's success notice to us.
            handoff = PASSED_ON if "DSN" in self.extensions else RELAYED
        return DeliveryResult(status, enhanced, text or _one_line(reply), reply.code,
                              self.remote, self.tls_version, handoff)

    def _refusal(self, message: OutboundMessage) -> DeliveryResult | None:
        """Why the next hop cannot take this message at all, decided before sending."""
        remote, tls = self.remote, self.tls_version
        if message.smtputf8 and "SMTPUTF8" not in self.extensions:
            return permanent("5.6.7", "SMTPUTF8 not supported by the next hop",
                             remote=remote, tls=tls)
        limit = self.extensions.get("SIZE", "").strip()
        if "SIZE" in self.extensions and limit.isdigit() and 0 < int(limit) < message.size:
            return permanent("5.3.4", "message too big for the next hop", remote=remote, tls=tls)
        return None

    def _envelope_lines(self, message: OutboundMessage) -> tuple[str, list[str]]:
        ext = self.extensions
        params = []
        if "SIZE" in ext:
            params.append(f"SIZE={message.size}")
        # Without 8BITMIME the body goes out unchanged: nearly every server takes 8-bit
        # data, and a bounce (or a MIME downgrade we cannot do well) would be worse.
        if message.eight_bit and "8BITMIME" in ext:
            params.append("BODY=8BITMIME")
        if message.smtputf8:
            params.append("SMTPUTF8")
        # DSN parameters only to a peer that knows them; unknown ones would be refused.
        if "DSN" in ext:
            params += _dsn_params(message.mail_params, _MAIL_DSN_KEYS)
        mail = " ".join([f"MAIL FROM:<{message.sender}>", *params])
        rcpts = []
        for i, rcpt in enumerate(message.recipients):
            extra = message.rcpt_params[i] if message.rcpt_params else {}
            rcpt_params = _dsn_params(extra, _RCPT_DSN_KEYS) if "DSN" in ext else []
            rcpts.append(" ".join([f"RCPT TO:<{rcpt}>", *rcpt_params]))
        return mail, rcpts


def _parse_extensions(reply: Reply) -> dict[str, str]:
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:  # the first line is the server's name
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):  # pre-RFC 4954 form, still seen
            keyword, params = "AUTH", f"{keyword[5:]} {params}"
        if keyword:
            extensions[keyword] = f"{extensions.get(keyword, '')} {params}".strip()
    return extensions


def _one_line(reply: Reply) -> str:
    return " ".join(reply.text.split("\n")).strip()


def _encode(line: str, utf8: bool) -> bytes:
    """One command line on the wire; never a bare CR or LF (RFC 5321 2.3.8)."""
    if any(c in line for c in "\r\n\0"):
        raise ValueError(f"CR, LF or NUL in an SMTP command: {line!r}")
    return (line + "\r\n").encode("utf-8" if utf8 else "ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def client_tls_options(policy: ClientPolicy) -> IOpenSSLClientConnectionCreator:
    """Verified TLS for "verify" and "implicit": service-identity checks the name."""
    return optionsForClientTLS(policy.tls_hostname, trustRoot=policy.trust_root)


class ClientReactor(Clock, TypingProtocol):
    """What ``connect`` needs of the reactor: ``IReactorTCP`` for the connection (through
    the TCP endpoints) and ``IReactorTime`` for the session's timers."""

    def connectTCP(self, host: str, port: int, factory: ClientFactory, timeout: float = 30,
                   bindAddress: tuple[str, int] | None = None,  # noqa: N803 - Twisted's name
                   ) -> IConnector: ...


def connect(reactor: ClientReactor, host_ip: str, port: int, policy: ClientPolicy,
            remote: str) -> Deferred[SMTPClientProtocol]:
    """Connect, run the handshake, and return the protocol once ``ready`` has fired."""
    endpoint_type = (TCP6ClientEndpoint if ipaddress.ip_address(host_ip).version == 6
                     else TCP4ClientEndpoint)
    endpoint: IStreamClientEndpoint = endpoint_type(reactor, host_ip, port,
                                                    timeout=policy.timeouts.connect)
    if policy.tls == "implicit":
        endpoint = wrapClientTLS(client_tls_options(policy), endpoint)
    factory = Factory.forProtocol(partial(SMTPClientProtocol, policy, reactor, remote))
    factory.noisy = False

    def connected(proto: SMTPClientProtocol) -> Deferred[SMTPClientProtocol]:
        return proto.ready.addCallback(lambda _: proto)

    def refused(reason: Failure) -> NoReturn:
        raise SessionFailure(transient(
            "4.4.1", f"connection refused/failed: {reason.getErrorMessage()}", remote=remote))

    return endpoint.connect(factory).addCallbacks(connected, refused)
