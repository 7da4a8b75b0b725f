"""The queue manager with recording couriers, a fake clock and a real spool."""

from __future__ import annotations

import email
import random
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from relaygw.config import parse_config
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.queue import manager as manager_module
from relaygw.queue.manager import QueueManager
from relaygw.queue.state import DELIVERED, FAILED, PENDING
from relaygw.queue.store import new_queue_id
from relaygw.results import PASSED_ON, RELAYED, delivered, permanent, transient
from relaygw.testing import SynchronousSpool

BODY = b"Subject: test\r\nFrom: a@s.example\r\n\r\nhello\r\n"


class RecordingCourier:
    """Answers each job with the next scripted results (or a pending Deferred)."""

    def __init__(self):
        self.jobs = []
        self.contents = []  # message bytes as the courier saw them
        self.script = []

    def deliver(self, job):
        self.jobs.append(job)
        self.contents.append(job.content.read_all())
        answer = self.script.pop(0) if self.script else None
        if isinstance(answer, Deferred):
            return answer
        if answer is None:
            answer = [delivered("250 ok", code=250)] * len(job.decisions)
        return succeed(answer)


class World:
    def __init__(self, tmp_path):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.spool = SynchronousSpool(tmp_path / "spool")
        self.spool.recover()
        self.routes = [
            {"recipient_domains": ["corp.example"], "action": "smarthost", "smarthost": "up"},
            {"recipients": ["re:^noreply-"], "action": "reject",
             "reply": "550 5.1.1 Mailbox unavailable"},
            {"action": "mx"},
        ]
        self.smarthost = RecordingCourier()
        self.mx = RecordingCourier()
        self.local = RecordingCourier()
        self.delivery = {"retry_intervals": [60, 300], "max_queue_time": 1000}
        self.manager = self.new_manager()

    def new_manager(self):
        return QueueManager(self.spool, self.config,
                            {"smarthost": self.smarthost, "mx": self.mx, "maildir": self.local},
                            self.clock, rng=random.Random(7))

    def config(self):
        return parse_config({
            "server": {"hostname": "relay.test"},
            "listeners": [{"address": "127.0.0.1:0"}],
            "smarthosts": {"up": {"hosts": ["127.0.0.1:2626"], "tls": "none"}},
            "delivery": self.delivery,
            "routes": self.routes,
        }, Path("/nonexistent"))

    def accept(self, sender="a@s.example", rcpts=("b@corp.example",), rcpt_params=None,
               params=None):
        rcpt_params = rcpt_params or [{}] * len(rcpts)
        env = Envelope(queue_id=new_queue_id(), sender=sender,
                       recipients=tuple(EnvelopeRecipient(r, p)
                                        for r, p in zip(rcpts, rcpt_params, strict=True)),
                       arrived=self.clock.seconds(), client_ip="127.0.0.1",
                       params=params or {})
        writer = self.spool.new_message(env)
        writer.write(BODY)
        writer.commit()
        self.manager.enqueued(writer.stored)
        return env.queue_id

    def queued(self):
        return sorted(p.name for p in self.spool.queue_dir.iterdir())

    def state(self, queue_id):
        return self.spool._load(queue_id).state


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_delivered_message_is_removed(world):
    queue_id = world.accept(rcpts=("b@corp.example", "c@corp.example"))
    (job,) = world.smarthost.jobs
    assert job.queue_id == queue_id
    assert [d.recipient for d in job.decisions] == ["b@corp.example", "c@corp.example"]
    assert world.queued() == []


def test_recipients_are_grouped_by_next_hop(world):
    world.accept(rcpts=("b@corp.example", "x@one.example", "y@two.example", "z@one.example"))
    assert [[d.recipient for d in j.decisions] for j in world.smarthost.jobs] == [
        ["b@corp.example"]]
    assert [[d.recipient for d in j.decisions] for j in world.mx.jobs] == [
        ["x@one.example", "z@one.example"], ["y@two.example"]]


def test_transient_failure_is_retried_with_jitter_until_delivered(world):
    world.smarthost.script = [[transient("4.4.1", "connection refused")]]
    queue_id = world.accept()
    state = world.state(queue_id).recipients[0]
    assert state.status == PENDING and state.attempts == 1
    assert state.last_reply == "4.4.1 connection refused"
    delay = state.next_attempt - world.clock.seconds()
    assert 48 <= delay <= 72  # 60 s +-20 %
    world.clock.advance(delay - 1)
    assert len(world.smarthost.jobs) == 1
    world.clock.advance(1)
    assert len(world.smarthost.jobs) == 2
    assert world.queued() == []


def test_later_retries_use_the_last_interval(world):
    world.smarthost.script = [[transient("4.4.1", "down")]] * 3
    queue_id = world.accept()
    for _ in range(2):
        world.clock.advance(world.state(queue_id).recipients[0].next_attempt
                            - world.clock.seconds())
    state = world.state(queue_id).recipients[0]
    assert state.attempts == 3
    assert 240 <= state.next_attempt - world.clock.seconds() <= 360


def test_permanent_failure_bounces_once_to_the_sender(world):
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550,
                                         remote="mx.corp.example[127.0.0.1]:25")]]
    queue_id = world.accept()
    assert queue_id not in world.queued()
    (bounce_job,) = world.mx.jobs  # the DSN, routed like any message
    assert bounce_job.envelope.sender == ""
    assert [d.recipient for d in bounce_job.decisions] == ["a@s.example"]
    dsn = world.mx.contents[0]
    assert b"Status: 5.1.1" in dsn and b"Final-Recipient: rfc822; b@corp.example" in dsn
    assert b"Diagnostic-Code: smtp; 550 5.1.1 No such user" in dsn
    assert b"Subject: test" in dsn  # the original headers are attached
    assert world.queued() == []


def test_no_bounce_for_a_null_sender(world):
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550)]]
    world.accept(sender="")
    assert world.mx.jobs == []
    assert world.queued() == []


def test_expiry_fails_the_recipient_with_4_4_7_and_bounces(world):
    world.smarthost.script = [[transient("4.4.1", "down")]] * 20
    world.accept()
    for _ in range(20):
        world.clock.advance(400)
    (bounce_job,) = world.mx.jobs
    dsn = world.mx.contents[0]
    assert b"Status: 4.4.7" in dsn
    assert world.queued() == []


def test_route_that_now_rejects_fails_the_recipient_at_delivery(world):
    world.accept(rcpts=("noreply-x@corp2.example",))
    (bounce_job,) = world.mx.jobs
    dsn = world.mx.contents[0]
    assert b"Status: 5.1.1" in dsn


def test_routing_is_evaluated_again_at_each_attempt(world):
    world.mx.script = [[transient("4.4.1", "down")]]
    queue_id = world.accept(rcpts=("b@moved.example",))
    assert len(world.mx.jobs) == 1
    world.routes.insert(0, {"recipient_domains": ["moved.example"], "action": "smarthost",
                            "smarthost": "up"})
    world.clock.advance(100)
    assert len(world.smarthost.jobs) == 1
    assert queue_id not in world.queued()


def test_outcomes_are_saved_before_the_bounce_is_queued(world, monkeypatch):
    events = []
    real_save = world.spool.save_state
    monkeypatch.setattr(world.spool, "save_state", lambda qid, st: (
        events.append(("save", [(r.status, r.notified) for r in st.recipients]))
        if st.recipients[0].address == "b@corp.example" else None,
        real_save(qid, st))[1])
    real_new = world.spool.new_message
    monkeypatch.setattr(world.spool, "new_message",
                        lambda env: (events.append(("dsn", env.sender)), real_new(env))[1])
    world.smarthost.script = [[permanent("5.1.1", "No such user")]]
    world.accept()
    assert events[0] == ("dsn", "a@s.example")  # the original, as accepted
    assert events[1:4] == [("save", [(FAILED, False)]), ("dsn", ""), ("save", [(FAILED, True)])]


def test_partial_results_are_saved_as_each_group_finishes(world):
    pending = Deferred()
    world.mx.script = [pending]
    queue_id = world.accept(rcpts=("b@corp.example", "x@slow.example"))
    states = world.state(queue_id).recipients
    assert [s.status for s in states] == [DELIVERED, PENDING]
    pending.callback([delivered()])
    assert world.queued() == []


def test_recovered_failures_without_a_dsn_are_bounced_at_start(world, tmp_path):
    world.smarthost.script = [Deferred()]  # never answers: the "crash" point
    queue_id = world.accept()
    from dataclasses import replace

    state = world.state(queue_id)
    failed = replace(state.recipients[0], status=FAILED, enhanced="5.1.1",
                     last_reply="550 5.1.1 No such user")
    world.spool.save_state(queue_id, state.with_recipient(0, failed))
    fresh = QueueManager(world.spool, world.config, {"smarthost": world.smarthost,
                                                     "mx": world.mx}, world.clock)
    fresh.load(world.spool.recover())
    (bounce_job,) = world.mx.jobs
    assert bounce_job.envelope.recipients[0].address == "a@s.example"
    assert queue_id not in world.queued()


def test_jobs_carry_the_spool_content_of_the_message(world):
    world.accept(rcpts=("b@corp.example",))
    (job,) = world.smarthost.jobs
    assert job.content.size == len(BODY)
    assert world.smarthost.contents == [BODY]  # read while the courier had the job
    assert job.indexes == (0,)


# -- the public read API ----------------------------------------------------------------------


def test_read_api_of_an_empty_queue(world):
    assert world.manager.queued_ids() == set()
    assert len(world.manager) == 0
    assert world.manager  # an empty queue is still a manager
    assert world.manager.oldest_arrival() is None
    assert world.manager.messages() == []
    assert world.manager.message("NOPE") is None
    assert not world.manager.knows("NOPE")


def test_read_api_reports_what_is_queued(world):
    world.smarthost.script = [[transient("4.4.1", "down")], [transient("4.4.1", "down")]]
    first = world.accept()
    arrived = world.clock.seconds()
    world.clock.advance(10)
    second = world.accept(rcpts=("c@corp.example",))
    ids = world.manager.queued_ids()
    assert ids == {first, second}
    ids.clear()  # a copy: the manager is not changed
    assert world.manager.knows(first) and world.manager.knows(second)
    assert len(world.manager) == 2
    assert world.manager.oldest_arrival() == arrived
    shown = world.manager.message(first)
    assert shown.queue_id == first and not shown.deleted
    assert shown.stored.size == len(BODY)
    assert shown.state == world.state(first)
    assert shown.state.recipients[0].attempts == 1
    assert sorted(m.queue_id for m in world.manager.messages()) == sorted([first, second])


def test_read_api_shows_a_deleted_message_until_its_attempt_ends(world):
    pending = Deferred()
    world.smarthost.script = [pending]
    queue_id = world.accept()
    world.manager.delete([queue_id])
    assert world.manager.knows(queue_id)
    assert world.manager.message(queue_id).deleted
    assert [m.deleted for m in world.manager.messages()] == [True]
    pending.callback([transient("4.4.1", "down")])
    assert not world.manager.knows(queue_id)
    assert world.manager.message(queue_id) is None and len(world.manager) == 0


# -- DSNs as NOTIFY, RET and ENVID ask (RFC 3461) -------------------------------------------------

MAILBOX_ROUTE = {"recipient_domains": ["mbox.example"], "action": "maildir",
                 "maildir": "/var/mail/{domain}/{localpart}"}
RELAYED_OK = delivered("Ok: queued as 4XyZ", code=250,
                       remote="mx.corp.example[127.0.0.1]:25", handoff=RELAYED)


def report(raw):
    """A DSN parsed with the email package: (message, per-message fields, per-recipient
    fields, the returned part)."""
    message = email.message_from_bytes(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, returned = message.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    return message, per_message, per_recipient, returned


def returned_bytes(raw):
    """The returned part's Content-Type line and its exact bytes, cut from the raw DSN."""
    boundary = email.message_from_bytes(raw).get_boundary().encode()
    head, _, body = raw.split(b"\r\n--" + boundary)[3].partition(b"\r\n\r\n")
    return head.strip(), body


@pytest.fixture
def mailbox_world(world):
    world.routes.insert(0, MAILBOX_ROUTE)
    return world


@pytest.mark.parametrize("notify", ["NEVER", "SUCCESS", "DELAY", "SUCCESS,DELAY"])
def test_no_failure_dsn_unless_notify_asks_for_it(world, notify):
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550)]]
    world.accept(rcpt_params=[{"NOTIFY": notify}])
    assert world.mx.jobs == []
    assert world.queued() == []


def test_notify_failure_gets_the_failure_dsn(world):
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550,
                                         remote="mx.corp.example[127.0.0.1]:25")]]
    world.accept(rcpt_params=[{"NOTIFY": "FAILURE"}])
    (dsn,) = world.mx.contents
    message, _, (bob,), _ = report(dsn)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert (bob["Final-Recipient"], bob["Action"], bob["Status"]) == (
        "rfc822; b@corp.example", "failed", "5.1.1")


def test_notify_never_for_one_recipient_leaves_it_out_of_the_bounce(world):
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550)] * 2]
    world.accept(rcpts=("b@corp.example", "c@corp.example"),
                 rcpt_params=[{"NOTIFY": "NEVER"}, {}])
    (dsn,) = world.mx.contents
    _, _, recipients, _ = report(dsn)
    assert [r["Final-Recipient"] for r in recipients] == ["rfc822; c@corp.example"]


def test_success_into_a_mailbox_gives_a_delivered_dsn(mailbox_world):
    world = mailbox_world
    world.local.script = [[delivered("delivered to maildir /var/mail/mbox.example/bob")]]
    queue_id = world.accept(rcpts=("bob@mbox.example",), params={"ENVID": "QQ+2B314159"},
                            rcpt_params=[{"NOTIFY": "SUCCESS,FAILURE",
                                          "ORCPT": "rfc822;Bob+2BSmith@mbox.example"}])
    (job,) = world.mx.jobs
    assert job.envelope.sender == "" and job.envelope.recipients[0].address == "a@s.example"
    message, per_message, (bob,), returned = report(world.mx.contents[0])
    assert message["Subject"] == "Successful Mail Delivery Report"
    assert message["Auto-Submitted"] == "auto-replied"
    assert per_message["Original-Envelope-Id"] == "QQ+314159"
    assert per_message["X-Relaygw-Queue-ID"] == queue_id
    assert dict(bob.items()) == {"Original-Recipient": "rfc822; Bob+Smith@mbox.example",
                                 "Final-Recipient": "rfc822; bob@mbox.example",
                                 "Action": "delivered", "Status": "2.0.0"}
    assert b"/var/mail" not in world.mx.contents[0]  # our own path is not the sender's business
    assert returned_bytes(world.mx.contents[0]) == (
        b"Content-Type: text/rfc822-headers", b"Subject: test\r\nFrom: a@s.example\r\n")
    assert world.queued() == []


def test_success_relayed_to_a_hop_without_dsn_gives_a_relayed_dsn(world):
    world.smarthost.script = [[RELAYED_OK]]
    world.accept(rcpt_params=[{"NOTIFY": "SUCCESS"}])
    _, _, (bob,), returned = report(world.mx.contents[0])
    assert dict(bob.items()) == {"Final-Recipient": "rfc822; b@corp.example",
                                 "Action": "relayed", "Status": "2.0.0",
                                 "Remote-MTA": "dns; mx.corp.example",
                                 "Diagnostic-Code": "smtp; 250 2.0.0 Ok: queued as 4XyZ"}
    assert returned.get_content_type() == "text/rfc822-headers"
    assert world.queued() == []


def test_success_passed_on_to_a_hop_with_dsn_is_its_to_report(world, monkeypatch):
    saves = []
    monkeypatch.setattr(world.spool, "save_state", lambda *a: saves.append(a))
    world.smarthost.script = [[replace(RELAYED_OK, handoff=PASSED_ON)]]
    world.accept(rcpt_params=[{"NOTIFY": "SUCCESS"}])
    assert world.mx.jobs == []
    assert saves == [] and world.queued() == []  # done at once: nothing to remember


@pytest.mark.parametrize("rcpt,params", [("bob@mbox.example", {"NOTIFY": "FAILURE,DELAY"}),
                                         ("b@corp.example", {})])
def test_no_success_dsn_without_notify_success(mailbox_world, monkeypatch, rcpt, params):
    saves = []
    monkeypatch.setattr(mailbox_world.spool, "save_state", lambda *a: saves.append(a))
    mailbox_world.smarthost.script = [[RELAYED_OK]]
    mailbox_world.accept(rcpts=(rcpt,), rcpt_params=[params])
    assert len(mailbox_world.local.jobs + mailbox_world.smarthost.jobs) == 1
    assert mailbox_world.mx.jobs == []
    assert saves == [] and mailbox_world.queued() == []


def test_never_a_dsn_about_a_message_from_the_null_sender(mailbox_world):
    mailbox_world.accept(sender="", rcpts=("bob@mbox.example",),
                         rcpt_params=[{"NOTIFY": "SUCCESS,FAILURE,DELAY"}])
    assert mailbox_world.mx.jobs == [] and mailbox_world.queued() == []


def test_failed_and_delivered_recipients_get_one_dsn_each(mailbox_world):
    world = mailbox_world
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550)]]
    world.accept(rcpts=("bob@mbox.example", "b@corp.example"),
                 rcpt_params=[{"NOTIFY": "SUCCESS"}, {"NOTIFY": "SUCCESS,FAILURE"}])
    reports = [report(raw) for raw in world.mx.contents]
    assert sorted((m["Subject"], [(r["Final-Recipient"], r["Action"]) for r in rcpts])
                  for m, _, rcpts, _ in reports) == [
        ("Successful Mail Delivery Report", [("rfc822; bob@mbox.example", "delivered")]),
        ("Undelivered Mail Returned to Sender", [("rfc822; b@corp.example", "failed")])]
    assert world.queued() == []


def test_success_dsn_is_committed_between_two_saves(world, monkeypatch):
    events = []
    real_save = world.spool.save_state
    monkeypatch.setattr(world.spool, "save_state", lambda qid, st: (
        events.append(("save", [(r.status, r.relayed, r.notified) for r in st.recipients]))
        if st.recipients[0].address == "b@corp.example" else None,
        real_save(qid, st))[1])
    real_new = world.spool.new_message
    monkeypatch.setattr(world.spool, "new_message",
                        lambda env: (events.append(("dsn", env.sender)), real_new(env))[1])
    world.smarthost.script = [[RELAYED_OK]]
    world.accept(rcpt_params=[{"NOTIFY": "SUCCESS"}])
    assert events == [("dsn", "a@s.example"), ("save", [(DELIVERED, True, False)]),
                      ("dsn", ""), ("save", [(DELIVERED, True, True)])]
    assert world.queued() == []


def test_recovered_delivery_without_its_success_dsn_gets_it_at_start(world):
    world.smarthost.script = [Deferred()]  # never answers: the "crash" point
    queue_id = world.accept(rcpt_params=[{"NOTIFY": "SUCCESS"}])
    state = world.state(queue_id)
    done = replace(state.recipients[0], status=DELIVERED, relayed=True, attempts=1,
                   last_reply="250 2.0.0 Ok", enhanced="2.0.0",
                   remote_host="mx.corp.example[127.0.0.1]:25")
    world.spool.save_state(queue_id, state.with_recipient(0, done))
    world.new_manager().load(world.spool.recover())
    _, _, (bob,), _ = report(world.mx.contents[0])
    assert (bob["Action"], bob["Remote-MTA"]) == ("relayed", "dns; mx.corp.example")
    assert queue_id not in world.queued()


def test_old_state_with_unmarked_deliveries_is_finished_without_a_dsn(world):
    world.smarthost.script = [Deferred()]
    queue_id = world.accept(rcpts=("b@corp.example", "c@corp.example"))
    state = world.state(queue_id)
    # As the code before success notices left it: delivered, notified never set.
    state = state.with_recipient(0, replace(state.recipients[0], status=DELIVERED, attempts=1))
    state = state.with_recipient(1, replace(state.recipients[1], status=FAILED, attempts=1,
                                            enhanced="5.1.1", notified=True))
    world.spool.save_state(queue_id, state)
    world.new_manager().load(world.spool.recover())
    assert world.mx.jobs == []
    assert queue_id not in world.queued()


# RET: what a failure DSN returns

def test_ret_full_returns_the_whole_message_as_message_rfc822(world):
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550)]]
    world.accept(params={"RET": "FULL"})
    (dsn,) = world.mx.contents
    assert returned_bytes(dsn) == (b"Content-Type: message/rfc822", BODY)
    *_, returned = report(dsn)
    assert returned.get_content_type() == "message/rfc822"
    (inner,) = returned.get_payload()
    assert (inner["Subject"], inner.get_payload()) == ("test", "hello\r\n")


@pytest.mark.parametrize("params", [{"RET": "HDRS"}, {}])
def test_ret_hdrs_or_no_ret_returns_the_header_only(world, params):
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550)]]
    world.accept(params=params)
    assert returned_bytes(world.mx.contents[0]) == (
        b"Content-Type: text/rfc822-headers", b"Subject: test\r\nFrom: a@s.example\r\n")


def test_ret_full_applies_to_failures_only(world):
    world.smarthost.script = [[RELAYED_OK]]
    world.accept(params={"RET": "FULL"}, rcpt_params=[{"NOTIFY": "SUCCESS"}])
    assert returned_bytes(world.mx.contents[0])[0] == b"Content-Type: text/rfc822-headers"


def test_ret_full_of_a_message_over_the_limit_returns_its_header(world, monkeypatch):
    monkeypatch.setattr(manager_module, "RETURN_FULL_LIMIT", len(BODY) - 1)
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550)]]
    world.accept(params={"RET": "FULL"})
    (dsn,) = world.mx.contents
    assert returned_bytes(dsn) == (
        b"Content-Type: text/rfc822-headers", b"Subject: test\r\nFrom: a@s.example\r\n")
    assert f"your message is larger than {len(BODY) - 1} bytes".encode() in dsn


def test_ret_full_reads_the_message_in_the_spool_threads(world, monkeypatch):
    ran = []
    real_run = world.spool.run
    monkeypatch.setattr(world.spool, "run", lambda fn, *a: (ran.append(fn.__name__),
                                                            real_run(fn, *a))[1])
    world.smarthost.script = [[permanent("5.1.1", "No such user", code=550)]]
    world.accept(params={"RET": "FULL"})
    assert "read_all" in ran


# DELAY: one warning after delay_warning_time

def delayed_world(world, warn_after=100):
    world.delivery["delay_warning_time"] = warn_after
    world.smarthost.script = [[transient("4.4.1", "connection refused",
                                         remote="mx.corp.example[127.0.0.1]:25")]] * 20
    return world


def next_attempt(world, queue_id):
    world.clock.advance(max(0.0, world.state(queue_id).recipients[0].next_attempt
                            - world.clock.seconds()))


@pytest.mark.parametrize("params", [{"NOTIFY": "DELAY"}, {"NOTIFY": "FAILURE,DELAY"}, {}])
def test_one_delay_warning_after_delay_warning_time(world, params):
    delayed_world(world)
    arrived = world.clock.seconds()
    queue_id = world.accept(rcpt_params=[params])
    next_attempt(world, queue_id)  # about 60 s after arrival: not yet
    assert world.mx.jobs == []
    next_attempt(world, queue_id)  # about 360 s: late
    (dsn,) = world.mx.contents
    message, _, (bob,), returned = report(dsn)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert (bob["Action"], bob["Status"], bob["Remote-MTA"]) == (
        "delayed", "4.4.1", "dns; mx.corp.example")
    assert bob["Diagnostic-Code"] == "x-relaygw; 4.4.1 connection refused"
    assert bob["Will-Retry-Until"] == email.utils.format_datetime(
        email.utils.datetime.datetime.fromtimestamp(arrived + 1000, email.utils.datetime.UTC))
    assert returned.get_content_type() == "text/rfc822-headers"
    state = world.state(queue_id).recipients[0]
    assert (state.status, state.delay_warned, state.notified) == (PENDING, True, False)
    next_attempt(world, queue_id)
    next_attempt(world, queue_id)
    assert len(world.mx.jobs) == 1  # once


@pytest.mark.parametrize("params", [{"NOTIFY": "NEVER"}, {"NOTIFY": "FAILURE"},
                                    {"NOTIFY": "SUCCESS"}])
def test_no_delay_warning_unless_asked_or_left_to_us(world, params):
    delayed_world(world)
    queue_id = world.accept(rcpt_params=[params])
    for _ in range(3):
        next_attempt(world, queue_id)
    assert world.mx.jobs == []


def test_delay_warning_time_zero_sends_none(world):
    delayed_world(world, warn_after=0)
    queue_id = world.accept(rcpt_params=[{"NOTIFY": "DELAY"}])
    for _ in range(3):
        next_attempt(world, queue_id)
    assert world.mx.jobs == []


def test_delay_warning_is_not_sent_again_after_a_restart(world):
    delayed_world(world)
    world.delivery["max_queue_time"] = 100_000  # no expiry bounce in the way
    queue_id = world.accept()
    next_attempt(world, queue_id)
    next_attempt(world, queue_id)
    assert len(world.mx.jobs) == 1
    world.manager.stopService()
    fresh = world.new_manager()
    fresh.load([m for m in world.spool.recover() if m.envelope.queue_id == queue_id])
    for _ in range(2):
        world.clock.advance(400)
    assert len(world.smarthost.jobs) >= 4  # it kept trying, and warned no more
    assert len(world.mx.jobs) == 1


def test_delay_warning_then_expiry_still_bounces(world):
    delayed_world(world)
    queue_id = world.accept()
    for _ in range(10):
        world.clock.advance(400)
    subjects = [report(raw)[0]["Subject"] for raw in world.mx.contents]
    assert subjects == ["Delayed Mail (still being retried)",
                        "Undelivered Mail Returned to Sender"]
    assert queue_id not in world.queued()


def test_delay_warning_is_committed_between_two_saves(world, monkeypatch):
    delayed_world(world, warn_after=1)
    events = []
    real_save = world.spool.save_state
    monkeypatch.setattr(world.spool, "save_state", lambda qid, st: (
        events.append(("save", [(r.attempts, r.delay_warned) for r in st.recipients]))
        if st.recipients[0].address == "b@corp.example" else None,
        real_save(qid, st))[1])
    real_new = world.spool.new_message
    monkeypatch.setattr(world.spool, "new_message",
                        lambda env: (events.append(("dsn", env.sender)), real_new(env))[1])
    queue_id = world.accept()
    next_attempt(world, queue_id)
    assert events == [("dsn", "a@s.example"), ("save", [(1, False)]),
                      ("save", [(2, False)]), ("dsn", ""), ("save", [(2, True)])]


def test_operator_bounce_honours_notify_never(world):
    world.smarthost.script = [[transient("4.4.1", "down")]] * 2
    queue_id = world.accept(rcpts=("b@corp.example", "c@corp.example"),
                            rcpt_params=[{"NOTIFY": "NEVER"}, {}])
    world.manager.bounce([queue_id])
    (dsn,) = world.mx.contents
    _, _, recipients, _ = report(dsn)
    assert [r["Final-Recipient"] for r in recipients] == ["rfc822; c@corp.example"]
    assert queue_id not in world.queued()
