"""The reference: a private Postfix relay doing relaygw's job (relayhost = the same sink).

Built on :class:`tests.support.postfix.PostfixInstance` (its own ``main.cf``,
``master.cf`` and queue under the run directory, loopback only, no DNS, started with
``postfix -c DIR start`` and stopped with everything it spawned; ``/etc/postfix`` is
neither read for settings nor changed).  What this module adds for the benchmark:

- ``relayhost = [127.0.0.1]:SINKPORT``: every message goes to the sink, like relaygw's
  single smarthost route;
- the queue under the run directory, on the same local disk as relaygw's spool; Postfix
  fsyncs each queue file before smtpd answers 250 (cleanup(8)), like relaygw;
- Postfix's stock retry timers (``queue_run_delay``/``minimal_backoff_time`` 300 s,
  ``maximal_backoff_time`` 4000 s) instead of the test helper's 5 s ones, so a deferred
  message of scenario (f) is retried no sooner than by relaygw (300 s);
- CPU accounting over all of the instance's processes.
"""

from __future__ import annotations

import re
from pathlib import Path

from harness import CLEANUP, LOOPBACK, BenchError, cpu_seconds

# The test suite's Postfix harness; benchmarks/run.py puts the repository root on sys.path.
from tests.support.postfix import PostfixError, PostfixInstance, unavailable_reason

POSTFIX_ID = re.compile(rb"\(Postfix\) with \S+ id (\w+)")

# Postfix 3.7's defaults, restored over the test helper's quick retry settings.
STOCK_TIMERS = {
    "queue_run_delay": "300s",
    "minimal_backoff_time": "300s",
    "maximal_backoff_time": "4000s",
}
# Short queue ids come from the queue file's inode and can recur within a run once a
# message has left the queue; the sink's exactly-once check needs ids that do not.
# Long ids change nothing in how Postfix queues or delivers.
BENCH_MAIN_CF = {**STOCK_TIMERS, "enable_long_queue_ids": "yes"}


def postfix_version() -> str:
    import subprocess

    try:
        out = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out or "unknown"


class PostfixRelay:
    """A started/stopped Postfix relay listening on a free loopback port."""

    name = "postfix"
    relay_id = POSTFIX_ID

    def __init__(self, directory: Path, sink_port: int, port: int) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise BenchError(f"cannot run Postfix here: {reason}")
        self.dir = directory
        self.port = port
        self.instance = PostfixInstance(
            directory / "postfix", port, f"[{LOOPBACK}]:{sink_port}",
            hostname="postfix.bench", main_cf=BENCH_MAIN_CF)
        self._token = 0

    def start(self) -> PostfixRelay:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._token = CLEANUP.add("postfix", self.stop)
        try:
            self.instance.start(timeout=60)
        except PostfixError as e:
            self.stop()
            raise BenchError(str(e)) from e
        return self

    def status(self) -> dict[str, int]:
        """How many processes the instance has now (its memory is not measured)."""
        return {"processes": len(self.instance.processes())}

    def cpu(self) -> float:
        """CPU seconds of all instance processes, reaped children included (via master)."""
        total = 0.0
        master = self.instance.master_pid()
        for pid in self.instance.processes():
            total += cpu_seconds(pid, children=(pid == master))
        return total

    def queued(self) -> int:
        try:
            return len(self.instance.queue())
        except PostfixError:
            return -1

    def stop(self) -> None:
        try:
            self.instance.stop()
        finally:
            CLEANUP.remove(self._token)

    def log_problems(self, limit: int = 5) -> tuple[int, list[str]]:
        lines = self.instance.maillog().splitlines()
        bad = [line for line in lines if re.search(r"\b(warning|error|fatal|panic):", line)]
        return len(bad), bad[:limit]
