"""The inbound ESMTP protocol, written on Twisted's Protocol (not twisted.mail).

One loop reads complete CRLF lines, hands each to a verb handler and writes
the Reply it returns. While a handler's answer is pending (a policy Deferred,
the spool commit, a password check) reading stops and the buffer waits, so
replies leave strictly in command order whatever the client pipelined.
Policy (who may relay, what a recipient routes to) is the injected
``InboundPolicy``; what becomes of a message's bytes is the injected
``MessageSink`` (the receive stage: it builds the envelope, adds the trace header,
spools and queues), which the session hands each message's bytes between DATA
and the final dot. This module knows the protocol only: no envelope, queue,
delivery or configuration.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol
from typing import TypeAlias, cast

from twisted.internet import protocol, tcp
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaygw.address import MailArgs, RcptArgs
from relaygw.observe import fields
from relaygw.observe.null import NO_METRICS
from relaygw.smtp import auth as sasl
from relaygw.smtp.arguments import parse_helo, parse_mail_from, parse_rcpt_to
from relaygw.smtp.framing import MAX_LINE, DataReader
from relaygw.smtp.replies import (
    BARE_NEWLINE_COMMAND,
    LINE_TOO_LONG,
    OK,
    SYNTAX_ERROR,
    TEMP_LOCAL_ERROR,
    TIMEOUT,
    TOO_MANY_ERRORS,
    UNKNOWN_COMMAND,
    Reply,
)
from relaygw.smtp.tls import tls_session_info
from relaygw.smtp.transport import Clock, StreamTransport, set_no_delay, stream_transport

log = Logger()

COMMAND_LIMIT = 512  # octets with CRLF (RFC 5321 4.5.3.1.4)
AUTH_LIMIT = 12288  # RFC 4954 4: AUTH lines may carry a long initial response
MAX_AUTH_FAILURES = 3
AUTH_FAILURE_DELAY = 1.0  # seconds before a 535, to slow down guessing

_COMMAND, _DATA, _SASL, _CLOSED = "command", "data", "sasl", "closed"
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later", close=True)

# What a verb handler answers: a reply now, None when it has replied itself (or the
# connection is closing), or a Deferred for an answer not known yet.
Answer: TypeAlias = "Reply | Deferred[Reply] | Deferred[None] | None"


@dataclass(frozen=True)
class ServerSettings:
    """What one listener's sessions need, already validated by config."""

    hostname: str
    max_message_size: int = 36700160
    max_recipients: int = 100
    max_hops: int = 50
    idle_timeout: float = 300.0
    max_errors: int = 20
    normalize_bare_newlines: bool = False
    max_line_length: int = MAX_LINE  # DATA line octets with CRLF; longer refuses the message
    tls_mode: str = "none"  # none | starttls | implicit
    require_tls: bool = False
    auth_mode: str = "none"  # none | optional | required
    # CertificateOptions serves as a server connection creator without declaring it.
    tls_options: IOpenSSLServerConnectionCreator | CertificateOptions | None = None


@dataclass
class Session:
    """What is known about the client; policy decisions read it."""

    client_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    client_port: int
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_info: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    auth_user: str | None = None
    session_id: str = ""  # links the session's log lines (new_session_id)


def new_session_id() -> str:
    """12 hex digits, random: unique enough across worker processes and restarts to
    find one session's lines in a day's log (Postfix's queue ids are shorter)."""
    return secrets.token_hex(6)


@dataclass
class Transaction:
    mail: MailArgs
    recipients: list[RcptArgs] = field(default_factory=list)


class InboundPolicy(TypingProtocol):
    """Decisions the protocol asks for; each may answer now or with a Deferred."""

    def check_mail(self, session: Session,
                   mail: MailArgs) -> Reply | None | Deferred[Reply | None]: ...

    def check_rcpt(self, session: Session, mail: MailArgs,
                   rcpt: RcptArgs) -> Reply | None | Deferred[Reply | None]: ...


class IncomingMessage(TypingProtocol):
    """One message between DATA and its reply, as the session sees it."""

    def write(self, data: bytes) -> Deferred[None] | None:
        """Message bytes (unstuffed, CRLF); a Deferred asks the session to stop
        reading until it fires (the disk is behind)."""

    def commit(self) -> Deferred[Reply]:
        """The end of the data: the reply, once the message is durable (250) or
        could not be stored (4xx); never fails."""

    def abort(self) -> None:
        """Forget the message: it was refused, or the client went away."""


class MessageSink(TypingProtocol):
    """Where accepted messages go: the receive stage."""

    def begin(self, session: Session, transaction: Transaction) -> IncomingMessage: ...


class AuthChecker(TypingProtocol):
    """Checks AUTH credentials: ``relaygw.smtp.auth.Authenticator`` (the users file)."""

    @property
    def has_users(self) -> bool:
        """False: AUTH is neither offered nor accepted."""

    def check(self, credentials: sasl.Credentials) -> bool | Deferred[bool]:
        """Whether the password is right; may take its time (scrypt runs in a thread)."""


class SessionMetrics(TypingProtocol):
    """What sessions count; relaygw.observe implements it."""

    def connection_opened(self, listener: str, tls: bool) -> None: ...

    def connection_closed(self, listener: str) -> None: ...

    def connection_refused(self, reason: str) -> None: ...

    def message_rejected(self, stage: str, code: int, enhanced: str | None) -> None: ...


class SMTPServerProtocol(protocol.Protocol):
    metrics: SessionMetrics = NO_METRICS

    def __init__(self, settings: ServerSettings, policy: InboundPolicy, sink: MessageSink,
                 authenticator: AuthChecker | None, clock: Clock,
                 refusal: Reply | None = None) -> None:
        self.settings = settings
        self.policy = policy
        self.sink = sink
        self.authenticator = authenticator
        self.clock = clock
        self.refusal = refusal
        self.session: Session | None = None
        self.transaction: Transaction | None = None
        self._mode = _COMMAND
        self._buffer = b""
        self._discarding = False  # inside an over-long command line
        self._busy = False  # a reply is pending: do not read further
        self._processing = False  # inside the _process loop: replies are collected
        self._paused = False
        self._out: list[bytes] = []  # replies not yet handed to the transport
        self._direct: tcp.Connection | None = None  # plain TCP: replies go straight to it
        self._errors = 0
        self._auth_failures = 0
        self._sasl: sasl.SaslMechanism | None = None  # the AUTH exchange in progress
        self._reader: DataReader | None = None  # these two are set while in DATA
        self._message: IncomingMessage | None = None
        self._timer: IDelayedCall | None = None
        self._last_activity = 0.0  # clock time of the last complete line
        self._client = ""  # str(session.client_ip), made once for the log lines
        self._draining = False  # shutting down: finish the transaction, then 421

    @property
    def _stream(self) -> StreamTransport:
        """The transport; what uses it runs from connectionMade on."""
        return stream_transport(self.transport)

    @property
    def _session(self) -> Session:
        """The session; connectionMade makes it before any line is read."""
        session = self.session
        assert session is not None, "not connected yet"
        return session

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self._stream
        set_no_delay(transport)
        if isinstance(transport, tcp.Connection) and not transport.TLS:
            self._direct = transport
        peer = transport.getPeer()
        ip = ipaddress.ip_address(getattr(peer, "host", "0.0.0.0"))
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        self.session = Session(ip, getattr(peer, "port", 0),
                               tls=self.settings.tls_mode == "implicit",
                               session_id=new_session_id())
        self._client = str(ip)
        if self.refusal is not None:
            log.info("connection refused session={session} client={client} reply={reply}",
                     session=self.session.session_id, client=self._client,
                     reply=fields.text(str(self.refusal)), event="refused")
            self._send(self.refusal)
            self._close()
            return
        # An implicit-TLS session's handshake is still to come: "implicit", not a cipher.
        log.info("connect session={session} client={client} port={port} tls={tls}",
                 session=self.session.session_id, client=self._client,
                 port=self.session.client_port,
                 tls="implicit" if self.session.tls else fields.NONE, event="connect")
        self._send(Reply(220, None, f"{self.settings.hostname} ESMTP relaygw"))
        self._last_activity = self.clock.seconds()
        self._timer = self.clock.callLater(self.settings.idle_timeout, self._idle_check)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._mode = _CLOSED
        self._cancel_timer()
        self._abort_message()
        if self.session is not None and self.refusal is None:
            log.info("disconnect session={session} client={client} tls={tls} auth={auth}",
                     session=self.session.session_id, client=self._client,
                     tls=fields.tls(self._tls_info(), self.session.tls),
                     auth=fields.text(self.session.auth_user), event="disconnect")

    def shutdown(self) -> None:
        """Stop taking new work: an idle session ends now, a transaction may finish."""
        self._draining = True
        if self._mode == _COMMAND and self.transaction is None and not self._busy:
            self._reply(SHUTTING_DOWN)

    def force_close(self) -> None:
        """The grace period is over: nothing unacknowledged is kept."""
        if self._mode != _CLOSED:
            self._send(SHUTTING_DOWN)
            self._close()

    def _close(self) -> None:
        self._mode = _CLOSED
        self._cancel_timer()
        self._abort_message()
        self._flush()
        self._stream.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _idle_check(self) -> None:
        """The idle timer. Activity only records the time (one clock read per
        line); if there was some since the timer was set, it is set again for
        idle_timeout after the last."""
        self._timer = None
        if self._mode == _CLOSED:
            return
        left = self._last_activity + self.settings.idle_timeout - self.clock.seconds()
        if left > 0:
            self._timer = self.clock.callLater(left, self._idle_check)
            return
        log.info("timeout session={session} client={client}", session=self._session.session_id,
                 client=self._client, event="timeout")
        self._send(TIMEOUT)
        self._close()

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == _CLOSED:
            return
        self._buffer += data
        if self._busy:
            # More input while an answer is pending: let the kernel hold the rest.
            self._pause()
        else:
            self._process()

    def _process(self) -> None:
        """Run the command loop; the replies it makes leave in one write."""
        self._processing = True
        try:
            self._process_lines()
        finally:
            self._processing = False
            self._flush()

    def _process_lines(self) -> None:
        while not self._busy and self._mode != _CLOSED:
            if self._mode == _DATA:
                if not self._buffer:
                    return
                self._data_chunk()
                continue
            end = self._buffer.find(b"\r\n")
            if end < 0:
                self._check_partial_line()
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            self._last_activity = self.clock.seconds()
            if self._discarding:
                self._discarding = False
                self._reply(LINE_TOO_LONG)
                continue
            if len(line) + 2 > self._line_limit(line):
                self._reply(LINE_TOO_LONG)
                continue
            self._line(line)

    def _line_limit(self, start: bytes) -> int:
        if self._mode == _SASL or start[:5].upper() in (b"AUTH ", b"AUTH"):
            return AUTH_LIMIT
        return COMMAND_LIMIT

    def _check_partial_line(self) -> None:
        # Bounded memory: a line that is already too long is dropped as it
        # arrives; only its last byte (maybe the CR of CRLF) is kept.
        if len(self._buffer) > self._line_limit(self._buffer):
            self._discarding = True
            self._buffer = self._buffer[-1:]
        elif self._discarding and len(self._buffer) > 1:
            self._buffer = self._buffer[-1:]

    def _line(self, line: bytes) -> None:
        if self._draining and self.transaction is None and self._mode == _COMMAND:
            self._reply(SHUTTING_DOWN)
            return
        if b"\r" in line or b"\n" in line:
            self._reply(BARE_NEWLINE_COMMAND)
            return
        if self._mode == _SASL:
            self._answer(self._sasl_step(line))
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(Reply(500, "5.5.2", "Invalid UTF-8 in command"))
            return
        verb, _, arg = text.partition(" ")
        handler = self._handlers.get(verb.upper())
        if handler is None:
            self._reply(UNKNOWN_COMMAND)
            return
        self._answer(handler(self, arg.strip(" ")))

    def _answer(self, result: Answer) -> None:
        """Write a reply now, or stop reading until a pending one is known."""
        if not isinstance(result, Deferred):
            if result is not None:
                self._reply(result)
            return
        self._busy = True
        result.addErrback(self._internal_error)
        result.addCallback(self._resume)
        if self._busy and self._buffer:
            # Still pending with input waiting: let the kernel hold what follows.
            # (Input that arrives later pauses reading in dataReceived.)
            self._pause()

    def _resume(self, reply: Reply | None) -> None:
        self._busy = False
        if self._mode == _CLOSED:
            return
        if self._processing:  # an answer that came at once needs no new loop
            if reply is not None:
                self._reply(reply)
            self._unpause()
            return
        self._processing = True
        try:
            if reply is not None:
                self._reply(reply)
            self._unpause()
            self._process_lines()
        finally:
            self._processing = False
            self._flush()

    def _internal_error(self, failure: Failure) -> Reply:
        log.failure("internal error session={session} client={client}", failure,
                    session=self._session.session_id, client=self._client)
        return TEMP_LOCAL_ERROR

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._stream.pauseProducing()

    def _unpause(self) -> None:
        if self._paused and self._mode != _CLOSED:
            self._paused = False
            self._stream.resumeProducing()

    # -- output -------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())
        if not self._processing:
            self._flush()

    def _flush(self) -> None:
        """Hand the collected replies to the transport, as one write.

        On plain TCP they are sent at once (``writeSomeData``) rather than
        buffered until the reactor's next turn: that saves a poll round and two
        epoll changes per reply. Whatever the socket does not take goes through
        the transport's buffer, and so does everything after it, so the order
        of the bytes never changes.
        """
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        direct = self._direct
        if direct is not None:
            if direct.connected and not direct.disconnecting:
                sent = direct.writeSomeData(data)
                if isinstance(sent, int):
                    if sent == len(data):
                        return
                    data = data[sent:]
            self._direct = None  # from now on, the transport's buffer keeps the order
        self._stream.write(data)

    def _reply(self, reply: Reply) -> None:
        if self._mode == _CLOSED:
            return
        self._send(reply)
        if reply.close:
            self._close()
            return
        if reply.code >= 500 or reply.code == 421:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                self._send(TOO_MANY_ERRORS)
                self._close()

    # -- verbs --------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self.transaction = None

    def do_ehlo(self, arg: str) -> Reply:
        return self._greet(arg, esmtp=True)

    def do_helo(self, arg: str) -> Reply:
        return self._greet(arg, esmtp=False)

    def _greet(self, arg: str, esmtp: bool) -> Reply:
        helo = parse_helo(arg)
        if isinstance(helo, Reply):
            return helo
        self._reset_transaction()
        session = self._session
        session.helo = helo
        session.esmtp = esmtp
        if not esmtp:
            return Reply(250, None, self.settings.hostname)
        lines = [
            f"{self.settings.hostname} Hello {helo} [{session.client_ip}]",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "DSN",  # RFC 3461: NOTIFY, RET, ENVID and ORCPT are kept with the message
        ]
        if self._starttls_offered():
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        return Reply(250, None, "\n".join(lines))

    def _starttls_offered(self) -> bool:
        return (self.settings.tls_mode == "starttls" and not self._session.tls
                and self.settings.tls_options is not None)

    def _auth_offered(self) -> bool:
        return (self._session.tls and self.settings.auth_mode != "none"
                and self.authenticator is not None and self.authenticator.has_users)

    def do_mail(self, arg: str) -> Reply | Deferred[Reply]:
        session = self._session
        if session.helo is None:
            return Reply(503, "5.5.1", "Send HELO/EHLO first")
        if self.transaction is not None:
            return Reply(503, "5.5.1", "Sender already specified")
        if self.settings.require_tls and not session.tls:
            return self._rejected("mail", Reply(530, "5.7.0",
                                                "Must issue a STARTTLS command first"))
        if self.settings.auth_mode == "required" and session.auth_user is None:
            return self._rejected("mail", Reply(530, "5.7.0", "Authentication required"))
        mail = parse_mail_from(arg, smtputf8_offered=session.esmtp)
        if isinstance(mail, Reply):
            return mail
        if not session.esmtp and mail.params:
            return Reply(555, "5.5.4", "Parameters need EHLO")
        size = mail.params.get("SIZE")
        if size is not None and int(size) > self.settings.max_message_size:
            return self._rejected("mail", Reply(
                552, "5.3.4", "Message size exceeds fixed maximum message size"), mail=mail)

        def decided(refusal: Reply | None) -> Reply:
            if refusal is not None:
                return self._rejected("mail", refusal, mail=mail)
            self.transaction = Transaction(mail)
            sender = str(mail.address) if mail.address else ""
            return Reply(250, "2.1.0", f"Sender <{sender}> OK")

        return self._decide(self.policy.check_mail(session, mail), decided)

    def do_rcpt(self, arg: str) -> Reply | Deferred[Reply]:
        if self.transaction is None:
            return Reply(503, "5.5.1", "Need MAIL command first")
        if len(self.transaction.recipients) >= self.settings.max_recipients:
            return self._rejected("rcpt", Reply(452, "4.5.3", "Too many recipients"))
        smtputf8 = "SMTPUTF8" in self.transaction.mail.params
        rcpt = parse_rcpt_to(arg, smtputf8=smtputf8, default_domain=self.settings.hostname)
        if isinstance(rcpt, Reply):
            return rcpt
        transaction = self.transaction

        def decided(refusal: Reply | None) -> Reply:
            if refusal is not None:
                return self._rejected("rcpt", refusal, rcpt=rcpt, transaction=transaction)
            if all(r.address != rcpt.address for r in transaction.recipients):
                transaction.recipients.append(rcpt)
            return Reply(250, "2.1.5", f"Recipient <{rcpt.address}> OK")

        return self._decide(self.policy.check_rcpt(self._session, transaction.mail, rcpt),
                            decided)

    @staticmethod
    def _decide(answer: Reply | None | Deferred[Reply | None],
                then: Callable[[Reply | None], Reply]) -> Reply | Deferred[Reply]:
        if isinstance(answer, Deferred):
            return answer.addCallback(then)
        return then(answer)

    def do_data(self, arg: str) -> Reply | None:
        refusal = self._data_refusal(arg)
        if refusal is not None:
            if self._buffer:
                # The client sent its message without waiting for the 354:
                # reading on would run the body as commands.
                self._reply(refusal)
                return Reply(554, "5.5.0", "SMTP protocol synchronization error", close=True)
            return refusal
        self._start_message()
        return None

    def _data_refusal(self, arg: str) -> Reply | None:
        if arg:
            return SYNTAX_ERROR
        if self.transaction is None:
            return Reply(503, "5.5.1", "Need MAIL command first")
        if not self.transaction.recipients:
            return Reply(554, "5.5.1", "No valid recipients")
        return None

    def do_rset(self, arg: str) -> Reply:
        if arg:
            return SYNTAX_ERROR
        self._reset_transaction()
        return OK

    def do_noop(self, arg: str) -> Reply:
        return OK

    def do_quit(self, arg: str) -> Reply:
        return Reply(221, "2.0.0", "Bye", close=True)

    def do_vrfy(self, arg: str) -> Reply:
        if not arg:
            return SYNTAX_ERROR
        return Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_expn(self, arg: str) -> Reply:
        return Reply(502, "5.5.1", "EXPN not available")

    def do_help(self, arg: str) -> Reply:
        return Reply(214, "2.0.0",
                     "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH VRFY HELP")

    def do_starttls(self, arg: str) -> Reply | None:
        if arg:
            return Reply(501, "5.5.4", "STARTTLS takes no arguments")
        session = self._session
        if session.tls:
            return Reply(503, "5.5.1", "TLS already active")
        if self.settings.tls_mode != "starttls":
            return Reply(502, "5.5.1", "STARTTLS not available on this port")
        tls_options = self.settings.tls_options
        if tls_options is None:
            return Reply(454, "4.7.0", "TLS not available due to temporary reason")
        if self._buffer:
            # CVE-2011-0411 class: nothing sent in plaintext may count after TLS.
            log.info("starttls: discarded pipelined plaintext session={session} "
                     "client={client} bytes={bytes}", session=session.session_id,
                     client=self._client, bytes=len(self._buffer), event="starttls_discarded")
            self._buffer = b""
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        self._flush()  # in plaintext, before the handshake
        self._direct = None
        try:
            self._stream.startTLS(tls_options)
        except Exception:
            log.failure("starttls failed session={session} client={client}",
                        session=session.session_id, client=self._client)
            self._close()
            return None
        # RFC 3207 4.2: forget everything learnt before the handshake.
        session.helo = None
        session.esmtp = False
        session.auth_user = None
        session.tls = True
        self._reset_transaction()
        return None

    def do_auth(self, arg: str) -> Reply | Deferred[Reply]:
        if self.settings.auth_mode == "none" or self.authenticator is None \
                or not self.authenticator.has_users:
            return Reply(502, "5.5.1", "AUTH not available")
        session = self._session
        if not session.tls:
            return Reply(538, "5.7.11",
                         "Encryption required for requested authentication mechanism")
        if session.helo is None:
            return Reply(503, "5.5.1", "Send EHLO first")
        if session.auth_user is not None:
            return Reply(503, "5.5.1", "Already authenticated")
        if self.transaction is not None:
            return Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
        name, _, initial = arg.partition(" ")
        if not name:
            return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mechanism, step = sasl.start_sasl(name.upper(), initial or None)
        self._sasl = mechanism
        return self._sasl_result(step)

    def _sasl_step(self, line: bytes) -> Reply | Deferred[Reply]:
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self._mode, self._sasl = _COMMAND, None
            return Reply(501, "5.5.2", "Cannot decode response")
        mechanism = self._sasl
        assert mechanism is not None  # _SASL mode means a mechanism sent a challenge
        return self._sasl_result(mechanism.respond(text))

    def _sasl_result(self, step: sasl.Step) -> Reply | Deferred[Reply]:
        if isinstance(step, sasl.Challenge):
            self._mode = _SASL
            return Reply(334, None, step.text)
        self._mode = _COMMAND
        self._sasl = None
        if isinstance(step, Reply):
            return step
        credentials = step
        authenticator = self.authenticator
        assert authenticator is not None  # do_auth starts no exchange without one
        # maybeDeferred chains the Deferred check() may return: it fires with the bool.
        d = cast("Deferred[bool]", maybeDeferred(authenticator.check, credentials))
        return d.addCallback(self._auth_checked, credentials.username)

    def _auth_checked(self, ok: bool, username: str) -> Reply | Deferred[Reply]:
        if ok:
            self._session.auth_user = username
            log.info("auth session={session} client={client} user={user}",
                     session=self._session.session_id, client=self._client,
                     user=fields.text(username), event="auth")
            return Reply(235, "2.7.0", "Authentication successful")
        self._auth_failures += 1
        log.info("auth failed session={session} client={client} user={user} "
                 "failures={failures}", session=self._session.session_id, client=self._client,
                 user=fields.text(username), failures=self._auth_failures, event="auth_failed")
        if self._auth_failures >= MAX_AUTH_FAILURES:
            return Reply(421, "4.7.0", "Too many authentication failures", close=True)
        delayed: Deferred[Reply] = Deferred()
        self.clock.callLater(AUTH_FAILURE_DELAY, delayed.callback,
                             Reply(535, "5.7.8", "Authentication credentials invalid"))
        return delayed

    _handlers: dict[str, Callable[[SMTPServerProtocol, str], Answer]] = {
        "EHLO": do_ehlo, "HELO": do_helo, "MAIL": do_mail, "RCPT": do_rcpt,
        "DATA": do_data, "RSET": do_rset, "NOOP": do_noop, "QUIT": do_quit,
        "VRFY": do_vrfy, "EXPN": do_expn, "HELP": do_help, "STARTTLS": do_starttls,
        "AUTH": do_auth,
    }

    # -- DATA ---------------------------------------------------------------

    def _tls_info(self) -> str | None:
        session = self._session
        if session.tls and session.tls_info is None and self.transport is not None:
            info = tls_session_info(self.transport)
            session.tls_info = " ".join(info) if info else None
        return session.tls_info

    def _rejected(self, stage: str, reply: Reply, mail: MailArgs | None = None,
                  rcpt: RcptArgs | None = None,
                  transaction: Transaction | None = None) -> Reply:
        """Log a refusal with what is known of it (as Postfix's "NOQUEUE: reject"): the
        sender being refused or of the transaction, the recipient being refused, or at
        DATA every recipient of the message."""
        session = self._session
        transaction = transaction or self.transaction
        line = ["rejected session={session} client={client}"]
        values: dict[str, object] = {"session": session.session_id, "client": self._client}
        if session.helo is not None:
            line.append("helo={helo}")
            values["helo"] = fields.text(session.helo)
        if mail is None and transaction is not None:
            mail = transaction.mail
        if mail is not None:
            line.append("from={sender}")
            values["sender"] = fields.address(str(mail.address) if mail.address else "")
        if rcpt is not None:
            line.append("to={rcpt}")
            values["rcpt"] = fields.address(str(rcpt.address))
        elif stage == "data" and transaction is not None:
            line.append("rcpts={rcpts}")
            values["rcpts"] = fields.addresses(str(r.address) for r in transaction.recipients)
        line.append("stage={stage} reply={reply}")
        log.info(" ".join(line), stage=stage, reply=fields.text(str(reply)), event="rejected",
                 **values)
        self.metrics.message_rejected(stage, reply.code, reply.enhanced)
        return reply

    def _start_message(self) -> None:
        transaction = self.transaction
        assert transaction is not None  # do_data refuses DATA without MAIL
        self._tls_info()
        self._message = self.sink.begin(self._session, transaction)
        self._reader = DataReader(self.settings.max_message_size,
                                  normalize_bare_newlines=self.settings.normalize_bare_newlines,
                                  max_line=self.settings.max_line_length)
        self._mode = _DATA
        self._send(Reply(354, None, "End data with <CR><LF>.<CR><LF>"))

    def _data_chunk(self) -> None:
        chunk, self._buffer = self._buffer, b""
        reader, message = self._reader, self._message
        assert reader is not None and message is not None  # _start_message set both
        if b"\n" in chunk:
            self._last_activity = self.clock.seconds()  # progress is whole lines, not bytes
        content = reader.feed(chunk)
        wait = message.write(content) if content else None
        if reader.done:
            self._buffer = reader.remainder + self._buffer
            self._mode = _COMMAND
            self._answer(self._finish_message())
        elif wait is not None:
            self._answer(wait.addCallback(lambda _: None))

    def _finish_message(self) -> Reply | Deferred[Reply]:
        reader, message = self._reader, self._message
        assert reader is not None and message is not None  # still in DATA until now
        self._reader = self._message = None
        transaction = self.transaction
        self._reset_transaction()
        problem = reader.problem
        if problem is None and reader.received_headers > self.settings.max_hops:
            problem = Reply(554, "5.4.6", "Too many hops (mail loop?)")
        if problem is not None:
            message.abort()
            return self._rejected("data", problem, transaction=transaction)
        return message.commit()

    def _abort_message(self) -> None:
        if self._message is not None:
            self._message.abort()
            self._message = None



class SMTPServerFactory(protocol.Factory["_CountedProtocol"]):
    """Builds sessions for one listener and enforces the connection caps.

    ``next_tag`` is an opaque value the next session is built with, and
    ``on_session_end`` is called with it when that session ends: a worker process
    sets it to the main process's connection id before adopting a socket.
    """

    def __init__(self, settings: ServerSettings, policy: InboundPolicy, sink: MessageSink,
                 authenticator: AuthChecker | None, clock: Clock, *, counter: ConnectionCounter,
                 metrics: SessionMetrics = NO_METRICS, listener: str = "",
                 on_session_end: Callable[[object], None] | None = None) -> None:
        self.settings = settings
        self.policy = policy
        self.sink = sink
        self.authenticator = authenticator
        self.clock = clock
        self.metrics = metrics
        self.listener = listener
        self.counter = counter  # shared by all listeners: the caps are daemon-wide
        self.on_session_end = on_session_end
        self.next_tag: object = None
        self.sessions: set[_CountedProtocol] = set()
        self._drained: Deferred[None] | None = None

    def session_ended(self, proto: _CountedProtocol) -> None:
        self.sessions.discard(proto)
        tag, proto.tag = proto.tag, None
        if tag is not None and self.on_session_end is not None:
            self.on_session_end(tag)
        if not self.sessions and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def drain(self, grace: float) -> Deferred[None]:
        """Let sessions finish their transactions for up to ``grace`` seconds."""
        for proto in list(self.sessions):
            proto.shutdown()
        if not self.sessions:
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained = drained
        timer = self.clock.callLater(grace, self._grace_over)

        def stop_timer(result: None | Failure) -> None | Failure:
            if timer.active():
                timer.cancel()
            return result

        return drained.addBoth(stop_timer)

    def _grace_over(self) -> None:
        log.info("shutdown: closing {n} sessions still open after the grace period",
                 n=len(self.sessions))
        for proto in list(self.sessions):
            proto.force_close()

    def buildProtocol(self, addr: IAddress | None) -> _CountedProtocol:
        host = getattr(addr, "host", "")
        refusal = self.counter.acquire(host)
        if refusal is not None:
            self.metrics.connection_refused(
                "max_connections" if self.counter.total >= self.counter.max_total
                else "max_connections_per_client")
        proto = _CountedProtocol(self.settings, self.policy, self.sink, self.authenticator,
                                 self.clock, refusal)
        proto.factory = self
        proto.metrics = self.metrics
        proto.counted_host = None if refusal else host
        proto.tag = self.next_tag
        return proto


class ConnectionCounter:
    """Total and per-client connection counts, shared by all listeners."""

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: dict[str, int] = {}

    def acquire(self, host: str) -> Reply | None:
        if self.total >= self.max_total:
            return Reply(421, "4.7.0", "Too many connections, try again later", close=True)
        if self.per_client.get(host, 0) >= self.max_per_client:
            return Reply(421, "4.7.0", "Too many connections from your address", close=True)
        self.total += 1
        self.per_client[host] = self.per_client.get(host, 0) + 1
        return None

    def release(self, host: str) -> None:
        self.total -= 1
        left = self.per_client.get(host, 1) - 1
        if left:
            self.per_client[host] = left
        else:
            self.per_client.pop(host, None)


class _CountedProtocol(SMTPServerProtocol):
    factory: SMTPServerFactory
    counted_host: str | None = None
    tag: object = None

    def connectionMade(self) -> None:
        self.factory.sessions.add(self)
        super().connectionMade()
        if self.counted_host is not None:
            self.factory.metrics.connection_opened(self.factory.listener,
                                                   self.settings.tls_mode == "implicit")
        if self.factory._drained is not None:  # accepted just as the shutdown began
            self.shutdown()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.counted_host is not None:
            self.factory.counter.release(self.counted_host)
            self.factory.metrics.connection_closed(self.factory.listener)
            self.counted_host = None
        super().connectionLost(reason)
        self.factory.session_ended(self)
