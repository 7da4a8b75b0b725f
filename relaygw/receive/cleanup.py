"""The receive stage (Postfix's cleanup): from "the client said DATA" to "the
message is durable and queued".

For each message the SMTP session hands over, it

1. expands aliases, once, into the envelope's recipients (ORCPT keeps the address
   the client gave);
2. gives the message its queue id and envelope;
3. runs the message transforms (``relaygw.receive.transforms``, the ``Received:``
   header first) over the bytes as they stream into the spool writer;
4. on commit, answers 250 only once the spool says the message is durable, then
   hands it to the queue (``hand_off``: the queue manager in one process, the
   report to the main process in an SMTP worker); a spool fault is a 4xx, never a
   5xx.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaygw.address import RcptArgs, xtext_encode
from relaygw.config import AliasEntry, Config
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.observe import fields
from relaygw.queue.store import MessageWriter, SpoolError, StoredMessage, new_queue_id
from relaygw.receive.message_id import MessageIdScan
from relaygw.receive.transforms import MessageTransform, Pipeline
from relaygw.routing import expand_aliases
from relaygw.smtp.replies import INSUFFICIENT_STORAGE, TEMP_LOCAL_ERROR, Reply
from relaygw.smtp.server import Session, Transaction

# The inbound log: a session's lines share one namespace, whichever stage writes them.
log = Logger(namespace="relaygw.smtp.server")


class MessageStore(Protocol):
    """The spool, as the receive stage writes to it."""

    def new_message(self, envelope: Envelope) -> MessageWriter: ...


class ReceiveMetrics(Protocol):
    def message_accepted(self, size: int) -> None: ...

    def message_rejected(self, stage: str, code: int, enhanced: str | None) -> None: ...

    def tls_inbound(self, version: str | None) -> None: ...


def expand_recipients(rcpts: Iterable[RcptArgs],
                      aliases: Sequence[AliasEntry]) -> list[EnvelopeRecipient]:
    """The envelope's recipients: aliases expanded, duplicates dropped, and ORCPT
    set to the address the client gave where an alias replaced it."""
    out: list[EnvelopeRecipient] = []
    seen: set[str] = set()
    for rcpt in rcpts:
        original = str(rcpt.address)
        # Without aliases the expansion is the address itself: skip the table build.
        for target in expand_aliases(original, aliases) if aliases else [original]:
            if target in seen:
                continue
            seen.add(target)
            params = dict(rcpt.params)
            if target != original and "ORCPT" not in params and original.isascii():
                params["ORCPT"] = "rfc822;" + xtext_encode(original)
            out.append(EnvelopeRecipient(target, params))
    return out


class Cleanup:
    """The MessageSink of every SMTP listener of a process.

    ``config_source`` returns the configuration in force (a reload applies to the
    next message); ``transforms`` build the stage's transforms for a configuration.
    """

    def __init__(self, store: MessageStore, hand_off: Callable[[StoredMessage], None],
                 config_source: Callable[[], Config],
                 transforms: Callable[[Config], Sequence[MessageTransform]],
                 metrics: ReceiveMetrics) -> None:
        self.store = store
        self.hand_off = hand_off
        self.config_source = config_source
        self.metrics = metrics
        self._transforms = transforms
        self._built: tuple[Config, Sequence[MessageTransform]] | None = None

    def _current(self) -> tuple[Config, Sequence[MessageTransform]]:
        config = self.config_source()
        if self._built is None or self._built[0] is not config:
            self._built = (config, tuple(self._transforms(config)))
        return self._built

    def begin(self, session: Session, transaction: Transaction) -> IncomingMessage:
        config, transforms = self._current()
        mail = transaction.mail
        envelope = Envelope(
            queue_id=new_queue_id(),
            sender=str(mail.address) if mail.address else "",
            recipients=tuple(expand_recipients(transaction.recipients, config.aliases)),
            arrived=time.time(),
            client_ip=str(session.client_ip),
            client_port=session.client_port,
            helo=session.helo or "",
            tls=session.tls_info,
            auth_user=session.auth_user,
            params={k: v for k, v in mail.params.items() if k != "SIZE"},
            smtputf8="SMTPUTF8" in mail.params,
        )
        pipeline = Pipeline([t.start(envelope, session) for t in transforms])
        return IncomingMessage(self, envelope, self.store.new_message(envelope), pipeline,
                               session.session_id, fields.tls(session.tls_info, session.tls))


class IncomingMessage:
    """One message on its way into the spool (the session's IncomingMessage)."""

    def __init__(self, cleanup: Cleanup, envelope: Envelope, writer: MessageWriter,
                 pipeline: Pipeline, session_id: str = "", tls: str = fields.NONE) -> None:
        self.envelope = envelope
        self.session_id = session_id
        self._tls = tls  # as the log writes it
        self._cleanup = cleanup
        self._writer = writer
        self._pipeline = pipeline
        self._size = 0  # the client's octets, before any transform
        # The client's header section, for the log; None once it has been seen.
        self._scan: MessageIdScan | None = MessageIdScan()
        self._message_id: str | None = None
        head = pipeline.head()
        if head:
            writer.write(head)

    def write(self, data: bytes) -> Deferred[None] | None:
        self._size += len(data)
        scan = self._scan
        if scan is not None and scan.feed(data):
            self._message_id, self._scan = scan.message_id, None
        out = self._pipeline.feed(data)
        return self._writer.write(out) if out else None

    def abort(self) -> None:
        self._writer.abort()

    def commit(self) -> Deferred[Reply]:
        if self._scan is not None:
            self._message_id, self._scan = self._scan.end(), None
        tail = self._pipeline.end()
        if tail:
            self._writer.write(tail)
        return self._writer.commit().addCallbacks(self._committed, self._failed)

    def _committed(self, queue_id: str) -> Reply:
        envelope, metrics = self.envelope, self._cleanup.metrics
        log.info("accepted id={queue_id} session={session} from={sender} size={size} "
                 "nrcpt={nrcpt} message_id={message_id} client={client} tls={tls} auth={auth}",
                 queue_id=queue_id, session=self.session_id,
                 sender=fields.address(envelope.sender), size=self._size,
                 nrcpt=len(envelope.recipients), message_id=fields.text(self._message_id),
                 client=envelope.client_ip, tls=self._tls,
                 auth=fields.text(envelope.auth_user), event="accepted")
        metrics.message_accepted(self._size)
        metrics.tls_inbound(envelope.tls)
        self._cleanup.hand_off(self._writer.stored)
        return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")

    def _failed(self, failure: Failure) -> Reply:
        failure.trap(SpoolError)
        error = failure.value
        assert isinstance(error, SpoolError)
        log.error("spool write failed id={queue_id} session={session} error={error}",
                  queue_id=self.envelope.queue_id, session=self.session_id,
                  error=fields.text(str(error)), event="spool_error")
        reply = INSUFFICIENT_STORAGE if error.no_space else TEMP_LOCAL_ERROR
        self._cleanup.metrics.message_rejected("data", reply.code, reply.enhanced)
        return reply
