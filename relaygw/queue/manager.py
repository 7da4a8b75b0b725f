"""The queue manager: routes each pending recipient at every attempt, hands
groups to couriers, records per-recipient outcomes, retries, expires, and sends
the DSNs (RFC 3461) each recipient's NOTIFY asks for: failed, delayed (once,
after ``[delivery] delay_warning_time``), delivered or relayed.

Order of effects after an attempt, so a crash never loses or repeats more
than it must: (1) the new recipient state is saved; (2) each DSN due is
committed to the spool; (3) the state is saved again with those recipients
marked notified (or delay-warned); (4) a finished message is removed.
"""

from __future__ import annotations

import functools
import heapq
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from typing import Any, Protocol

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaygw.address import xtext_decode
from relaygw.config import Config
from relaygw.delivery.bounce import RETURN_FULL_LIMIT, FailedRecipient, build_dsn, should_bounce
from relaygw.delivery.courier import Courier, DeliveryJob
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.observe import fields
from relaygw.observe.null import NO_METRICS
from relaygw.queue.state import DELIVERED as STATE_DELIVERED
from relaygw.queue.state import FAILED, QueueState, RecipientState
from relaygw.queue.store import Spool, StoredMessage, new_queue_id
from relaygw.results import DELIVERED, PASSED_ON, PERMANENT, RELAYED, DeliveryResult, transient
from relaygw.routing import RouteContext, RouteDecision, route_recipient

log = Logger()
maillog = Logger(namespace="relaygw.maillog")

# The diagnostic of a recipient failed with ``relaygw queue bounce``; its DSN shows it.
RETURNED_BY_ADMINISTRATOR = "5.0.0 returned to the sender by the mail administrator"


class DeliveryMetrics(Protocol):
    """What the queue counts; relaygw.observe implements it."""

    def delivery(self, route: str, status: str, enhanced: str | None,
                 seconds: float) -> None: ...

    def tls_outbound(self, version: str | None) -> None: ...


@dataclass(frozen=True)
class QueuedMessage:
    """What the manager holds for one message, as others may see it: a snapshot."""

    stored: StoredMessage
    state: QueueState  # the current recipient states and hold flag
    deleted: bool  # deleted by an operator; goes once the attempt in flight ends

    @property
    def queue_id(self) -> str:
        return self.stored.envelope.queue_id


@dataclass
class _Entry:
    stored: StoredMessage
    state: QueueState
    busy: bool = False
    deleted: bool = False  # an operator deleted it while an attempt was in flight
    saving: Deferred = field(default_factory=lambda: succeed(None))

    @property
    def queue_id(self) -> str:
        return self.stored.envelope.queue_id


class QueueManager(service.Service):
    name = "queue"

    def __init__(self, spool: Spool, config_source: Callable[[], Config],
                 couriers: Mapping[str, Courier], clock: IReactorTime,
                 rng: random.Random | None = None, grace: float = 30.0,
                 on_grace_over: Callable[[], None] | None = None,
                 metrics: DeliveryMetrics = NO_METRICS) -> None:
        self.spool = spool
        self.config_source = config_source  # the current Config (reload swaps it)
        self.couriers = dict(couriers)
        self.clock = clock
        self.rng = rng or random.Random()
        self.grace = grace
        self.metrics = metrics
        self.on_grace_over = on_grace_over  # aborts deliveries still running
        self.entries: dict[str, _Entry] = {}
        self._due: list[tuple[float, str]] = []
        self._timer: Any = None
        self._stopping = False
        self._in_flight: set[Deferred] = set()
        self.attempts_finished = 0

    # -- life cycle -----------------------------------------------------------

    def load(self, messages: list[StoredMessage]) -> None:
        """Take over what the spool held at start-up."""
        for stored in messages:
            entry = _Entry(stored, stored.state)
            self.entries[entry.queue_id] = entry
            if any(r.needs_dsn for r in entry.state.recipients):
                self._finish(entry)
            else:
                self._schedule(entry)

    # -- reading (for the control socket, metrics and the stranded-message scan) --

    def queued_ids(self) -> set[str]:
        """The ids of every message the manager holds (a copy: safe to hand to a thread)."""
        return set(self.entries)

    def knows(self, queue_id: str) -> bool:
        return queue_id in self.entries

    def __len__(self) -> int:
        """Messages held, deleted ones still finishing an attempt included."""
        return len(self.entries)

    def __bool__(self) -> bool:
        return True  # an empty queue is still a manager: ``if manager`` must not flip

    def oldest_arrival(self) -> float | None:
        """Unix time the oldest message held arrived; None when the queue is empty."""
        return min((e.stored.envelope.arrived for e in self.entries.values()), default=None)

    def messages(self) -> list[QueuedMessage]:
        """Every message held, deleted ones included (see ``deleted``), in no set order."""
        return [_view(e) for e in self.entries.values()]

    def message(self, queue_id: str) -> QueuedMessage | None:
        entry = self.entries.get(queue_id)
        return None if entry is None else _view(entry)

    def delivery_progress(self) -> tuple[int, int]:
        """(attempts in flight, attempts finished since start): for flow control."""
        return len(self._in_flight), self.attempts_finished

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        # Let attempts in flight record their outcome before the spool closes;
        # after the grace period, abort them (their outcome is then transient).
        if not self._in_flight:
            return succeed(None)
        timer = self.clock.callLater(self.grace, self._grace_over)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()

        return DeferredList(list(self._in_flight), consumeErrors=True).addBoth(finished)

    def _grace_over(self) -> None:
        log.info("shutdown: aborting {n} deliveries still running", n=len(self._in_flight))
        if self.on_grace_over is not None:
            self.on_grace_over()

    def enqueued(self, stored: StoredMessage) -> None:
        """A message was accepted (it is durable): attempt it at once."""
        entry = _Entry(stored, stored.state)
        self.entries[entry.queue_id] = entry
        self._attempt(entry)

    # -- scheduling -----------------------------------------------------------

    def _now(self) -> float:
        return self.clock.seconds()

    def _schedule(self, entry: _Entry) -> None:
        pending = [r.next_attempt for r in entry.state.recipients if r.status == "pending"]
        if not pending or entry.state.held:
            return
        heapq.heappush(self._due, (min(pending), entry.queue_id))
        self._arm()

    def _arm(self) -> None:
        if self._stopping or not self._due:
            return
        delay = max(0.0, self._due[0][0] - self._now())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self._now() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self._now()
        while self._due and self._due[0][0] <= now:
            _, queue_id = heapq.heappop(self._due)
            entry = self.entries.get(queue_id)
            if entry is not None and not entry.busy:
                self._attempt(entry)
        self._arm()

    # -- attempts -------------------------------------------------------------

    def _attempt(self, entry: _Entry) -> None:
        if self._stopping or entry.busy or entry.state.held:
            return
        now = self._now()
        envelope = entry.stored.envelope
        due = [i for i, r in enumerate(entry.state.recipients)
               if r.status == "pending" and r.next_attempt <= now]
        if not due:
            self._schedule(entry)
            return
        config = self.config_source()
        context = RouteContext(sender=envelope.sender,
                               client_ip=_client_ip(envelope.client_ip)
                               if envelope.client_ip else None,
                               authenticated=envelope.auth_user is not None)
        decisions = {i: route_recipient(entry.state.recipients[i].address, context, config)
                     for i in due}
        entry.busy = True
        started = time.monotonic()
        groups: list[Deferred] = []
        rejects = [i for i in due if decisions[i].is_reject]
        if rejects:
            results = [_reject_result(decisions[i]) for i in rejects]
            groups.append(self._record(entry, rejects, [decisions[i] for i in rejects],
                                       results, started))
        by_nexthop: dict[tuple[str, str], list[int]] = {}
        for i in due:
            if not decisions[i].is_reject:
                by_nexthop.setdefault((decisions[i].action, decisions[i].nexthop), []).append(i)
        content = self.spool.content(entry.stored)
        for (action, _nexthop), indexes in by_nexthop.items():
            group = [decisions[i] for i in indexes]
            job = DeliveryJob(entry.queue_id, envelope, content, tuple(indexes), tuple(group))
            courier = self.couriers.get(action)
            if courier is None:
                d = succeed([transient("4.3.5", f"no courier for action {action}")] * len(group))
            else:
                d = courier.deliver(job)
            d.addErrback(self._courier_failed, len(group), entry.queue_id)
            groups.append(d.addCallback(self._group_done, entry, indexes, group, started))
        done = _all_done(groups)
        self._in_flight.add(done)
        done.addBoth(lambda _: self._attempt_done(entry, done))

    def _group_done(self, results: list[DeliveryResult], entry: _Entry, indexes: list[int],
                    decisions: list[RouteDecision], started: float) -> Deferred[None]:
        return self._record(entry, indexes, decisions, results, started)

    @staticmethod
    def _courier_failed(failure: Failure, count: int, queue_id: str) -> list[DeliveryResult]:
        log.failure("courier failed id={queue_id}", failure, queue_id=queue_id)
        return [transient("4.3.0", f"internal delivery error: {failure.getErrorMessage()}")] * count

    def _record(self, entry: _Entry, indexes: list[int], decisions: list[RouteDecision],
                results: list[DeliveryResult], started: float) -> Deferred:
        """Apply one group's outcome and save it before anything else happens."""
        config = self.config_source()
        now = self._now()
        envelope = entry.stored.envelope
        state = entry.state
        for index, decision, result in zip(indexes, decisions, results, strict=True):
            old = state.recipients[index]
            if old.status == FAILED and result.status != DELIVERED:
                # Bounced by the operator while this attempt was in flight: the bounce
                # stands, and its DSN says why, not what this attempt heard.
                new = old
            else:
                new = self._next_state(old, result, envelope, _recipient(envelope, index),
                                       config, now)
            state = state.with_recipient(index, new)
            self._log_attempt(entry, decision, result, new, now, started)
        entry.state = state
        if state.is_complete:
            return succeed(None)  # nothing left to remember: it is removed next
        return self._persist(entry)

    def _next_state(self, old: RecipientState, result: DeliveryResult, envelope: Envelope,
                    rcpt: EnvelopeRecipient, config: Any, now: float) -> RecipientState:
        common: dict[str, Any] = dict(
            attempts=old.attempts + 1, last_attempt=now, last_reply=result.diagnostic,
            enhanced=result.enhanced, remote_host=result.remote)
        # ``notified`` starts true where no DSN is due, so that such a message is done at once.
        if result.status == DELIVERED:
            # A next hop that took the DSN parameters reports success itself.
            due = result.handoff != PASSED_ON and _dsn_due(envelope, rcpt, "SUCCESS")
            return replace(old, status=STATE_DELIVERED, relayed=result.handoff == RELAYED,
                           notified=not due, **common)
        failure_due = _dsn_due(envelope, rcpt, "FAILURE")
        if result.status == PERMANENT:
            return replace(old, status=FAILED, notified=not failure_due, **common)
        if now - envelope.arrived >= config.delivery.max_queue_time:
            return replace(old, status=FAILED, notified=not failure_due,
                           **{**common, "enhanced": "4.4.7",
                              "last_reply": f"{result.diagnostic} (delivery time expired)"})
        intervals = config.delivery.retry_intervals
        interval = intervals[min(old.attempts, len(intervals) - 1)]
        delay = interval * self.rng.uniform(0.8, 1.2)  # jitter: no retry stampede
        return replace(old, next_attempt=now + delay, **common)

    def _log_attempt(self, entry: _Entry, decision: RouteDecision, result: DeliveryResult,
                     new: RecipientState, now: float, started: float) -> None:
        status = {STATE_DELIVERED: "sent", FAILED: "bounced"}.get(new.status, "deferred")
        if new.status == FAILED and new.enhanced == "4.4.7":
            status = "expired"
        self.metrics.delivery(decision.route_label, status, new.enhanced or result.enhanced,
                              now - entry.stored.envelope.arrived)
        if result.remote is not None:  # an SMTP peer answered
            self.metrics.tls_outbound(result.tls)
        # Seconds rounded where they are made, so the JSON field is what the text says.
        maillog.info(
            "attempt id={queue_id} to={rcpt} route={route} relay={relay} tls={tls} "
            "delay={delay} duration={duration} status={status} reply={reply}",
            queue_id=entry.queue_id, rcpt=fields.address(new.address),
            route=fields.text(decision.route_label),
            relay=fields.text(result.remote or decision.nexthop or None),
            tls=fields.tls(result.tls), delay=round(now - entry.stored.envelope.arrived, 2),
            duration=round(time.monotonic() - started, 2), status=status,
            reply=fields.text(result.diagnostic),
            event="expired" if status == "expired" else "attempt")

    def _persist(self, entry: _Entry) -> Deferred:
        """Save the entry's current state; saves of one message never overtake."""

        def save(_: Any) -> Deferred:
            return self.spool.save_state(entry.queue_id, entry.state)

        entry.saving.addCallback(save)
        entry.saving.addErrback(lambda f: log.failure(
            "queue: cannot save state id={queue_id}", f, queue_id=entry.queue_id))
        result: Deferred[None] = Deferred()

        def saved(outcome: Any) -> Any:
            result.callback(None)
            return outcome

        entry.saving.addBoth(saved)
        return result

    def _attempt_done(self, entry: _Entry, done: Deferred) -> None:
        self._in_flight.discard(done)
        self.attempts_finished += 1
        entry.busy = False
        if entry.deleted:
            self._remove(entry, "deleted by operator")
            return
        self._finish(entry)

    # -- operator actions -------------------------------------------------------

    def _entries(self, ids: list[str] | None) -> list[_Entry]:
        if ids is None:
            return list(self.entries.values())
        missing = [i for i in ids if i not in self.entries]
        if missing:
            raise UnknownMessage(missing)
        return [self.entries[i] for i in ids]

    def flush(self, ids: list[str] | None = None) -> list[str]:
        """Make pending recipients due now and attempt them."""
        now = self._now()
        done = []
        for entry in self._entries(ids):
            rcpts = tuple(replace(r, next_attempt=now) if r.status == "pending" else r
                          for r in entry.state.recipients)
            entry.state = replace(entry.state, recipients=rcpts)
            done.append(entry.queue_id)
            if not entry.busy:
                self._attempt(entry)
        return done

    def hold(self, ids: list[str]) -> Deferred:
        """Park messages: no attempt until released (one in flight finishes)."""
        return self._set_held(self._entries(ids), True)

    def release(self, ids: list[str]) -> Deferred:
        entries = self._entries(ids)

        def schedule(done: list[str]) -> list[str]:
            for entry in entries:
                self._schedule(entry)
            return done

        return self._set_held(entries, False).addCallback(schedule)

    def _set_held(self, entries: list[_Entry], held: bool) -> Deferred:
        saves = []
        for entry in entries:
            entry.state = replace(entry.state, held=held)
            saves.append(self._persist(entry))
        return DeferredList(saves).addCallback(lambda _: [e.queue_id for e in entries])

    def delete(self, ids: list[str]) -> Deferred:
        """Drop messages without a bounce; one being delivered goes when its attempt ends."""
        entries = self._entries(ids)
        removals = []
        for entry in entries:
            entry.deleted = True
            if not entry.busy:
                removals.append(self._remove(entry, "deleted by operator"))
        return DeferredList(removals).addCallback(lambda _: [e.queue_id for e in entries])

    def bounce(self, ids: list[str]) -> Deferred:
        """Fail every pending recipient and send the sender a DSN that says the mail
        administrator returned it (no remote host: none refused it)."""
        entries = self._entries(ids)
        now = self._now()
        done: list[Deferred] = []
        for entry in entries:
            state = entry.state
            for i, r in enumerate(state.recipients):
                if r.status == "pending":
                    state = state.with_recipient(i, replace(
                        r, status=FAILED, enhanced="5.0.0", last_attempt=now,
                        last_reply=RETURNED_BY_ADMINISTRATOR, remote_host=None,
                        notified=not _dsn_due(entry.stored.envelope,
                                              _recipient(entry.stored.envelope, i), "FAILURE")))
            entry.state = state
            if not entry.busy:  # one in flight is finished when its attempt ends
                self._persist(entry)
                done.append(self._finish(entry))
        # Answer once the outcome and the DSNs are on disk.
        return DeferredList(done).addCallback(lambda _: [e.queue_id for e in entries])

    def _remove(self, entry: _Entry, why: str) -> Deferred:
        self.entries.pop(entry.queue_id, None)
        d = entry.saving.addCallback(lambda _: self.spool.remove(entry.queue_id))
        d.addCallback(lambda _: maillog.info("removed id={queue_id} ({why})",
                                             queue_id=entry.queue_id, why=why, event="removed"))
        return d

    # -- bounces and completion -------------------------------------------------

    def _finish(self, entry: _Entry) -> Deferred:
        reports, silent = self._dsns_due(entry)
        if silent:
            # Final recipients that want no DSN but are not marked (a state written before
            # success notices existed): nothing to send, nothing to lose if the mark is lost.
            state = entry.state
            for i in silent:
                state = state.with_recipient(i, replace(state.recipients[i], notified=True))
            entry.state = state
        d: Deferred = succeed(None)
        for kind in ("failure", "delay", "success"):  # one DSN each, committed in turn
            if reports.get(kind):
                d.addCallback(self._report_after, entry, kind, reports[kind])
        if silent and not reports and not entry.state.is_complete:
            d.addCallback(lambda _: self._persist(entry))
        d.addCallback(lambda _: self._complete_or_reschedule(entry))
        d.addErrback(lambda f: log.failure("queue: finishing failed id={queue_id}", f,
                                           queue_id=entry.queue_id))
        return d

    def _complete_or_reschedule(self, entry: _Entry) -> Deferred | None:
        if entry.state.is_complete:
            return self._remove(entry, "done")
        self._schedule(entry)
        return None

    def _dsns_due(self, entry: _Entry) -> tuple[dict[str, list[int]], list[int]]:
        """The recipients each DSN due now reports on ("failure", "delay", "success"), and
        the final ones that are not marked notified although no DSN is due for them."""
        envelope = entry.stored.envelope
        warn_after = self.config_source().delivery.delay_warning_time
        late = bool(warn_after) and self._now() - envelope.arrived >= warn_after
        reports: dict[str, list[int]] = {}
        silent = []
        for i, r in enumerate(entry.state.recipients):
            rcpt = _recipient(envelope, i)
            if r.needs_dsn:
                kind, event = ("failure", "FAILURE") if r.status == FAILED else (
                    "success", "SUCCESS")
                if _dsn_due(envelope, rcpt, event):
                    reports.setdefault(kind, []).append(i)
                else:
                    silent.append(i)
            elif (late and r.status == "pending" and r.attempts and not r.delay_warned
                  and _dsn_due(envelope, rcpt, "DELAY")):
                reports.setdefault("delay", []).append(i)
        return reports, silent

    def _report_after(self, _: object, entry: _Entry, kind: str, indexes: list[int]) -> Deferred:
        """``_report`` as a callback: after the report before it is committed."""
        return self._report(entry, kind, indexes)

    def _report(self, entry: _Entry, kind: str, indexes: list[int]) -> Deferred:
        """Commit one DSN about ``indexes`` to the spool, then mark them and save."""
        config = self.config_source()
        envelope = entry.stored.envelope
        hostname = config.server.hostname
        rcpts = [self._dsn_recipient(entry, i, kind, config) for i in indexes]
        content = self.spool.content(entry.stored)
        # RFC 3461 §4.3: RET=FULL returns the message in a failure DSN only. A message
        # over RETURN_FULL_LIMIT is returned as its header (and the DSN says so): the main
        # process holds the DSN in memory while it builds it.
        full = kind == "failure" and envelope.return_full
        too_big = full and content.size > RETURN_FULL_LIMIT
        returned: Deferred[bytes | None]
        if full and not too_big:
            returned = self.spool.run(content.read_all)
            headers: Deferred[bytes] = succeed(b"")
        else:
            returned = succeed(None)
            headers = content.headers()

        def build(message: bytes | None) -> Deferred:
            return headers.addCallback(commit, message)

        def commit(header_section: bytes, message: bytes | None) -> Deferred:
            now = self._now()
            envid = envelope.params.get("ENVID")
            dsn = build_dsn(reporting_mta=hostname,
                            envelope_id=xtext_decode(envid) if envid else None,
                            queue_id=envelope.queue_id, sender=envelope.sender,
                            arrival=envelope.arrived, recipients=rcpts,
                            original_headers=header_section, now=now,
                            message_id_domain=hostname, returned_message=message,
                            too_big_to_return=RETURN_FULL_LIMIT if too_big else None)
            bounce = Envelope(queue_id=new_queue_id(), sender="",
                              recipients=(EnvelopeRecipient(envelope.sender),), arrived=now,
                              helo=hostname, params={"BODY": "8BITMIME"})
            writer = self.spool.new_message(bounce)
            writer.write(dsn)
            return writer.commit().addCallback(lambda _: writer.stored)

        def queued(stored: StoredMessage) -> Deferred:
            dsn_id = stored.envelope.queue_id
            addresses = fields.addresses(f.address for f in rcpts)
            if kind == "failure":
                maillog.info("bounced id={queue_id} dsn_id={dsn_id} from={sender} rcpts={rcpts}",
                             queue_id=envelope.queue_id, dsn_id=dsn_id,
                             sender=fields.address(envelope.sender), rcpts=addresses,
                             event="bounced")
            else:
                maillog.info("notified id={queue_id} dsn_id={dsn_id} action={action} "
                             "from={sender} rcpts={rcpts}",
                             queue_id=envelope.queue_id, dsn_id=dsn_id,
                             action=",".join(sorted({f.action for f in rcpts})),
                             sender=fields.address(envelope.sender), rcpts=addresses,
                             event="notified")
            state = entry.state
            for i in indexes:
                r = state.recipients[i]
                state = state.with_recipient(i, replace(r, delay_warned=True)
                                             if kind == "delay" else replace(r, notified=True))
            entry.state = state
            self.enqueued(stored)
            return self._persist(entry)

        return returned.addCallback(build).addCallback(queued)

    @staticmethod
    def _dsn_recipient(entry: _Entry, i: int, kind: str, config: Any) -> FailedRecipient:
        envelope = entry.stored.envelope
        r = entry.state.recipients[i]
        orcpt = _recipient(envelope, i).params.get("ORCPT")
        original = xtext_decode(orcpt.split(";", 1)[1]) if orcpt and ";" in orcpt else None
        remote = (r.remote_host or "").split("[")[0] or None
        if kind == "failure":
            return FailedRecipient(r.address, r.enhanced or "5.0.0", r.last_reply, remote,
                                   original_recipient=original)
        if kind == "delay":
            return FailedRecipient(r.address, r.enhanced or "4.0.0", r.last_reply, remote,
                                   action="delayed", original_recipient=original,
                                   last_attempt=r.last_attempt,
                                   will_retry_until=envelope.arrived
                                   + config.delivery.max_queue_time)
        if r.relayed:
            return FailedRecipient(r.address, r.enhanced or "2.0.0", r.last_reply, remote,
                                   action="relayed", original_recipient=original)
        # Final delivery: our own diagnostic names a mailbox path, which is not the sender's
        # business.
        return FailedRecipient(r.address, "2.0.0", None, None, action="delivered",
                               original_recipient=original)


def _reject_result(decision: RouteDecision) -> DeliveryResult:
    result = decision.as_delivery_result()
    assert result is not None  # routing gives every reject its reply
    return result


def _recipient(envelope: Envelope, index: int) -> EnvelopeRecipient:
    """The envelope's recipient ``index`` with its DSN parameters (the queue state has one
    per envelope recipient; the spool checks that when it loads a message)."""
    if index < len(envelope.recipients):
        return envelope.recipients[index]
    return EnvelopeRecipient("")


def _dsn_due(envelope: Envelope, rcpt: EnvelopeRecipient, event: str) -> bool:
    """Whether the sender gets a DSN on ``event`` for ``rcpt``: never about a message from
    ``<>`` (RFC 5321 §6.1), otherwise as its NOTIFY asks."""
    return should_bounce(envelope.sender) and rcpt.notify_on(event)


def _view(entry: _Entry) -> QueuedMessage:
    return QueuedMessage(entry.stored, entry.state, entry.deleted)


def _all_done(groups: list[Deferred]) -> Deferred:
    """Fires with None once every group has finished; failures are consumed.

    Most attempts are one group: then no DeferredList is needed for it.
    """
    if len(groups) == 1:
        return groups[0].addBoth(_discard)
    return DeferredList(groups, consumeErrors=True).addCallback(_discard)


def _discard(_: object) -> None:
    return None


# Mail comes from few client addresses: parse each once (ValueError is not cached).
_client_ip = functools.lru_cache(maxsize=1024)(ip_address)


class UnknownMessage(KeyError):  # noqa: N818 - the name the control protocol uses
    """An operator named queue ids that are not in the queue."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        self.ids = ids

    def __str__(self) -> str:
        return "no such message: " + ", ".join(self.ids)


def recipient_state_name(r: RecipientState, held: bool) -> str:
    """What an operator sees: pending (never tried), deferred (tried), held, or final."""
    if r.status != "pending":
        return r.status
    if held:
        return "held"
    return "deferred" if r.attempts else "pending"
