"""Processes of the benchmark: sinks, relaygw, load generators, and their cleanup.

Everything listens on or connects to 127.0.0.1 only.  Every process started here is
registered with :data:`CLEANUP` and stopped by :func:`stop_all` (run.py calls it in a
``finally`` and on SIGTERM/SIGHUP/SIGINT), so nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOOPBACK = "127.0.0.1"
NOFILE = 65536  # RLIMIT_NOFILE for relaygw and the benchmark itself (scenario e)

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"


class BenchError(RuntimeError):
    """A run could not be carried out; the message says why."""


# -- cleanup -------------------------------------------------------------------------------

class _Cleanup:
    """Stop callbacks of everything started, run newest first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[int, tuple[str, Callable[[], None]]] = {}
        self._next = 0

    def add(self, name: str, stop: Callable[[], None]) -> int:
        with self._lock:
            self._next += 1
            self._items[self._next] = (name, stop)
            return self._next

    def remove(self, token: int) -> None:
        with self._lock:
            self._items.pop(token, None)

    def run(self) -> list[str]:
        errors = []
        while True:
            with self._lock:
                if not self._items:
                    return errors
                token = max(self._items)
                name, stop = self._items.pop(token)
            try:
                stop()
            except Exception as e:  # keep stopping the others
                errors.append(f"stopping {name}: {e}")


CLEANUP = _Cleanup()


def stop_all() -> list[str]:
    return CLEANUP.run()


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's RLIMIT_NOFILE (root may raise the hard limit); the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, limit)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    # In the child, before exec: a big fd limit, and no terminal signals (run.py stops us).
    raise_nofile()


def popen(argv: list[str], **kw) -> subprocess.Popen:
    """Start a child in its own session (a Ctrl-C reaches only run.py, which stops it)."""
    return subprocess.Popen(argv, preexec_fn=_child_setup, start_new_session=True, **kw)


def terminate(proc: subprocess.Popen, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal a child, wait for it, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


# -- small helpers -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def greeting_time(port: int, timeout: float = 10.0) -> float:
    """Seconds from connect() until a complete 220 line arrives."""
    start = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        buf = b""
        while b"\r\n" not in buf:
            chunk = s.recv(512)
            if not chunk:
                raise BenchError(f"127.0.0.1:{port} closed before greeting ({buf!r})")
            buf += chunk
        elapsed = time.monotonic() - start
        if not buf.startswith(b"220"):
            raise BenchError(f"127.0.0.1:{port} greeted with {buf[:80]!r}")
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
        return elapsed


def wait_greeting(port: int, timeout: float, alive: Callable[[], bool] = lambda: True,
                  what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"{what} exited before greeting on 127.0.0.1:{port}")
        try:
            greeting_time(port, timeout=2)
            return
        except (OSError, BenchError) as e:
            last = e
        time.sleep(0.05)
    raise BenchError(f"{what} on 127.0.0.1:{port} did not greet within {timeout}s ({last})")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, Threads from /proc/PID/status (KiB for the Vm fields)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = False, task: int | None = None) -> float:
    """utime+stime of a process (plus its reaped children's with ``children``), or of
    one of its threads (``task``)."""
    path = f"/proc/{pid}/task/{task}/stat" if task is not None else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


# -- process trees (relaygw's main process and its worker processes) ----------------------

def _stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc stat file after the ``(comm)`` one: [0] is field 3 (state)."""
    try:
        return Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


# /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN; without it, scan /proc for ppids.
_HAVE_CHILDREN_FILE = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        with contextlib.suppress(OSError, ValueError):
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return kids


def _ppid_map() -> dict[int, list[int]]:
    """ppid -> pids, from every /proc/PID/stat (field 4)."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(f"/proc/{name}/stat")
        if fields:
            out.setdefault(int(fields[1]), []).append(int(name))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all of its living descendants, parents before their children."""
    if not os.path.exists(f"/proc/{pid}"):
        return []
    if _HAVE_CHILDREN_FILE:
        kids_of = _children
    else:
        ppids = _ppid_map()

        def kids_of(p: int) -> list[int]:
            return ppids.get(p, [])

    tree, seen, i = [pid], {pid}, 0
    while i < len(tree):
        for kid in kids_of(tree[i]):
            if kid not in seen:
                seen.add(kid)
                tree.append(kid)
        i += 1
    return tree


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_status(pid: int, pss: bool = False) -> dict[str, int]:
    """Sums over the process tree of ``pid``: VmRSS, VmHWM (the sum of each process's own
    peak), Threads (KiB for the Vm fields), and with ``pss`` Pss (shared pages split
    between the processes that map them); ``processes`` (how many); ``main_VmRSS`` and
    ``main_VmHWM`` of ``pid`` alone.  Empty if ``pid`` is gone."""
    out: dict[str, int] = {}
    for i, p in enumerate(process_tree(pid)):
        st = proc_status(p)
        if not st:
            continue  # exited meanwhile
        out["processes"] = out.get("processes", 0) + 1
        for key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = out.get(key, 0) + st.get(key, 0)
        if i == 0:
            out["main_VmRSS"], out["main_VmHWM"] = st.get("VmRSS", 0), st.get("VmHWM", 0)
        if pss:
            out["Pss"] = out.get("Pss", 0) + _pss_kib(p)
    return out


# (pid, start time in ticks) -> (CPU s of the process and of its reaped children,
#                                CPU s of its main thread)
CpuSnapshot = dict[tuple[int, int], tuple[float, float]]


def tree_cpu(pid: int) -> CpuSnapshot:
    """CPU seconds of every process of the tree of ``pid``, parents read before their
    children.  Each process counts utime+stime plus cutime+cstime: children that exited
    and were waited for are in their parent's cutime/cstime, so a sum over the tree
    misses only children that exited unreaped (or between the reads of parent and child)."""
    snap: CpuSnapshot = {}
    for p in process_tree(pid):
        fields = _stat_fields(f"/proc/{p}/stat")
        if not fields:
            continue
        total = sum(int(x) for x in fields[11:15]) / _CLK_TCK
        snap[(p, int(fields[19]))] = (total, cpu_seconds(p, task=p))
    return snap


def cpu_total(snap: CpuSnapshot) -> float:
    return sum(total for total, _ in snap.values())


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(f"/proc/{pid}/stat")
    return int(fields[19]) if fields else None


def _reap_leftovers(tree: list[tuple[int, int | None]], grace: float = 5.0) -> list[int]:
    """Of the processes ``tree`` (pid, start time), those still running ``grace`` seconds
    after their parent went; they are SIGKILLed.  A pid that now belongs to another
    process (another start time) is left alone."""
    def alive() -> list[int]:
        return [p for p, start in tree if start is not None and _start_time(p) == start
                and (_stat_fields(f"/proc/{p}/stat") or ["Z"])[0] != "Z"]

    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive()
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    return left


def make_workdir() -> Path:
    """The benchmark's scratch directory on local disk (/tmp here), searchable by postfix."""
    path = Path(tempfile.mkdtemp(prefix="relaygw-bench-"))
    path.chmod(0o755)
    return path


def make_dumpdir() -> Path:
    """Where smtp-sink writes its dumps: tmpfs if there is one (no disk I/O of its own)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="relaygw-bench-sink-", dir=base))
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    path.chmod(0o755)
    return path


# -- sinks ---------------------------------------------------------------------------------

class _CounterSink:
    """Common part: a child whose stdout carries counters; ``count`` is read in a thread."""

    name = "sink"

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.count = 0
        self._target: int | None = None
        self._reached_at: float | None = None
        self._cond = threading.Condition()
        self._token = 0
        self.stderr_path: Path | None = None

    def _parse(self, text: str) -> None:
        raise NotImplementedError

    def _reader(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        pending = ""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.monotonic()
            pending += chunk.decode("ascii", "replace")
            *records, pending = re.split(r"[\r\n]", pending)
            with self._cond:
                for record in records:
                    if record:
                        self._parse(record)
                if (self._target is not None and self._reached_at is None
                        and self.count >= self._target):
                    self._reached_at = now
                self._cond.notify_all()

    def _start_reader(self) -> None:
        threading.Thread(target=self._reader, name=f"{self.name}-reader", daemon=True).start()

    def expect(self, target: int) -> None:
        """Start watching for ``target`` messages (call before the load starts)."""
        with self._cond:
            self._target = target
            self._reached_at = time.monotonic() if self.count >= target else None

    def wait(self, timeout: float) -> float | None:
        """The monotonic time at which the target was reached, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._reached_at is None:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    return None
                self._cond.wait(min(left, 0.5))
            return self._reached_at

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=5)
            CLEANUP.remove(self._token)
            time.sleep(0.05)  # let the reader see the final counters


class SmtpSink(_CounterSink):
    """Postfix's smtp-sink, counting messages (``-c``) and dumping them (``-D``) to tmpfs.

    The dump is only read after the run, to check that every message arrived exactly once
    (each relay writes its own queue id into the topmost Received: header).
    """

    name = "smtp-sink"

    def __init__(self, dumpdir: Path) -> None:
        super().__init__()
        self.dump = dumpdir / "dump"
        self.counters: dict[str, int] = {}

    def _parse(self, text: str) -> None:
        for key, value in re.findall(r"(\w+)=(\d+)", text):
            self.counters[key] = int(value)
        self.count = self.counters.get("mesg", self.count)

    def start(self) -> SmtpSink:
        last: Exception | None = None
        for _ in range(5):
            self.port = free_port()
            self.stderr_path = self.dump.parent / "smtp-sink.err"
            err = open(self.stderr_path, "wb")
            # -u nobody: drop root after bind; -c: counters on stdout; -D: one dump file;
            # -m 1024: connections handled at once; backlog 1024.
            self.proc = popen([SMTP_SINK, "-u", "nobody", "-c", "-m", "1024", "-D",
                               str(self.dump), f"{LOOPBACK}:{self.port}", "1024"],
                              stdout=subprocess.PIPE, stderr=err)
            err.close()
            self._token = CLEANUP.add("smtp-sink", self.stop)
            self._start_reader()
            try:
                wait_greeting(self.port, 10, lambda: self.proc.poll() is None, "smtp-sink")
                # The probe itself is a session, not a message: counters stay at mesg=0.
                return self
            except BenchError as e:
                last = e
                self.stop()
        err_text = self.stderr_path.read_text(errors="replace") if self.stderr_path else ""
        raise BenchError(f"smtp-sink did not start: {last}; {err_text}")

    def verify(self, relay_id: re.Pattern[bytes]) -> dict[str, int]:
        """Counts from the dump: transactions, recipients, distinct relay ids, duplicates."""
        try:
            data = self.dump.read_bytes()
        except FileNotFoundError:
            data = b""
        ids = relay_id.findall(data)
        return {
            "transactions": data.count(b"X-Client-Addr: "),
            "rcpts": data.count(b"X-Rcpt-Args: "),
            "ids": len(ids),
            "unique": len(set(ids)),
            "dups": len(ids) - len(set(ids)),
        }

    def remove_dump(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.dump.unlink()


class FaultSink(_CounterSink):
    """benchmarks/faultsink.py: 451 to every RCPT for a ``defer`` local part."""

    name = "faultsink"

    def __init__(self, workdir: Path) -> None:
        super().__init__()
        self.workdir = workdir
        self.counters: dict[str, int] = {}

    def _parse(self, text: str) -> None:
        for key, value in re.findall(r"(\w+)=(\d+)", text):
            self.counters[key] = int(value)
        self.count = self.counters.get("msgs", self.count)

    def start(self) -> FaultSink:
        self.port = free_port()
        self.stderr_path = self.workdir / "faultsink.err"
        err = open(self.stderr_path, "wb")
        self.proc = popen([sys.executable, str(HERE / "faultsink.py"), "--port", str(self.port)],
                          stdout=subprocess.PIPE, stderr=err)
        err.close()
        self._token = CLEANUP.add("faultsink", self.stop)
        self._start_reader()
        wait_greeting(self.port, 20, lambda: self.proc.poll() is None, "faultsink")
        return self

    def verify(self, relay_id: re.Pattern[bytes]) -> dict[str, int]:
        c = self.counters
        return {"transactions": c.get("msgs", 0), "rcpts": c.get("rcpts", 0),
                "ids": c.get("msgs", 0) - c.get("noid", 0),
                "unique": c.get("msgs", 0) - c.get("noid", 0) - c.get("dups", 0),
                "dups": c.get("dups", 0), "deferred_rcpts": c.get("deferred", 0)}

    def remove_dump(self) -> None:
        pass


# -- relaygw -------------------------------------------------------------------------------

RELAYGW_ID = re.compile(rb"\(relaygw\) with \S+ id (\w+)")

CONFIG_TEMPLATE = """\
# Written by benchmarks/harness.py
[server]
hostname = "relay.bench"
spool_dir = "{spool}"
max_connections = 20000
max_connections_per_client = 20000
workers = {workers}

[[listeners]]
address = "127.0.0.1:{port}"
tls = "none"

[smarthosts.sink]
hosts = ["127.0.0.1:{sink_port}"]
tls = "none"

[[routes]]
action = "smarthost"
smarthost = "sink"
"""


def parse_workers(value: str) -> int | str:
    """``--relaygw-workers``: "auto" or an integer 0..64 (what relaygw's config accepts)."""
    if value.strip().lower() == "auto":
        return "auto"
    n = int(value)  # ValueError: argparse reports it
    if not 0 <= n <= 64:
        raise ValueError(f"workers must be 0..64 or auto, not {n}")
    return n


def workers_toml(workers: int | str) -> str:
    """The TOML value: "auto" as a string, a count as a bare integer."""
    return '"auto"' if workers == "auto" else str(int(workers))


def expected_workers(workers: int | str) -> int:
    """Worker processes relaygw should run for ``workers`` ("auto": one per CPU core,
    none on a single core; as relaygw/config.py resolves it)."""
    if workers == "auto":
        cores = os.cpu_count() or 1
        return 0 if cores < 2 else min(cores, 64)
    return int(workers)


def relaygw_command() -> str:
    candidate = Path(sys.executable).parent / "relaygw"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("relaygw")
    if found is None:
        raise BenchError("the relaygw command is not installed (run `make venv`)")
    return found


class Relaygw:
    """``relaygw run --config DIR/relaygw.toml``, started as users start it."""

    name = "relaygw"
    relay_id = RELAYGW_ID

    def __init__(self, directory: Path, sink_port: int, workers: int | str = "auto") -> None:
        self.dir = directory
        self.sink_port = sink_port
        self.workers = workers
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = directory / "relaygw.log"
        self.spool = directory / "spool"
        self._token = 0
        self.leftovers: list[int] = []  # descendants still alive after relaygw exited

    def start(self, timeout: float = 60.0) -> Relaygw:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.dir / "relaygw.toml"
        config.write_text(CONFIG_TEMPLATE.format(spool=self.spool, port=self.port,
                                                 sink_port=self.sink_port,
                                                 workers=workers_toml(self.workers)))
        log = open(self.log_path, "ab")
        self.proc = popen([relaygw_command(), "run", "--config", str(config)],
                          stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()
        self._token = CLEANUP.add("relaygw", self.stop)
        try:
            wait_greeting(self.port, timeout, lambda: self.proc.poll() is None, "relaygw")
        except BenchError as e:
            self.stop()
            raise BenchError(f"{e}; log:\n{self.log_tail()}") from e
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self, pss: bool = False) -> dict[str, int]:
        """Sums over the whole process tree (main process and workers): see tree_status."""
        return tree_status(self.pid, pss=pss)

    def cpu_snapshot(self) -> CpuSnapshot:
        return tree_cpu(self.pid)

    def cpu(self) -> float:
        """CPU seconds of the whole process tree (reaped children included)."""
        return cpu_total(self.cpu_snapshot())

    def reactor_cpu(self) -> float:
        """CPU seconds of the main thread, which runs the Twisted reactor."""
        return cpu_seconds(self.pid, task=self.pid)

    def queued(self) -> int:
        """Messages still in the spool (queue/ files that are not .state files)."""
        queue = self.spool / "queue"
        if not queue.is_dir():
            return 0
        return sum(1 for p in queue.iterdir() if not p.name.endswith(".state"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # The workers, to make sure that none outlives relaygw (by pid and start time).
            tree = [(p, _start_time(p)) for p in process_tree(self.pid)[1:]]
            # SIGTERM: graceful (sessions and deliveries get up to 30 s), then SIGKILL.
            terminate(self.proc, timeout=45)
            self.leftovers = _reap_leftovers(tree)
        CLEANUP.remove(self._token)

    def exited_cleanly(self) -> bool:
        return self.proc is not None and self.proc.returncode in (0, -signal.SIGTERM)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_problems(self, limit: int = 5) -> tuple[int, list[str]]:
        """Error-level log lines and tracebacks: their number and the first few."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return 0, []
        bad = [line for line in lines
               if re.search(r"#(error|critical)\]|Traceback|Unhandled", line)
               or '"log_level": "error"' in line or '"level": "error"' in line]
        return len(bad), bad[:limit]


# -- smtp-source ---------------------------------------------------------------------------

class Source:
    """One smtp-source process; ``argv`` is its command line."""

    def __init__(self, port: int, *, sessions: int, messages: int, size: int,
                 recipients: int = 1, reuse: bool = False, to: str = "b@y.bench",
                 sender: str = "a@x.bench") -> None:
        self.argv = [SMTP_SOURCE, "-M", "client.bench", "-s", str(sessions), "-m", str(messages),
                     "-l", str(size), "-f", sender, "-t", to]
        if recipients > 1:
            self.argv += ["-r", str(recipients)]
        if reuse:
            self.argv.append("-d")
        self.argv.append(f"{LOOPBACK}:{port}")
        self.proc: subprocess.Popen | None = None
        self._token = 0

    def start(self) -> Source:
        self.proc = popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._token = CLEANUP.add("smtp-source", self.stop)
        return self

    def wait(self, timeout: float) -> tuple[int | None, str]:
        """Exit status (None if killed after ``timeout``) and stderr."""
        assert self.proc is not None
        try:
            _, err = self.proc.communicate(timeout=timeout)
            code: int | None = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.stop()
            _, err = self.proc.communicate()
            code = None
        CLEANUP.remove(self._token)
        return code, err.decode(errors="replace").strip()

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=2, sig=signal.SIGKILL)
