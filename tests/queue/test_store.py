"""The durable spool: layout, commit order, recovery, failures."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool

from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.queue import store
from relaygw.queue.state import DELIVERED, QueueState
from relaygw.queue.store import Spool, SpoolError, StoredMessage, new_queue_id
from relaygw.testing import SynchronousSpool


def envelope(queue_id=None, rcpts=("b@x.example", "c@y.example")):
    return Envelope(queue_id=queue_id or new_queue_id(), sender="a@s.example",
                    recipients=tuple(EnvelopeRecipient(r) for r in rcpts), arrived=1000.0,
                    client_ip="127.0.0.1", helo="c.example", tls="TLSv1.3 X",
                    params={"BODY": "8BITMIME"})


def result_of(d: Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


@pytest.fixture
def spool(tmp_path):
    s = SynchronousSpool(tmp_path / "spool")
    s.recover()
    return s


def test_recover_creates_the_layout(spool):
    assert sorted(p.name for p in spool.directory.iterdir()) == ["corrupt", "queue", "tmp"]
    assert oct(spool.queue_dir.stat().st_mode & 0o777) == "0o700"


def test_committed_message_holds_envelope_and_exact_content(spool):
    env = envelope()
    writer = spool.new_message(env)
    body = b"Subject: x\r\n\r\n" + b"0123456789" * 60000  # several flushes
    for i in range(0, len(body), 8192):
        writer.write(body[i:i + 8192])
    assert result_of(writer.commit()) == env.queue_id
    assert list(spool.tmp_dir.iterdir()) == []
    stored = spool._load(env.queue_id)
    assert stored.envelope == env
    assert stored.state == QueueState.initial(env)
    assert stored.size == len(body)
    content = spool.content(stored)
    assert Path(content.path) == spool.queue_dir / env.queue_id
    assert (content.offset, content.size) == (stored.content_offset, len(body))
    raw = Path(content.path).read_bytes()
    assert raw[stored.content_offset:] == body
    assert content.read_all() == body
    assert oct(Path(content.path).stat().st_mode & 0o777) == "0o600"


def test_commit_fsyncs_file_and_directory_before_it_fires(spool, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(store.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    real_replace = os.replace
    monkeypatch.setattr(store.os, "replace",
                        lambda a, b: (calls.append("rename"), real_replace(a, b)))
    writer = spool.new_message(envelope())
    writer.write(b"x\r\n")
    d = writer.commit()
    assert calls == ["fsync", "rename", "fsync"]
    assert isinstance(result_of(d), str)


def test_abort_leaves_nothing(spool):
    writer = spool.new_message(envelope())
    writer.write(b"y" * (store.FLUSH_AT + 10))  # reaches the disk
    assert len(list(spool.tmp_dir.iterdir())) == 1
    result_of(writer.abort())
    assert list(spool.tmp_dir.iterdir()) == []
    assert list(spool.queue_dir.iterdir()) == []


def test_disk_full_fails_the_commit_with_no_space_and_cleans_up(spool, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    writer = spool.new_message(envelope())
    writer.write(b"z\r\n")
    failure = result_of(writer.commit())
    assert failure.check(SpoolError) and failure.value.no_space
    assert list(spool.tmp_dir.iterdir()) == []
    assert list(spool.queue_dir.iterdir()) == []


def test_write_error_while_streaming_is_reported_at_commit(spool, monkeypatch):
    def broken(fd, data):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store.os, "write", broken)
    writer = spool.new_message(envelope())
    writer.write(b"a" * (store.FLUSH_AT + 1))
    failure = result_of(writer.commit())
    assert failure.check(SpoolError) and not failure.value.no_space
    assert "Input/output error" in str(failure.value)
    assert list(spool.queue_dir.iterdir()) == []


def test_failed_directory_sync_withdraws_the_message(spool, monkeypatch):
    def broken(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store, "fsync_dir", broken)
    writer = spool.new_message(envelope())
    writer.write(b"a\r\n")
    assert result_of(writer.commit()).check(SpoolError)
    assert list(spool.queue_dir.iterdir()) == []


def test_state_is_saved_and_reloaded(spool):
    env = envelope()
    writer = spool.new_message(env)
    result_of(writer.commit())
    state = QueueState.initial(env)
    state = state.with_recipient(0, state.recipients[0].__class__(
        "b@x.example", status=DELIVERED, attempts=1, last_reply="250 ok"))
    result_of(spool.save_state(env.queue_id, state))
    assert spool._load(env.queue_id).state == state
    assert list(spool.tmp_dir.iterdir()) == []


def test_a_state_file_written_before_dsn_fields_existed_still_loads(spool):
    env = envelope()
    result_of(spool.new_message(env).commit())
    # Exactly what the code before success notices and delay warnings wrote.
    (spool.queue_dir / f"{env.queue_id}.state").write_bytes(
        b'{"recipients":[{"address":"b@x.example","status":"pending","attempts":2,'
        b'"next_attempt":1600.0,"last_attempt":1300.0,"last_reply":"4.4.1 down",'
        b'"enhanced":"4.4.1","remote_host":null,"notified":false},'
        b'{"address":"c@y.example","status":"failed","attempts":1,"next_attempt":1000.0,'
        b'"last_attempt":1000.0,"last_reply":"550 5.1.1 no","enhanced":"5.1.1",'
        b'"remote_host":"mx.y.example[192.0.2.1]:25","notified":true}],"held":false}')
    b, c = spool._load(env.queue_id).state.recipients
    assert (b.attempts, b.delay_warned, b.relayed, b.notified) == (2, False, False, False)
    assert (c.status, c.delay_warned, c.relayed, c.notified) == ("failed", False, False, True)


def test_remove_deletes_message_and_state(spool):
    env = envelope()
    result_of(spool.new_message(env).commit())
    result_of(spool.save_state(env.queue_id, QueueState.initial(env)))
    result_of(spool.remove(env.queue_id))
    assert list(spool.queue_dir.iterdir()) == []


def test_recovery_removes_leftovers_and_quarantines_unreadable_files(tmp_path):
    spool = SynchronousSpool(tmp_path / "spool")
    spool.recover()
    good = envelope()
    result_of(spool.new_message(good).commit())
    (spool.tmp_dir / "HALFWRITTEN").write_bytes(b"RELAYGW-SPOOL 1\n12\n{")
    (spool.queue_dir / "GARBAGE").write_bytes(b"not a spool file")
    truncated = envelope()
    raw = store.MAGIC + b"500\n" + truncated.to_json()[:20]
    (spool.queue_dir / truncated.queue_id).write_bytes(raw)
    (spool.queue_dir / "GONE.state").write_bytes(b"{}")
    bad_state = envelope()
    result_of(spool.new_message(bad_state).commit())
    (spool.queue_dir / (bad_state.queue_id + ".state")).write_bytes(b"{broken")

    messages = Spool.recover(spool)
    assert [m.envelope.queue_id for m in messages] == [good.queue_id]
    assert list(spool.tmp_dir.iterdir()) == []
    assert sorted(p.name for p in spool.queue_dir.iterdir()) == [good.queue_id]
    assert sorted(p.name for p in spool.corrupt_dir.iterdir()) == sorted(
        ["GARBAGE", truncated.queue_id, bad_state.queue_id, bad_state.queue_id + ".state"])


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _syncing_threads(group, n):
    errors = []

    def sync():
        try:
            group.sync()
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=sync) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, errors


def test_directory_syncs_are_shared_by_callers_waiting_together(tmp_path, monkeypatch):
    calls, release = [], threading.Event()

    def slow_fsync_dir(path):
        calls.append(path)
        if len(calls) == 1:
            release.wait(10)

    monkeypatch.setattr(store, "fsync_dir", slow_fsync_dir)
    group = store._GroupSync(tmp_path)
    first, _ = _syncing_threads(group, 1)
    _wait_for(lambda: len(calls) == 1)  # the first caller's sync is running
    others, errors = _syncing_threads(group, 4)
    _wait_for(lambda: len(group._cond._waiters) == 4)
    assert len(calls) == 1  # none of them counts on the sync that began before it came
    release.set()
    for t in first + others:
        t.join(10)
    assert len(calls) == 2 and errors == []  # the other four share the next one


def test_a_failed_directory_sync_fails_its_whole_batch_only(tmp_path, monkeypatch):
    calls, release = [], threading.Event()

    def fsync_dir(path):
        calls.append(path)
        if len(calls) == 1:
            release.wait(10)
        elif len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store, "fsync_dir", fsync_dir)
    group = store._GroupSync(tmp_path)
    first, first_errors = _syncing_threads(group, 1)
    _wait_for(lambda: len(calls) == 1)
    batch, errors = _syncing_threads(group, 3)
    _wait_for(lambda: len(group._cond._waiters) == 3)
    release.set()
    for t in first + batch:
        t.join(10)
    assert first_errors == [] and len(errors) == 3
    assert all(e.errno == errno.EIO for e in errors)
    group.sync()  # the next batch succeeds
    assert len(calls) == 3


@pytest_twisted.inlineCallbacks
def test_commit_through_a_real_thread_pool(tmp_path):
    from twisted.internet import reactor

    pool = ThreadPool(1, 4, name="test-spool")
    pool.start()
    try:
        spool = Spool(tmp_path / "spool", reactor, pool)
        spool.recover()
        env = envelope()
        writer = spool.new_message(env)
        writer.write(b"hello\r\n")
        queue_id = yield writer.commit()
        stored = yield spool.load(queue_id)
        assert stored.envelope == env and stored.size == 7
        free = yield spool.refresh_free_space()
        assert free > 0 and spool.free_bytes == free
    finally:
        pool.stop()


def test_envelope_json_is_what_asdict_gives():
    import json
    from dataclasses import asdict

    env = Envelope(queue_id="ID", sender="", recipients=(
        EnvelopeRecipient("b@x.example", {"NOTIFY": "FAILURE", "ORCPT": "rfc822;b@x.example"}),
        EnvelopeRecipient("ü@y.example")), arrived=1.5, client_ip="::1", client_port=25,
        helo="c.example", tls=None, auth_user="alice", params={"BODY": "8BITMIME", "RET": None},
        smtputf8=True)
    expected = json.dumps(asdict(env), ensure_ascii=False, separators=(",", ":")).encode()
    assert env.to_json() == expected
    assert Envelope.from_json(env.to_json()) == env


# -- reading: content, the queue directory, the worker channel's form ---------------------


def test_content_reads_in_the_spool_run(spool):
    env = envelope()
    writer = spool.new_message(env)
    writer.write(b"Subject: x\r\n\r\nbody\r\n")
    result_of(writer.commit())
    calls = []
    real_run = spool.run
    spool.run = lambda fn, *args: (calls.append(fn), real_run(fn, *args))[1]
    content = spool.content(writer.stored)
    assert result_of(content.headers()) == b"Subject: x\r\n"
    assert len(calls) == 1


def test_queue_ids_lists_messages_oldest_first_without_state_files(spool):
    ids = ["18BCFE5680A1B2C2", "18BCFE5680A1B2C0", "18BCFE5680A1B2C1"]
    for queue_id in ids:
        result_of(spool.new_message(envelope(queue_id)).commit())
    result_of(spool.save_state(ids[0], QueueState.initial(envelope(ids[0]))))
    (spool.queue_dir / "GONE.state").write_bytes(b"{}")
    assert spool.queue_ids() == sorted(ids)


def test_queue_ids_of_a_missing_queue_directory_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        Spool(tmp_path / "nothing", reactor=None, threadpool=None).queue_ids()


def test_unqueued_names_old_files_nobody_knows(spool):
    old, known, new = (new_queue_id() for _ in range(3))
    for queue_id in (old, known, new):
        result_of(spool.new_message(envelope(queue_id)).commit())
    result_of(spool.save_state(old, QueueState.initial(envelope(old))))
    (spool.queue_dir / "STRAY.state").write_bytes(b"{}")
    cutoff = time.time() - 60
    for queue_id in (old, known):
        os.utime(spool.queue_dir / queue_id, (cutoff - 10, cutoff - 10))
    os.utime(spool.queue_dir / "STRAY.state", (cutoff - 10, cutoff - 10))
    assert spool.unqueued({known}, cutoff) == [old]
    assert spool.unqueued(frozenset(), cutoff) == sorted([old, known])
    assert spool.unqueued({old, known}, time.time() + 60) == [new]


def test_unqueued_skips_files_removed_while_it_looks(spool, monkeypatch):
    ids = sorted(new_queue_id() for _ in range(2))
    for queue_id in ids:
        result_of(spool.new_message(envelope(queue_id)).commit())
    real_scan = spool._scan

    def scan_then_remove():
        entries = real_scan()
        os.unlink(spool.queue_dir / ids[0])  # delivered between the listing and the stat
        return entries

    monkeypatch.setattr(spool, "_scan", scan_then_remove)
    assert spool.unqueued(set(), time.time() + 60) == [ids[1]]


def test_stored_message_encodes_as_the_worker_channel_always_did():
    env = envelope("18BCFE5680A1B2C3")
    stored = StoredMessage(env, QueueState.initial(env), 321, 4096)
    raw = stored.encode()
    assert raw == b"321 4096 " + env.to_json()
    assert StoredMessage.decode(raw) == stored


def test_stored_message_round_trip_keeps_spaces_in_the_envelope():
    env = Envelope(queue_id="Q1", sender="a b@s.example", recipients=(
        EnvelopeRecipient("ü@y.example", {"ORCPT": "rfc822;x y"}),), arrived=1.5,
        helo="with space", params={"BODY": None})
    stored = StoredMessage(env, QueueState.initial(env), 0, 0)
    assert StoredMessage.decode(stored.encode()) == stored


def test_stored_message_of_a_commit_round_trips(spool):
    writer = spool.new_message(envelope())
    writer.write(b"hello\r\n")
    result_of(writer.commit())
    decoded = StoredMessage.decode(writer.stored.encode())
    assert decoded == writer.stored
    assert spool.content(decoded).read_all() == b"hello\r\n"


def test_stored_message_decode_refuses_garbage():
    for raw in (b"", b"12", b"12 34", b"x 34 {}", b"12 34 not-json"):
        with pytest.raises((ValueError, KeyError, TypeError)):
            StoredMessage.decode(raw)
