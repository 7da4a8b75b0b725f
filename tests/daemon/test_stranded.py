"""RelayService.queue_stranded(): spool files a worker committed but never reported.

A worker killed between its spool commit and its report leaves a queue file the
queue manager does not know. After a worker dies, the main process scans the spool
(``_worker_died`` arms the scan ``stranded_after + 1`` seconds later) and queues the
files nobody knows that are older than ``stranded_after``.

No threads and no sockets: the service's spool is a ``SynchronousSpool`` on tmp_path,
the reactor a ``MemoryReactorClock`` set to the wall clock (file ages are wall-clock
ages), the service is never started (only its queue manager is), and the courier
records the jobs it is handed and never finishes them (so a message stays queued).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from relaygw.config import load_config
from relaygw.daemon import wiring
from relaygw.daemon.service import RelayService
from relaygw.delivery.courier import DeliveryJob
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.queue.store import StoredMessage, new_queue_id
from relaygw.testing import SynchronousSpool

STRANDED_AFTER = 10.0
CONTENT = b"Subject: stranded\r\n\r\nbody\r\n"


def fired(d: Deferred) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


class Courier:
    """Takes jobs and never answers: a message handed over stays in the queue."""

    def __init__(self) -> None:
        self.jobs: list[DeliveryJob] = []

    def deliver(self, job: DeliveryJob) -> Deferred:
        self.jobs.append(job)
        return Deferred()

    def queue_ids(self) -> list[str]:
        return [job.queue_id for job in self.jobs]


class Daemon:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "relaygw.toml"
        path.write_text('[server]\nhostname = "relay.test"\nspool_dir = "spool"\nworkers = 2\n'
                        '[dns]\nnameservers = ["127.0.0.1:9"]\n'
                        '[[listeners]]\naddress = "127.0.0.1:0"\ntls = "none"\nauth = "none"\n'
                        '[[routes]]\naction = "maildir"\nmaildir = "mail/{domain}/{localpart}"\n')
        config = load_config(path)
        # Every part of the core (queue, receive stage, service) shares this spool.
        monkeypatch.setattr(wiring, "Spool",
                            lambda directory, reactor, pool: SynchronousSpool(directory))
        self.reactor = MemoryReactorClock()
        # Queue times are Unix times; a whole second, so clock sums below are exact.
        self.reactor.advance(float(int(time.time())))
        self.service = RelayService(config, self.reactor, stranded_after=STRANDED_AFTER)
        self.spool = self.service.spool
        assert isinstance(self.spool, SynchronousSpool)
        self.spool.recover()  # the layout, as SpoolService does at start-up
        self.courier = Courier()
        self.service.manager.couriers["maildir"] = self.courier
        self.service.manager.startService()
        self.enqueued: list[str] = []
        enqueued = self.service.manager.enqueued

        def count(stored: StoredMessage) -> None:
            self.enqueued.append(stored.envelope.queue_id)
            enqueued(stored)

        self.service.manager.enqueued = count  # type: ignore[method-assign]

    def store(self, age: float) -> tuple[str, StoredMessage]:
        """A message committed as a worker commits it, not reported to the queue, its
        file last changed ``age`` seconds ago."""
        envelope = Envelope(new_queue_id(), "a@local.example",
                            (EnvelopeRecipient("b@local.example"),), time.time() - age,
                            client_ip="127.0.0.1")
        writer = self.spool.new_message(envelope)
        assert writer.write(CONTENT) is None
        assert fired(writer.commit()) == envelope.queue_id
        path = self.spool.queue_dir / envelope.queue_id
        os.utime(path, (time.time() - age, time.time() - age))
        return envelope.queue_id, writer.stored

    def scans_pending(self) -> int:
        return sum(1 for call in self.reactor.getDelayedCalls()
                   if call.func == self.service.queue_stranded)


@pytest.fixture
def daemon(tmp_path, monkeypatch) -> Daemon:
    return Daemon(tmp_path, monkeypatch)


def test_an_old_unreported_message_is_queued_exactly_once(daemon):
    queue_id, _ = daemon.store(age=60)
    assert fired(daemon.service.queue_stranded()) == [queue_id]
    assert daemon.service.manager.knows(queue_id)
    assert daemon.enqueued == [queue_id]
    assert daemon.courier.queue_ids() == [queue_id]
    (job,) = daemon.courier.jobs
    assert [d.recipient for d in job.decisions] == ["b@local.example"]
    assert job.content.read_all() == CONTENT  # the message as the worker stored it
    # A second scan finds it known: not queued (nor delivered) twice.
    assert fired(daemon.service.queue_stranded()) == []
    assert daemon.enqueued == [queue_id]
    assert daemon.courier.queue_ids() == [queue_id]


def test_a_fresh_unreported_message_is_left_for_its_report(daemon):
    queue_id, _ = daemon.store(age=0)
    assert fired(daemon.service.queue_stranded()) == []
    assert not daemon.service.manager.knows(queue_id)
    assert daemon.enqueued == [] and daemon.courier.jobs == []


def test_a_message_just_younger_than_stranded_after_is_left(daemon):
    young, _ = daemon.store(age=STRANDED_AFTER - 2)
    old, _ = daemon.store(age=STRANDED_AFTER + 2)
    assert fired(daemon.service.queue_stranded()) == [old]
    assert daemon.enqueued == [old]
    assert not daemon.service.manager.knows(young)


def test_a_reported_message_is_not_queued_again(daemon):
    queue_id, stored = daemon.store(age=60)
    daemon.service.manager.enqueued(stored)  # the worker's report arrived
    assert fired(daemon.service.queue_stranded()) == []
    assert daemon.enqueued == [queue_id]
    assert daemon.courier.queue_ids() == [queue_id]


def test_only_the_unknown_ones_of_many_are_queued(daemon):
    reported, stored = daemon.store(age=60)
    daemon.service.manager.enqueued(stored)
    first, _ = daemon.store(age=60)
    second, _ = daemon.store(age=45)
    assert sorted(fired(daemon.service.queue_stranded())) == sorted([first, second])
    assert sorted(daemon.enqueued) == sorted([reported, first, second])
    assert sorted(daemon.courier.queue_ids()) == sorted([reported, first, second])


def test_an_unreadable_file_does_not_stop_the_others(daemon):
    garbage = daemon.spool.queue_dir / "1A0000000000AAAAA"
    garbage.write_bytes(b"not a spool file\n")
    os.utime(garbage, (time.time() - 60, time.time() - 60))
    queue_id, _ = daemon.store(age=60)
    assert fired(daemon.service.queue_stranded()) == [queue_id]
    assert daemon.enqueued == [queue_id]
    assert garbage.exists()  # left where it is for the next start-up's recovery


def test_nothing_is_queued_once_the_queue_has_stopped(daemon):
    queue_id, _ = daemon.store(age=60)
    fired(daemon.service.manager.stopService())
    assert fired(daemon.service.queue_stranded()) == []
    assert daemon.enqueued == []


def test_the_scan_runs_stranded_after_plus_one_seconds_after_a_worker_died(daemon):
    queue_id, _ = daemon.store(age=60)
    daemon.service._worker_died()
    daemon.reactor.advance(STRANDED_AFTER + 1 - 0.25)
    assert daemon.enqueued == []  # reports on their way may still arrive
    assert daemon.scans_pending() == 1
    daemon.reactor.advance(0.25)
    assert daemon.enqueued == [queue_id]
    assert daemon.scans_pending() == 0
    assert daemon.courier.queue_ids() == [queue_id]


def test_deaths_while_a_scan_is_pending_share_it(daemon):
    queue_id, _ = daemon.store(age=60)
    daemon.service._worker_died()
    daemon.reactor.advance(5)
    daemon.service._worker_died()  # a second worker dies: the scan already armed serves
    assert daemon.scans_pending() == 1
    daemon.reactor.advance(STRANDED_AFTER + 1 - 5)
    assert daemon.enqueued == [queue_id]
    assert daemon.scans_pending() == 0
    # A death after the scan has run arms a new one.
    later, _ = daemon.store(age=60)
    daemon.service._worker_died()
    assert daemon.scans_pending() == 1
    daemon.reactor.advance(STRANDED_AFTER + 1)
    assert daemon.enqueued == [queue_id, later]
