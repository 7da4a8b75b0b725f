"""The scenarios of the benchmark and how one run of each is measured.

A *throughput* run (scenarios a, b, c, d, f, g) starts a fresh sink and a fresh relay
(relaygw or Postfix), drives smtp-source through the relay and records:

- ``accept_s``: wall time of smtp-source, from its start until it exits having received
  a 2xx to every command (it aborts on anything else), so ``accept_rate`` = N / accept_s;
- ``e2e_s``: from the same start until the sink has counted every message that should
  arrive (smtp-sink's ``-c`` counter, read as it changes), so ``e2e_rate`` = N / e2e_s;
- ``exactly_once``: after the relay is stopped, the sink's record (smtp-sink's ``-D`` dump,
  or faultsink's counters) holds every expected message once: as many transactions as
  expected, each with a distinct relay queue id, and the expected number of recipients;
  and the relay's queue holds only what should stay (the deferred half in f);
- CPU seconds of the relay, and relaygw's memory: VmRSS sampled every 0.25 s and the
  VmHWM (peak RSS) of each process at the end.

Every relaygw figure covers its whole process tree: the main process (the one started
with ``relaygw run``) and all of its descendants (the ``[server] workers`` processes),
summed: VmRSS, VmHWM, threads, CPU.  "Reactor busy" is the main process's main thread;
"workers busy" the busiest worker's main thread.

Scenario (e) holds 10,000 idle SMTP sessions open to relaygw and measures its RSS (the
whole tree's) and the greeting latency of new clients meanwhile.
"""

from __future__ import annotations

import contextlib
import selectors
import shutil
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    LOOPBACK,
    BenchError,
    FaultSink,
    Relaygw,
    SmtpSink,
    Source,
    cpu_total,
    free_port,
    greeting_time,
    make_dumpdir,
)
from postfix_relay import PostfixRelay


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    kind: str = "throughput"  # "throughput" | "idle"
    sessions: int = 20
    messages: int = 3000  # in total
    size: int = 2048  # payload bytes (-l)
    recipients: int = 1  # per message (-r)
    per_connection: int = 1  # messages per connection (-d when > 1)
    defer_half: bool = False  # half of the messages go to a recipient the sink defers
    systems: tuple[str, ...] = ("relaygw", "postfix")
    idle: int = 0  # idle connections (kind "idle")
    probes: int = 20  # fresh clients timed during "idle"
    rss_samples: bool = False  # report RSS at message milestones (long run)
    rounds: int = 3  # in a full run (at least 3); --rounds overrides, --quick makes it 1

    def describe(self) -> str:
        if self.kind == "idle":
            return f"{self.idle:,} idle connections, {self.probes} greeting probes"
        parts = [f"{self.messages:,} msgs", f"{self.sessions} session(s)",
                 f"{_size(self.size)}"]
        if self.per_connection > 1:
            parts.append(f"{self.per_connection}/connection")
        if self.recipients > 1:
            parts.append(f"{self.recipients} rcpts")
        if self.defer_half:
            parts.append("sink defers half")
        return ", ".join(parts)


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def scenarios(quick: bool = False) -> dict[str, Scenario]:
    q = quick
    return {s.key: s for s in (
        # (a) and (b) carry the headline targets: more rounds against the machine's noise.
        Scenario("a", "20 sessions x 2 KiB, 1 msg/session", messages=300 if q else 3000,
                 rounds=5),
        Scenario("b", "1 session, 100 msgs/connection", sessions=1,
                 messages=200 if q else 1000, per_connection=100, rounds=5),
        Scenario("c", "20 sessions x 100 KiB", messages=100 if q else 1000, size=100 * 1024),
        Scenario("d", "5 recipients per message", messages=200 if q else 2000, recipients=5),
        Scenario("e", "10,000 idle connections", kind="idle", systems=("relaygw",),
                 idle=1000 if q else 10000, probes=10 if q else 20),
        Scenario("f", "smarthost defers half (451 at RCPT)", messages=300 if q else 2000,
                 defer_half=True),
        Scenario("g", "long run: memory over 50,000 msgs", systems=("relaygw",),
                 messages=2000 if q else 50000, rss_samples=True, rounds=1),  # memory only
    )}


@dataclass
class RunResult:
    scenario: str
    system: str
    round: int
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.ok = False
        self.problems.append(why)


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class _Sampler(threading.Thread):
    """Samples relaygw's VmRSS (summed over its process tree), its number of processes
    and threads, and the sink's count, every ``interval`` seconds."""

    def __init__(self, relay: Relaygw | None, sink: Any, interval: float = 0.25) -> None:
        super().__init__(daemon=True, name="sampler")
        self.relay = relay
        self.sink = sink
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (t, sink count, VmRSS KiB)
        self.max_processes = 0
        self.max_threads = 0
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            st = self.relay.status() if self.relay is not None else {}
            self.max_processes = max(self.max_processes, st.get("processes", 0))
            self.max_threads = max(self.max_threads, st.get("Threads", 0))
            self.samples.append((time.monotonic() - self.t0, self.sink.count,
                                 st.get("VmRSS", 0)))

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


def run_throughput(sc: Scenario, system: str, rnd: int, workdir: Path,
                   workers: int | str = "auto") -> RunResult:
    res = RunResult(sc.key, system, rnd)
    rundir = workdir / f"{sc.key}-{system}-{rnd}"
    rundir.mkdir()
    rundir.chmod(0o755)
    dumpdir = make_dumpdir()
    try:
        _throughput(sc, system, res, rundir, dumpdir, workers)
    finally:
        shutil.rmtree(dumpdir, ignore_errors=True)
    if res.ok:
        shutil.rmtree(rundir, ignore_errors=True)
    return res


def _throughput(sc: Scenario, system: str, res: RunResult, rundir: Path,
                dumpdir: Path, workers: int | str) -> None:
    n = sc.messages
    expected = n // 2 if sc.defer_half else n
    sink: SmtpSink | FaultSink = FaultSink(rundir) if sc.defer_half else SmtpSink(dumpdir)
    relay: Relaygw | PostfixRelay | None = None
    d = res.data
    d["load_before"] = _loadavg()
    try:
        sink.start()
        rg: Relaygw | None = None
        if system == "relaygw":
            relay = rg = Relaygw(rundir, sink.port, workers).start()
            d["workers"] = workers
        else:
            relay = PostfixRelay(rundir, sink.port, free_port()).start()
        d["start_status"] = relay.status()
        # relaygw: every process of its tree, read before and after the load.
        snap0 = rg.cpu_snapshot() if rg is not None else {}
        cpu0 = cpu_total(snap0) if rg is not None else relay.cpu()
        reactor0 = rg.reactor_cpu() if rg is not None else 0.0
        sink.expect(expected)
        sampler = _Sampler(rg, sink)
        sampler.t0 = t0 = time.monotonic()
        sampler.start()
        try:
            code, err = _drive(sc, relay.port, res)
            t_accept = time.monotonic()
            d["accept_s"] = t_accept - t0
            if code != 0:
                res.fail(f"smtp-source exited {code}: {err[-500:]}")
            timeout = max(60.0, n / 50)  # after smtp-source is done
            reached = sink.wait(timeout)
            if reached is None:
                res.fail(f"sink counted {sink.count} of {expected} messages "
                         f"{timeout:.0f}s after the last 250")
                d["e2e_s"] = None
            else:
                d["e2e_s"] = reached - t0
            # Let any duplicate or straggler arrive before the books are closed.
            time.sleep(1.0)
        finally:
            sampler.stop()
        if rg is not None:
            reactor1 = rg.reactor_cpu()
            snap1 = rg.cpu_snapshot()
            d["cpu_s"] = cpu_total(snap1) - cpu0
            d["reactor_cpu_s"] = reactor1 - reactor0
            _worker_cpu(d, rg.pid, snap0, snap1)
            if d.get("e2e_s"):
                # The share of the run during which the reactor thread was on a CPU.
                d["reactor_busy"] = d["reactor_cpu_s"] / d["e2e_s"]
                if d.get("workers_main_cpu_s"):
                    d["workers_busy"] = max(d["workers_main_cpu_s"]) / d["e2e_s"]
        else:
            d["cpu_s"] = relay.cpu() - cpu0
        d["end_status"] = relay.status(pss=True) if rg is not None else relay.status()
        d["queued_before_stop"] = relay.queued()
        d["sink_count"] = sink.count
        if rg is not None:
            d["processes"] = max(sampler.max_processes, d["start_status"].get("processes", 0),
                                 d["end_status"].get("processes", 0))
            d["threads_max"] = max(sampler.max_threads, d["end_status"].get("Threads", 0))
        elif d["end_status"].get("processes"):
            d["processes"] = d["end_status"]["processes"]
        if sc.rss_samples:
            d["rss_milestones"] = _milestones(sampler.samples, n)
        d["rss_max_sampled_kib"] = max((s[2] for s in sampler.samples), default=0)
    except BenchError as e:
        res.fail(str(e))
    finally:
        if relay is not None:
            try:
                relay.stop()
            except Exception as e:
                res.fail(f"stopping {system}: {e}")
        sink.stop()
    d["load_after"] = _loadavg()
    if relay is not None:
        _check_books(sc, system, relay, sink, res, n, expected)
        count, first = relay.log_problems()
        d["log_problems"] = count
        if count:
            res.problems.append(f"{count} error lines in the {system} log, first: "
                                + " | ".join(first[:3]))
        if system == "relaygw":
            _check_exit(relay, res)
    sink.remove_dump()
    _rates(d, n, expected)


def _worker_cpu(d: dict[str, Any], main: int, before: dict, after: dict) -> None:
    """CPU seconds of each worker (every process of the tree but the main one) during the
    run: of the whole process, and of its main thread (0 at the start for one born since)."""
    procs, threads = [], []
    for key, (total, thread) in after.items():
        if key[0] == main:
            continue
        total0, thread0 = before.get(key, (0.0, 0.0))
        procs.append(total - total0)
        threads.append(thread - thread0)
    d["workers_cpu_s"] = round(sum(procs), 3)
    d["workers_main_cpu_s"] = sorted((round(t, 3) for t in threads), reverse=True)


def _check_exit(relay: Relaygw, res: RunResult) -> None:
    if not relay.exited_cleanly():
        res.fail(f"relaygw exited with status {relay.proc.returncode} on SIGTERM")
    _check_leftovers(relay, res)


def _check_leftovers(relay: Relaygw, res: RunResult) -> None:
    if relay.leftovers:
        res.fail(f"{len(relay.leftovers)} relaygw worker process(es) still ran 5 s after "
                 f"relaygw exited (killed): pids {relay.leftovers}")


def _drive(sc: Scenario, port: int, res: RunResult) -> tuple[int | None, str]:
    """Run the smtp-source load for ``sc``; the worst exit status and the stderr."""
    timeout = max(120.0, sc.messages / 20)
    if sc.per_connection > 1:
        # smtp-source -d sends all of its -m messages over one connection per session:
        # one smtp-source per connection, one after the other.
        runs = sc.messages // (sc.sessions * sc.per_connection)
        errors = []
        for _ in range(runs):
            code, err = Source(port, sessions=sc.sessions, messages=sc.per_connection
                               * sc.sessions, size=sc.size, recipients=sc.recipients,
                               reuse=True).start().wait(timeout)
            if code != 0:
                return code, err
            errors.append(err)
        return 0, "\n".join(e for e in errors if e)
    if sc.defer_half:
        half = sc.messages // 2
        sources = [Source(port, sessions=sc.sessions // 2, messages=half, size=sc.size,
                          recipients=sc.recipients, to=to).start()
                   for to in ("b@y.bench", "defer@y.bench")]
    else:
        sources = [Source(port, sessions=sc.sessions, messages=sc.messages, size=sc.size,
                          recipients=sc.recipients).start()]
    worst: int | None = 0
    errs = []
    for src in sources:
        code, err = src.wait(timeout)
        if code != 0:
            worst = code
        if err:
            errs.append(err)
    return worst, "\n".join(errs)


def _check_books(sc: Scenario, system: str, relay: Any, sink: Any, res: RunResult,
                 n: int, expected: int) -> None:
    """Every accepted message arrived exactly once; the queue holds only what should stay."""
    d = res.data
    v = sink.verify(relay.relay_id)
    d["sink"] = v
    rcpts = expected * sc.recipients
    if v["transactions"] != expected:
        res.fail(f"sink recorded {v['transactions']} transactions, expected {expected}")
    if v["unique"] != expected or v["dups"]:
        res.fail(f"sink saw {v['unique']} distinct {system} queue ids and {v['dups']} "
                 f"duplicates, expected {expected} and 0")
    if v["rcpts"] != rcpts:
        res.fail(f"sink recorded {v['rcpts']} recipients, expected {rcpts}")
    left = d.get("queued_before_stop")
    should_stay = n - expected
    if left is not None and left != should_stay:
        res.fail(f"{system} queue held {left} messages at the end, expected {should_stay}")


def _rates(d: dict[str, Any], n: int, expected: int) -> None:
    d["n"] = n
    d["expected_at_sink"] = expected
    acc, e2e = d.get("accept_s"), d.get("e2e_s")
    d["accept_rate"] = n / acc if acc else None
    d["e2e_rate"] = expected / e2e if e2e else None


def _milestones(samples: list[tuple[float, int, int]], n: int) -> list[tuple[int, int]]:
    """(messages at the sink, VmRSS KiB) at each 10 % of the run."""
    out = []
    marks = [n * k // 10 for k in range(1, 11)]
    i = 0
    for _, count, rss in samples:
        while i < len(marks) and count >= marks[i]:
            out.append((marks[i], rss))
            i += 1
    return out


# -- scenario (e): idle connections ----------------------------------------------------------

def _open_idle(port: int, count: int, batch: int = 500,
               timeout: float = 120.0) -> tuple[list[socket.socket], int, float]:
    """Open ``count`` sessions, each greeted and past EHLO; (sockets, refused, seconds)."""
    start = time.monotonic()
    deadline = start + timeout
    sel = selectors.DefaultSelector()
    done: list[socket.socket] = []
    refused = 0
    opened = 0
    pending: dict[socket.socket, bytes] = {}
    try:
        while (opened < count or pending) and time.monotonic() < deadline:
            while opened < count and len(pending) < batch:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect((LOOPBACK, port))
                sel.register(s, selectors.EVENT_READ)
                pending[s] = b""
                opened += 1
            for key, _ in sel.select(timeout=1.0):
                s = key.fileobj
                try:
                    chunk = s.recv(512)
                except OSError:
                    chunk = b""
                buf = pending[s] + chunk
                if chunk and not _complete_reply(buf):
                    pending[s] = buf
                    continue
                if chunk and buf.startswith(b"220"):
                    # Greeted: say EHLO, then idle once its reply is complete.
                    try:
                        s.send(b"EHLO idle.bench\r\n")
                        pending[s] = b"EHLO:"
                        continue
                    except OSError:
                        pass
                sel.unregister(s)
                del pending[s]
                if chunk and buf.startswith(b"EHLO:250"):
                    done.append(s)
                else:
                    refused += 1
                    s.close()
        for s in pending:
            refused += 1
            s.close()
    finally:
        sel.close()
    return done, refused, time.monotonic() - start


def _complete_reply(buf: bytes) -> bool:
    """Whether ``buf`` (after an optional ``EHLO:`` tag) ends with a reply's last line."""
    text = buf[5:] if buf.startswith(b"EHLO:") else buf
    if not text.endswith(b"\r\n"):
        return False
    last = text[:-2].rsplit(b"\r\n", 1)[-1]
    return len(last) < 4 or last[3:4] != b"-"


def _close_all(socks: list[socket.socket]) -> None:
    linger = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # l_onoff=1, l_linger=0: RST, no TIME_WAIT
    for s in socks:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.close()


def run_idle(sc: Scenario, system: str, rnd: int, workdir: Path,
             workers: int | str = "auto") -> RunResult:
    res = RunResult(sc.key, system, rnd)
    rundir = workdir / f"{sc.key}-{system}-{rnd}"
    rundir.mkdir()
    d = res.data
    d["load_before"] = _loadavg()
    relay: Relaygw | None = None
    socks: list[socket.socket] = []
    try:
        # The sink only has to exist for the smarthost; no mail is sent.
        sink_port = free_port()
        relay = Relaygw(rundir, sink_port, workers).start()
        d["workers"] = workers
        time.sleep(0.5)
        st = relay.status()
        procs = [st.get("processes", 0)]
        d["rss_start_kib"] = st.get("VmRSS")
        d["greet_before_ms"] = statistics.median(
            greeting_time(relay.port) * 1000 for _ in range(5))
        socks, refused, took = _open_idle(relay.port, sc.idle)
        d["idle_open"] = len(socks)
        d["idle_refused"] = refused
        d["idle_open_s"] = took
        if refused or len(socks) != sc.idle:
            res.fail(f"{len(socks)} of {sc.idle} idle connections greeted ({refused} refused "
                     f"or timed out)")
        time.sleep(1.0)
        st = relay.status(pss=True)
        procs.append(st.get("processes", 0))
        d["rss_idle_kib"] = st.get("VmRSS")
        d["pss_idle_kib"] = st.get("Pss")
        d["threads_idle"] = st.get("Threads")
        probes = []
        for _ in range(sc.probes):
            probes.append(greeting_time(relay.port) * 1000)
            time.sleep(0.1)
        d["greet_ms"] = probes
        d["greet_median_ms"] = statistics.median(probes)
        d["greet_max_ms"] = max(probes)
        # Are the idle ones still there?  (relaygw's idle_timeout is 300 s.)
        alive = 0
        for s in socks:
            try:
                alive += s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        d["idle_alive_after"] = alive
        st = relay.status()
        procs.append(st.get("processes", 0))
        d["processes"] = max(procs)
        d["rss_end_kib"] = st.get("VmRSS")
        d["rss_peak_kib"] = st.get("VmHWM")  # the sum of each process's own VmHWM
        d["rss_per_conn_kib"] = ((d["rss_idle_kib"] - d["rss_start_kib"]) / max(1, len(socks))
                                 if d["rss_idle_kib"] and d["rss_start_kib"] else None)
    except (BenchError, OSError) as e:
        res.fail(f"{type(e).__name__}: {e}")
    finally:
        _close_all(socks)
        if relay is not None:
            relay.stop()
    d["load_after"] = _loadavg()
    if relay is not None:
        count, first = relay.log_problems()
        d["log_problems"] = count
        if count:
            res.problems.append(f"{count} error lines in the relaygw log, first: "
                                + " | ".join(first[:3]))
        _check_leftovers(relay, res)
    if res.ok:
        shutil.rmtree(rundir, ignore_errors=True)
    return res


def run(sc: Scenario, system: str, rnd: int, workdir: Path,
        workers: int | str = "auto") -> RunResult:
    """One run; ``workers`` is relaygw's ``[server] workers`` ("auto" or a count)."""
    if sc.kind == "idle":
        return run_idle(sc, system, rnd, workdir, workers)
    return run_throughput(sc, system, rnd, workdir, workers)
