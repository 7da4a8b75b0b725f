"""The queue manager with recording couriers, a fake clock and a real spool."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from relaygw.config import parse_config
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.queue.manager import QueueManager
from relaygw.queue.state import DELIVERED, FAILED, PENDING
from relaygw.queue.store import new_queue_id
from relaygw.results import delivered, permanent, transient
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
        self.manager = QueueManager(self.spool, self.config,
                                    {"smarthost": self.smarthost, "mx": self.mx},
                                    self.clock, rng=random.Random(7))

    def config(self):
        return parse_config({
            "server": {"hostname": "relay.test"},
            "listeners": [{"address": "127.0.0.1:0"}],
            "smarthosts": {"up": {"hosts": ["127.0.0.1:2626"], "tls": "none"}},
            "delivery": {"retry_intervals": [60, 300], "max_queue_time": 1000},
            "routes": self.routes,
        }, Path("/nonexistent"))

    def accept(self, sender="a@s.example", rcpts=("b@corp.example",)):
        env = Envelope(queue_id=new_queue_id(), sender=sender,
                       recipients=tuple(EnvelopeRecipient(r) for r in rcpts),
                       arrived=self.clock.seconds(), client_ip="127.0.0.1")
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
