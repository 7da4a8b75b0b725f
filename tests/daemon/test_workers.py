"""The channel between the main process and its SMTP workers, without processes:
the worker's encoding of log events and metrics (relaygw.daemon.workers.process), and the
main process's side (relaygw.daemon.workers.pool)
(WorkerPool: dispatch, the connection caps, releases, deaths and respawns, reloads)
driven with a fake reactor and fake worker transports."""

from __future__ import annotations

import base64
import json
import os
import socket
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from relaygw.config import ListenerConfig, default_config
from relaygw.daemon.wiring import WorkerSetup, prepare, worker_setup
from relaygw.daemon.workers import pool as handoff
from relaygw.daemon.workers.channel import EXIT_CONFIG
from relaygw.daemon.workers.pool import NO_WORKER, RESPAWN_FIRST, HandoffListener, WorkerPool
from relaygw.daemon.workers.process import (
    ForwardedMetrics,
    Worker,
    _Channel,
    _ForwardLog,
    encode_event,
)
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.observe import fields
from relaygw.observe.logs import event_as_dict
from relaygw.observe.metrics import Metrics
from relaygw.queue.state import QueueState
from relaygw.queue.store import StoredMessage
from relaygw.smtp.server import ConnectionCounter

ADDRESS = "127.0.0.1:2525"
SNAPSHOT = b"config of generation 1"
NEW_SNAPSHOT = b"config after the reload"
PER_CLIENT_REFUSAL = b"421 4.7.0 Too many connections from your address\r\n"
TOTAL_REFUSAL = b"421 4.7.0 Too many connections, try again later\r\n"


# -- relaygw.daemon.workers.process: what a worker sends ------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        return "<unprintable thing>"


def _failure() -> Failure:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        return Failure()
    raise AssertionError("not reached")


def test_encode_event_keeps_plain_values_and_stringifies_the_rest():
    event = {
        "log_level": LogLevel.warn, "log_namespace": "relaygw.smtp.server",
        "log_format": "connect client={client} port={port}", "log_time": 1700000000.25,
        "log_logger": Logger(), "log_source": object(), "log_io": "x", "log_trace": [],
        "client": "127.0.0.1", "port": 41000, "tls": False, "ratio": 0.5, "auth": None,
        "thing": Unprintable(), "data": b"bytes", "pair": (1, 2), "event": "connect",
    }
    raw = encode_event(event)
    assert json.loads(raw) == {
        "log_level": "warn", "log_namespace": "relaygw.smtp.server",
        "log_format": "{log_text}", "log_text": "connect client=127.0.0.1 port=41000",
        "log_time": 1700000000.25,
        "client": "127.0.0.1", "port": 41000, "tls": False, "ratio": 0.5, "auth": None,
        "thing": "<unprintable thing>", "data": "b'bytes'", "pair": "(1, 2)", "event": "connect",
    }


def test_encode_event_carries_the_text_form_of_the_values_and_masks_secrets():
    # A quoted reply and a bracketed address are plain strings once they are JSON: the
    # worker sends the formatted text beside them.
    event = {"log_format": "rejected from={sender} reply={reply} password={password}",
             "sender": fields.address(""), "reply": fields.text("554 5.7.1 Relay denied"),
             "password": "hunter2", "log_namespace": "relaygw.smtp.server"}
    decoded = json.loads(encode_event(event))
    assert decoded["log_text"] == ('rejected from=<> reply="554 5.7.1 Relay denied" '
                                   'password=[redacted]')
    assert (decoded["sender"], decoded["reply"]) == ("", "554 5.7.1 Relay denied")
    assert formatEvent({**decoded, "log_level": LogLevel.info}) == decoded["log_text"]


@pytest.mark.parametrize("level", ["debug", "info", "warn", "error", "critical"])
def test_encode_event_names_every_level(level):
    raw = encode_event({"log_level": LogLevel.levelWithName(level), "log_format": "x"})
    assert json.loads(raw)["log_level"] == level


def test_encode_event_carries_a_failure_as_text_on_one_line():
    failure = _failure()
    raw = encode_event({"log_level": LogLevel.critical, "log_format": "boom\nsecond line",
                        "log_failure": failure, "text": "a\r\nb\u2028c\udcff"})
    assert b"\n" not in raw and b"\r" not in raw
    assert raw.isascii()
    decoded = json.loads(raw)
    assert "log_failure" not in decoded
    assert decoded["log_failure_text"] == failure.getTraceback()
    assert decoded["log_failure_text"].startswith("Traceback")
    assert "ZeroDivisionError" in decoded["log_failure_text"]
    assert (decoded["log_format"], decoded["log_text"]) == ("{log_text}", "boom\nsecond line")
    assert decoded["text"] == "a\r\nb\u2028c\udcff"


def test_encode_event_survives_a_failure_that_cannot_render():
    class Broken(Failure):
        def getTraceback(self, *a: Any, **kw: Any) -> str:  # noqa: N802
            raise RuntimeError("cannot render")

    failure = Broken(ValueError("the value"))
    decoded = json.loads(encode_event({"log_format": "x", "log_failure": failure}))
    assert decoded["log_failure_text"] == "ValueError('the value')"


def test_forward_log_uses_the_channel_or_stderr(capsys):
    forward = _ForwardLog()
    forward({"log_level": LogLevel.info, "log_format": "early"})
    assert capsys.readouterr().err == \
        '{"log_level":"info","log_format":"{log_text}","log_text":"early"}\n'
    sent = []
    forward.channel = SimpleNamespace(connected=True, send=lambda k, p: sent.append((k, p)))
    forward({"log_level": LogLevel.info, "log_format": "late"})
    assert sent == [(b"L", b'{"log_level":"info","log_format":"{log_text}","log_text":"late"}')]
    assert capsys.readouterr().err == ""


def test_forwarded_metrics_sends_the_inbound_events_only():
    sent: list[tuple[bytes, bytes]] = []
    metrics = ForwardedMetrics(lambda kind, payload: sent.append((kind, payload)))
    metrics.message_accepted(1234)
    metrics.message_rejected("rcpt", 554, "5.7.1")
    metrics.message_rejected("data", 452, None)
    metrics.tls_inbound("TLSv1.3")
    metrics.tls_inbound(None)
    metrics.connection_opened(ADDRESS, False)  # the main process counts connections
    metrics.connection_closed(ADDRESS)
    metrics.connection_refused("max_connections")
    metrics.delivery("routes[0]", "sent", "2.0.0", 1.0)
    assert sent == [
        (b"m", b'["message_accepted",[1234]]'),
        (b"m", b'["message_rejected",["rcpt",554,"5.7.1"]]'),
        (b"m", b'["message_rejected",["data",452,null]]'),
        (b"m", b'["tls_inbound",["TLSv1.3"]]'),
        (b"m", b'["tls_inbound",[null]]'),
    ]


class FakeWorker:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def channel_up(self, channel: Any) -> None:
        self.calls.append(("up",))

    def adopt(self, conn_id: int, listener: str, family: int, fd: int) -> None:
        self.calls.append(("adopt", conn_id, listener, family, fd))

    def drain(self) -> None:
        self.calls.append(("drain",))

    def retire(self) -> None:
        self.calls.append(("retire",))

    def main_gone(self) -> None:
        self.calls.append(("gone",))


def test_worker_channel_pairs_descriptors_with_hand_overs():
    fake = FakeWorker()
    channel = _Channel(fake)
    transport = StringTransport()
    channel.makeConnection(transport)
    a, b = socket.socketpair()
    fd_a, fd_b = os.dup(a.fileno()), os.dup(b.fileno())
    a.close()
    b.close()
    channel.fileDescriptorReceived(fd_a)
    channel.fileDescriptorReceived(fd_b)
    channel.dataReceived(b"C 7 127.0.0.1:2525 2\nC 8 [::1]:25 10\nC 9 127.0.0.1:2525 2\nR\nD\n")
    assert fake.calls == [("up",), ("adopt", 7, "127.0.0.1:2525", 2, fd_a),
                          ("adopt", 8, "[::1]:25", 10, fd_b),
                          ("adopt", 9, "127.0.0.1:2525", 2, -1), ("retire",), ("drain",)]
    channel.send(b"X", b"7")
    assert transport.value() == b"X 7\n"
    os.close(fd_a)
    os.close(fd_b)


def test_worker_channel_closes_unclaimed_descriptors_when_the_main_process_goes():
    fake = FakeWorker()
    channel = _Channel(fake)
    channel.makeConnection(StringTransport())
    a, b = socket.socketpair()
    fd = os.dup(a.fileno())
    channel.fileDescriptorReceived(fd)
    channel.connectionLost(Failure(ConnectionError("gone")))
    assert fake.calls[-1] == ("gone",)
    with pytest.raises(OSError):
        os.fstat(fd)
    channel.send(b"X", b"1")  # nothing to write to: dropped
    a.close()
    b.close()


class StoppableClock(Clock):
    stopped = False

    def stop(self) -> None:
        self.stopped = True


def _bare_worker(tmp_path) -> tuple[Worker, list[tuple[bytes, bytes]], StoppableClock]:
    clock = StoppableClock()
    worker = Worker(3, clock, _ForwardLog())
    worker.config = default_config(tmp_path)
    sent: list[tuple[bytes, bytes]] = []
    worker.channel = SimpleNamespace(  # type: ignore[assignment]
        send=lambda k, p=b"": sent.append((k, p)), transport=None)
    return worker, sent, clock


def test_worker_refuses_a_connection_for_a_listener_it_does_not_have(tmp_path):
    worker, sent, _ = _bare_worker(tmp_path)
    a, b = socket.socketpair()
    fd = os.dup(a.fileno())
    a.close()
    worker.adopt(5, "127.0.0.1:1", socket.AF_UNIX, fd)
    # The main process hears "adopted" then "ended": the slot comes back at once.
    assert sent == [(b"A", b"5"), (b"X", b"5")]
    with pytest.raises(OSError):
        os.fstat(fd)
    assert b.recv(10) == b""  # the client's connection is closed
    b.close()


def test_an_idle_worker_exits_when_retired(tmp_path):
    worker, sent, clock = _bare_worker(tmp_path)
    worker.retire()
    assert clock.stopped and worker.draining


def test_worker_reports_the_queued_envelope(tmp_path):
    worker, sent, _ = _bare_worker(tmp_path)
    envelope = _envelope()
    stored = StoredMessage(envelope, QueueState.initial(envelope), 321, 42)
    worker._queued(stored)
    assert sent == [(b"Q", b"321 42 " + envelope.to_json())]


# -- relaygw.daemon.workers.pool: the main process's side ---------------------------------------


def _envelope() -> Envelope:
    return Envelope(queue_id="0123456789ABCDEF", sender="a@client.example",
                    recipients=(EnvelopeRecipient("b@x.example"),
                                EnvelopeRecipient("c\u00e9@x.example", {"NOTIFY": "NEVER"})),
                    arrived=1700000000.5, client_ip="127.0.0.1", client_port=40000)


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[SimpleNamespace] = []
        self.channels: list[Any] = []
        self.readers: set[Any] = set()
        self.pid = 1000

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):  # noqa: N802, N803
        self.pid += 1
        process = SimpleNamespace(pid=self.pid, proto=proto, executable=executable, args=args,
                                  childFDs=childFDs, signals=[])
        process.signalProcess = process.signals.append
        self.spawned.append(process)
        return process

    def adoptStreamConnection(self, fd, family, factory):  # noqa: N802
        assert family == socket.AF_UNIX
        self.channels.append(factory)

    def addReader(self, reader):  # noqa: N802
        self.readers.add(reader)

    def removeReader(self, reader):  # noqa: N802
        self.readers.discard(reader)


class FDTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.fds: list[int] = []
        self.fail = False

    def sendFileDescriptor(self, fd: int) -> None:  # noqa: N802
        if self.fail:
            raise OSError("no room for descriptors")
        self.fds.append(fd)


class Pool:
    """A WorkerPool on a fake reactor, its workers' channels connected to FDTransports."""

    def __init__(self, count: int = 2, max_total: int = 100, max_per_client: int = 10) -> None:
        self.reactor = FakeReactor()
        self.counter = ConnectionCounter(max_total, max_per_client)
        self.queued: list[Any] = []
        self.metrics = Metrics()
        self.pool = WorkerPool(self.reactor, count, frozenset([ADDRESS]),
                               self.counter, self.queued.append, metrics=self.metrics,
                               grace=5.0,
                               command=["/usr/bin/python3", "-m",
                                        "relaygw.daemon.workers.process"])
        self.pool.snapshot = SNAPSHOT
        self.listener = SimpleNamespace(address=ADDRESS, listener=SimpleNamespace(tls="none"))
        self.transports: dict[int, FDTransport] = {}
        self.sockets: list[socket.socket] = []
        _pools.append(self)

    def start(self) -> WorkerPool:
        self.pool.startService()
        self.connect_new()
        return self.pool

    def connect_new(self) -> None:
        """The channels of the workers spawned since the last call come up."""
        while self.reactor.channels:
            factory = self.reactor.channels.pop(0)
            channel = factory.buildProtocol(None)
            transport = FDTransport()
            channel.makeConnection(transport)
            # The first thing a worker hears: the configuration of its generation.
            assert transport.value() == b"K " + base64.b64encode(channel.worker.snapshot) + b"\n"
            transport.clear()
            self.transports[channel.worker.pid] = transport

    def ready(self, *workers: Any) -> None:
        for w in workers or self.pool.workers:
            w.channel.lineReceived(b"H %d" % w.pid)

    def dispatch(self, host: str = "127.0.0.1") -> socket.socket:
        """A fresh connection handed to the pool; returns the client's end."""
        server, client = socket.socketpair()
        self.sockets += [server, client]
        self.pool.dispatch(self.listener, server, host)  # type: ignore[arg-type]
        return client

    def die(self, worker: Any, code: int | None = None, sig: int | None = 9) -> None:
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(exitCode=code, signal=sig)
        worker.process.proto.processEnded(Failure(reason))


_pools: list[Pool] = []


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _pools:
        for sock in _pools.pop().sockets:
            sock.close()


def closed_with(client: socket.socket) -> bytes:
    client.settimeout(5)
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    client.close()
    return data


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def test_pool_spawns_its_workers_with_the_channel_as_fd_3(events):
    p = Pool(count=2)
    pool = p.start()
    assert [s.args for s in p.reactor.spawned] == [
        ["/usr/bin/python3", "-m", "relaygw.daemon.workers.process", "--index", str(i), "--fd", "3"]
        for i in (0, 1)]
    assert all(s.executable == "/usr/bin/python3" for s in p.reactor.spawned)
    assert all(sorted(s.childFDs) == [1, 2, 3] for s in p.reactor.spawned)
    assert [(w.index, w.pid, w.ready) for w in pool.workers] == [(0, 1001, False),
                                                                 (1, 1002, False)]
    started = [e for e in events if e.get("event") == "worker_started"]
    assert [formatEvent(e) for e in started] == ["worker 0 started pid=1001",
                                                 "worker 1 started pid=1002"]


def test_no_ready_worker_means_421_and_the_slot_back(events):
    p = Pool(count=1)
    p.start()
    client = p.dispatch()
    assert closed_with(client) == NO_WORKER.to_bytes()
    assert NO_WORKER.to_bytes() == b"421 4.3.0 Service temporarily unavailable, try again later\r\n"
    assert (p.counter.total, p.counter.per_client) == (0, {})


def test_dispatch_hands_the_socket_to_the_least_busy_worker():
    p = Pool(count=2)
    pool = p.start()
    p.ready()
    w0, w1 = pool.workers
    clients = [p.dispatch() for _ in range(3)]
    assert sorted([len(w0.conns), len(w1.conns)]) == [1, 2]
    assert p.counter.total == 3 and p.counter.per_client == {"127.0.0.1": 3}
    lines = (p.transports[w0.pid].value() + p.transports[w1.pid].value()).splitlines()
    assert sorted(lines) == [b"C 1 127.0.0.1:2525 1", b"C 2 127.0.0.1:2525 1",
                             b"C 3 127.0.0.1:2525 1"]  # AF_UNIX here; AF_INET in real life
    # One descriptor per hand-over, sent before its line.
    assert len(p.transports[w0.pid].fds) == len(w0.conns)
    assert len(p.transports[w1.pid].fds) == len(w1.conns)
    busy, idle = (w0, w1) if len(w0.conns) == 2 else (w1, w0)
    # The next one goes to the idle worker, whichever turn it is.
    clients.append(p.dispatch())
    assert (len(busy.conns), len(idle.conns)) == (2, 2)
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in p.metrics.families(scrape=False) for s in f.samples}
    assert samples[("relaygw_connections_open", (("listener", ADDRESS),))] == 4
    assert samples[("relaygw_connections_total", (("listener", ADDRESS), ("tls", "false")))] == 4
    for c in clients:
        c.close()


def test_adopted_and_ended_connections_release_their_slot():
    p = Pool(count=1)
    pool = p.start()
    p.ready()
    (w,) = pool.workers
    client = p.dispatch()
    (conn_id,) = w.conns
    main_copy = w.conns[conn_id][2]
    w.channel.lineReceived(b"A %d" % conn_id)
    assert w.conns[conn_id] == ("127.0.0.1:2525", "127.0.0.1", None)
    assert main_copy.fileno() == -1  # the main process's copy is closed
    assert p.counter.total == 1
    w.channel.lineReceived(b"X %d" % conn_id)
    assert w.conns == {} and p.counter.total == 0 and p.counter.per_client == {}
    w.channel.lineReceived(b"X %d" % conn_id)  # twice: no double release
    w.channel.lineReceived(b"A 999")  # unknown: ignored
    assert p.counter.total == 0
    client.close()


def test_per_client_cap_is_enforced_by_the_main_process(events):
    p = Pool(count=2, max_per_client=2)
    pool = p.start()
    p.ready()
    kept = [p.dispatch(), p.dispatch()]
    refused = p.dispatch()
    assert closed_with(refused) == PER_CLIENT_REFUSAL
    other = p.dispatch("192.0.2.7")  # another client is not affected
    assert sum(len(w.conns) for w in pool.workers) == 3
    refusals = [e for e in events if e.get("event") == "refused"]
    assert [formatEvent(e) for e in refusals] == [
        'connection refused client=127.0.0.1 reply="421 4.7.0 Too many connections '
        'from your address"']
    # One ends: a new connection from the same address is taken.
    w = next(w for w in pool.workers if w.conns)
    w.channel.lineReceived(b"X %d" % next(iter(w.conns)))
    again = p.dispatch()
    assert sum(len(w.conns) for w in pool.workers) == 3
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in p.metrics.families(scrape=False) for s in f.samples}
    assert samples[("relaygw_connections_refused_total",
                    (("reason", "max_connections_per_client"),))] == 1
    for c in [*kept, other, again]:
        c.close()


def test_total_cap_is_enforced_by_the_main_process():
    p = Pool(count=2, max_total=2)
    p.start()
    p.ready()
    kept = [p.dispatch("192.0.2.1"), p.dispatch("192.0.2.2")]
    assert closed_with(p.dispatch("192.0.2.3")) == TOTAL_REFUSAL
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in p.metrics.families(scrape=False) for s in f.samples}
    assert samples[("relaygw_connections_refused_total", (("reason", "max_connections"),))] == 1
    for c in kept:
        c.close()


def test_a_failed_hand_over_closes_the_client_and_frees_the_slot(events):
    p = Pool(count=1)
    pool = p.start()
    p.ready()
    (w,) = pool.workers
    p.transports[w.pid].fail = True
    client = p.dispatch()
    assert closed_with(client) == b""
    assert w.conns == {} and p.counter.total == 0
    assert any(e.get("log_format") == "hand-over to worker {index} failed" for e in events)


def test_a_dead_worker_releases_its_connections_and_is_started_again(events):
    p = Pool(count=2, max_per_client=2)
    pool = p.start()
    p.ready()
    w0, w1 = pool.workers
    clients = [p.dispatch(), p.dispatch()]
    assert len(w0.conns) == len(w1.conns) == 1
    assert closed_with(p.dispatch()) == PER_CLIENT_REFUSAL
    p.die(w0, code=None, sig=9)
    assert pool.workers == [w1] and w0.conns == {}
    assert p.counter.total == 1
    died = [e for e in events if e.get("event") == "worker_died"]
    assert [formatEvent(e) for e in died] == [
        "worker 0 pid=1001 ended unexpectedly: exit_code=none signal=9"]
    assert died[0]["log_level"] == LogLevel.error
    assert w0.exited.called
    # The slot came back; meanwhile the surviving worker takes the clients.
    clients.append(p.dispatch())
    assert len(w1.conns) == 2
    p.reactor.advance(RESPAWN_FIRST - 0.01)
    assert len(p.reactor.spawned) == 2
    p.reactor.advance(0.01)
    assert [s.args[4] for s in p.reactor.spawned] == ["0", "1", "0"]
    p.connect_new()
    (new,) = [w for w in pool.workers if w is not w1]
    assert (new.index, new.pid, new.generation, new.ready) == (0, 1003, 1, False)
    p.ready(new)
    for c in clients:
        c.close()


def test_a_worker_that_cannot_start_stops_the_daemon_instead_of_respawning(events):
    p = Pool(count=2)
    fatal: list[str] = []
    p.pool.on_fatal = fatal.append
    p.start()
    first = p.pool.workers[0]
    first.channel.lineReceived(b"F tls.private_key: cannot read /k.pem: Permission denied")
    p.die(first, code=EXIT_CONFIG, sig=None)
    assert fatal == ["worker 0 cannot start: tls.private_key: cannot read /k.pem: "
                     "Permission denied"]
    p.reactor.advance(60)
    assert len(p.reactor.spawned) == 2  # no respawn, ever


def test_a_worker_that_ends_with_the_config_status_without_a_reason_still_stops_it(events):
    p = Pool(count=1)
    fatal: list[str] = []
    p.pool.on_fatal = fatal.append
    p.start()
    (worker,) = p.pool.workers
    p.die(worker, code=EXIT_CONFIG, sig=None)
    assert fatal == []  # its last line may still be on its way
    p.reactor.advance(handoff.REASON_WAIT)
    assert fatal == ["worker 0 cannot start: exit code 2"]
    assert len(p.reactor.spawned) == 1


def test_a_reloads_worker_that_cannot_start_fails_the_reload_not_the_daemon(events):
    p = Pool(count=1)
    fatal: list[str] = []
    p.pool.on_fatal = fatal.append
    p.start()
    old = p.pool.workers[0]
    p.ready(old)
    done = p.pool.restart(1, frozenset([ADDRESS]), NEW_SNAPSHOT)
    p.connect_new()
    (new,) = [w for w in p.pool.workers if w.generation == 2]
    new.channel.lineReceived(b"F tls.certificate: not a PEM certificate")
    p.die(new, code=EXIT_CONFIG, sig=None)
    results: list[bool] = []
    done.addCallback(results.append)
    assert results == [False] and fatal == []
    assert old.accepting and not old.retired  # the previous worker keeps serving
    p.reactor.advance(60)
    assert len(p.reactor.spawned) == 2
    assert [formatEvent(e) for e in events if e.get("event") == "worker_cannot_start"] == [
        "worker 0 cannot start: tls.certificate: not a PEM certificate; the previous workers "
        "keep serving"]


def test_respawn_pause_doubles_while_a_worker_keeps_dying():
    p = Pool(count=1)
    pool = p.start()
    pauses = []
    for _ in range(4):
        (w,) = pool.workers
        p.die(w, code=1, sig=None)
        before = p.reactor.seconds()
        while len(pool.workers) == 0:
            p.reactor.advance(0.125)
        pauses.append(p.reactor.seconds() - before)
        p.connect_new()
    assert pauses == [0.5, 1.0, 2.0, 4.0]
    # A worker that lived long enough starts over at the first pause.
    p.reactor.advance(handoff.STABLE_AFTER)
    (w,) = pool.workers
    p.die(w, code=1, sig=None)
    before = p.reactor.seconds()
    while len(pool.workers) == 0:
        p.reactor.advance(0.125)
    assert p.reactor.seconds() - before == 0.5


def test_a_respawn_ends_the_respawn_pause_only_of_that_worker():
    p = Pool(count=2)
    pool = p.start()
    w0, w1 = pool.workers
    p.die(w0, code=1, sig=None)
    p.reactor.advance(0.5)
    p.connect_new()
    p.die(w1, code=1, sig=None)
    p.reactor.advance(0.5)
    assert sorted(w.index for w in pool.workers) == [0, 1]


def test_listener_reads_only_while_a_worker_can_take_clients():
    p = Pool(count=1)
    # Bound to an ephemeral port; known to the workers by its configured address.
    listener = HandoffListener(p.reactor, ListenerConfig(ADDRESS, "127.0.0.1", 0, "none"),
                               p.pool)
    pool = p.start()
    listener.startService()
    try:
        assert p.reactor.readers == set()
        (w,) = pool.workers
        p.ready(w)
        assert p.reactor.readers == {listener}
        port = listener.port.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        listener.doRead()
        assert len(w.conns) == 1
        (line,) = p.transports[w.pid].value().splitlines()
        assert line == b"C 1 127.0.0.1:2525 %d" % socket.AF_INET
        p.die(w, code=None, sig=9)
        assert p.reactor.readers == set()  # clients wait in the backlog
        assert closed_with(client) == b""  # never adopted: the main process closed its copy
    finally:
        listener.stopService()
    assert listener.port is None and p.reactor.readers == set()


def test_queued_report_reaches_the_queue_with_its_envelope():
    p = Pool(count=1)
    pool = p.start()
    (w,) = pool.workers
    envelope = _envelope()
    w.channel.lineReceived(b"Q 512 2048 " + envelope.to_json())
    (stored,) = p.queued
    assert stored.envelope == envelope
    assert (stored.content_offset, stored.size) == (512, 2048)
    assert stored.state == QueueState.initial(envelope)


def test_metric_events_from_a_worker_reach_the_main_registry():
    p = Pool(count=1)
    pool = p.start()
    (w,) = pool.workers
    forwarded = ForwardedMetrics(lambda kind, payload: w.channel.lineReceived(kind + b" "
                                                                              + payload))
    forwarded.message_accepted(100)
    forwarded.message_accepted(23)
    forwarded.message_rejected("rcpt", 554, "5.7.1")
    forwarded.tls_inbound("TLSv1.3 TLS_AES_256_GCM_SHA384")
    w.channel.lineReceived(b'm ["delivery",["routes[0]","sent","2.0.0",1.0]]')  # not inbound
    samples = {(s.name, tuple(s.labels.items())): s.value
               for f in p.metrics.families(scrape=False) for s in f.samples}
    assert samples[("relaygw_messages_accepted_total", ())] == 2
    assert samples[("relaygw_messages_accepted_bytes_total", ())] == 123
    assert samples[("relaygw_messages_rejected_total",
                    (("stage", "rcpt"), ("code", "554"), ("enhanced_status", "5.7.1")))] == 1
    assert samples[("relaygw_tls_inbound_total", (("version", "TLSv1.3"),))] == 1
    assert not any(name == "relaygw_deliveries_total" for name, _ in samples)


def test_a_bad_line_from_a_worker_is_logged_not_raised(events):
    p = Pool(count=1)
    pool = p.start()
    (w,) = pool.workers
    w.channel.lineReceived(b"Q not-a-number")
    w.channel.lineReceived(b"m {not json")
    bad = [e for e in events
           if e.get("log_format") == "worker {index}: bad message from the worker"]
    assert len(bad) == 2 and all(e["index"] == 0 for e in bad)
    w.channel.lineLengthExceeded(b"x")
    assert events[-1]["log_format"] == "worker {index}: message over {n} bytes dropped"


def test_log_event_rebuilds_the_worker_event_for_the_main_log(events):
    p = Pool(count=2)
    pool = p.start()
    w1 = pool.workers[1]
    failure = _failure()
    raw = encode_event({
        "log_level": LogLevel.error, "log_namespace": "relaygw.smtp.server",
        "log_format": "spool write failed id={queue_id}", "log_time": 1700000000.5,
        "log_failure": failure, "queue_id": "ABC", "event": "spool_error",
    })
    events.clear()
    w1.channel.lineReceived(b"L " + raw)
    (event,) = events
    assert event["log_level"] is LogLevel.error
    assert event["worker"] == 1
    assert event["log_time"] == 1700000000.5
    assert event["traceback"] == failure.getTraceback()
    assert "log_failure_text" not in event
    assert formatEvent(event) == "spool write failed id=ABC\n" + failure.getTraceback()
    line = event_as_dict(event)
    assert (line["level"], line["event"], line["worker"], line["queue_id"], line["namespace"]) \
        == ("error", "spool_error", 1, "ABC", "relaygw.smtp.server")


def test_log_event_without_a_usable_level_is_info(events):
    p = Pool(count=1)
    pool = p.start()
    (w,) = pool.workers
    events.clear()
    pool.log_event(SimpleNamespace(index=4), b'{"log_format":"no level","x":1}')
    pool.log_event(SimpleNamespace(index=4), b'{"log_level":"loud","log_format":"odd level"}')
    pool.log_event(SimpleNamespace(index=4), b'["not", "an", "event"]')
    assert [(e["log_level"], e["worker"], formatEvent(e)) for e in events] == [
        (LogLevel.info, 4, "no level"), (LogLevel.info, 4, "odd level")]


def test_stop_drains_every_worker_then_kills_the_stragglers(events):
    p = Pool(count=2)
    pool = p.start()
    p.ready()
    w0, w1 = pool.workers
    d = pool.stopService()
    assert p.transports[w0.pid].value() == b"D\n" == p.transports[w1.pid].value()
    assert not d.called
    p.die(w0, code=0)
    assert not d.called
    p.reactor.advance(5.0 + handoff.KILL_MARGIN)
    assert w1.process.signals == ["KILL"] and w0.process.signals == []
    p.die(w1, code=None, sig=9)
    assert d.called
    assert p.reactor.getDelayedCalls() == []  # the kill timer is gone
    assert len(p.reactor.spawned) == 2  # nothing started again while stopping
    exited = [formatEvent(e) for e in events if e.get("event") == "worker_exited"]
    assert exited == ["worker 0 exited"]


def test_restart_retires_the_old_workers_once_the_new_ones_are_ready():
    p = Pool(count=2)
    pool = p.start()
    p.ready()
    old = list(pool.workers)
    result: list[bool] = []
    pool.restart(2, frozenset([ADDRESS]), NEW_SNAPSHOT).addCallback(result.append)
    p.connect_new()
    new = [w for w in pool.workers if w.generation == 2]
    assert len(new) == 2 and all(not w.retired for w in old)
    assert [w.snapshot for w in old + new] == [SNAPSHOT] * 2 + [NEW_SNAPSHOT] * 2
    p.ready(new[0])
    assert result == [] and p.transports[old[0].pid].value() == b""
    p.ready(new[1])
    assert result == [True]
    assert all(w.retired for w in old)
    assert [p.transports[w.pid].value() for w in old] == [b"R\n", b"R\n"]
    # New clients go to the new workers only; an old one's exit is expected.
    client = p.dispatch()
    assert sum(len(w.conns) for w in new) == 1
    p.die(old[0], code=0)
    assert len(p.reactor.spawned) == 4
    client.close()


def test_reload_result_is_false_only_for_a_new_worker_that_never_got_ready():
    p = Pool(count=2)
    pool = p.start()
    p.ready()
    result: list[bool] = []
    pool.restart(2, frozenset([ADDRESS]), NEW_SNAPSHOT).addCallback(result.append)
    p.connect_new()
    a, b = [w for w in pool.workers if w.generation == 2]
    p.ready(a)
    # A new worker that was ready dies before its sibling is: it is started again,
    # and the reload is not reported as failed for that.
    p.die(a, code=None, sig=9)
    assert result == [], "a worker that had been ready was counted as one that never started"
    p.reactor.advance(RESPAWN_FIRST)
    p.connect_new()
    p.ready(*[w for w in pool.workers if w.generation == 2])
    assert result == [True]


def test_reload_result_is_false_when_a_new_worker_dies_before_ready():
    p = Pool(count=2)
    pool = p.start()
    p.ready()
    old = list(pool.workers)
    result: list[bool] = []
    pool.restart(2, frozenset([ADDRESS]), NEW_SNAPSHOT).addCallback(result.append)
    p.connect_new()
    a, b = [w for w in pool.workers if w.generation == 2]
    p.die(a, code=1, sig=None)
    assert result == [False]
    assert not any(w.retired for w in old)  # the old workers keep serving
    client = p.dispatch()
    assert sum(len(w.conns) for w in old) == 1
    client.close()


def test_serves_says_whether_a_ready_worker_takes_the_listener_clients():
    p = Pool(count=1)
    pool = p.start()
    (w,) = pool.workers
    assert not pool.serves(ADDRESS)  # started, not ready
    p.ready(w)
    assert pool.serves(ADDRESS) and not pool.serves("127.0.0.1:1")
    pool.restart(1, frozenset(["127.0.0.1:1"]), NEW_SNAPSHOT)
    p.connect_new()
    (new,) = [x for x in pool.workers if x.generation == 2]
    p.ready(new)
    assert w.retired  # the old worker has the old listener; it takes no new clients
    assert not pool.serves(ADDRESS) and pool.serves("127.0.0.1:1")


def test_worker_configures_itself_from_the_snapshot_and_says_ready(tmp_path):
    import pickle

    worker, sent, _ = _bare_worker(tmp_path)
    config = worker.config
    worker.config = None
    # What the main process sends: the configuration, the users, the TLS PEM it read.
    setup = worker_setup(config, prepare(config, announce=False))
    assert setup.tls_pem is not None
    worker.configure(pickle.dumps(setup))
    try:
        assert worker.config == config
        assert list(worker.sessions) == [lc.address for lc in config.listeners]
        assert sent == [(b"H", str(os.getpid()).encode())]
    finally:
        worker._free_space.stop()
        worker.spool_pool.stop()
        worker.auth_pool.stop()


def test_a_worker_that_cannot_start_says_why_and_exits_with_the_config_status(tmp_path):
    import pickle

    worker, sent, clock = _bare_worker(tmp_path)
    config = worker.config
    worker.config = None
    junk = (b"-----BEGIN CERTIFICATE-----\njunk\n-----END CERTIFICATE-----\n", b"junk")
    with capturedLogs() as events:
        worker.configure(pickle.dumps(WorkerSetup(config, None, junk)))
    assert sent == [(b"F", b"tls.certificate: not a PEM certificate")]
    assert worker.exit_code == EXIT_CONFIG == 2
    assert clock.stopped
    assert [formatEvent(e) for e in events] == [
        "worker 3 cannot start: tls.certificate: not a PEM certificate"]


def _flow_pool(progress: list[int]) -> tuple[Pool, HandoffListener]:
    p = Pool(count=1)
    p.pool.backlog = lambda: (progress[0], progress[1])
    listener = HandoffListener(p.reactor, ListenerConfig(ADDRESS, "127.0.0.1", 0, "none"),
                               p.pool)
    p.start()
    listener.startService()
    p.ready()
    return p, listener


def test_accepting_pauses_while_delivery_falls_behind_and_resumes_when_it_catches_up(events):
    progress = [handoff.FLOW_HIGH - 1, 0]  # [attempts in flight, attempts finished]
    p, listener = _flow_pool(progress)
    try:
        p.pool.check_flow()
        assert p.reactor.readers == {listener}
        progress[:] = [handoff.FLOW_HIGH, 5]  # deliveries finish, but not fast enough
        p.pool.check_flow()
        assert p.reactor.readers == set()  # new clients wait in the listen backlog
        progress[:] = [handoff.FLOW_LOW + 1, 300]
        p.reactor.advance(handoff.FLOW_POLL)
        assert p.reactor.readers == set()
        progress[:] = [handoff.FLOW_LOW, 600]
        p.reactor.advance(handoff.FLOW_POLL)
        assert p.reactor.readers == {listener}
        assert [formatEvent(e) for e in events if e.get("event", "").startswith("flow_")] == [
            f"accepting paused: {handoff.FLOW_HIGH} messages wait for delivery",
            f"accepting resumed: {handoff.FLOW_LOW} messages wait for delivery"]
    finally:
        listener.stopService()


def test_accepting_goes_on_when_no_delivery_finishes(events):
    """A smarthost that hangs: holding clients back would help nobody."""
    progress = [handoff.FLOW_HIGH, 7]
    p, listener = _flow_pool(progress)
    try:
        p.pool.check_flow()
        assert p.reactor.readers == set()
        p.reactor.advance(handoff.FLOW_STALL)  # nothing finished for FLOW_STALL seconds
        assert p.reactor.readers == {listener}
        progress[0] += 50
        p.pool.check_flow()  # still stalled: no pause
        assert p.reactor.readers == {listener}
        progress[1] += 1  # deliveries move again: the backlog counts again
        p.pool.check_flow()
        assert p.reactor.readers == set()
    finally:
        listener.stopService()
