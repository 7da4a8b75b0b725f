"""kill -9 under load: every 250 is delivered at least once, duplicates only in flight."""

from __future__ import annotations

import collections
import random
import re
import signal
import smtplib
import threading
import time

import pytest

from tests.reliability.conftest import (
    FAST_RETRY,
    DelayHandler,
    message,
    route_to,
    smarthost,
    spool_files,
    with_handler,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 200
THREADS = 10
PER_DESTINATION = 10
MSGID = re.compile(rb"^Message-ID: <(m\d+)@client\.example>", re.M)


class Load:
    """N messages from THREADS smtplib clients, one transaction per connection."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.acked: set[str] = set()
        self.failed: set[str] = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True)
                        for t in range(THREADS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=60)
            assert not t.is_alive()

    def _run(self, t: int) -> None:
        for i in range(t, N, THREADS):
            name = f"m{i:03d}"
            try:
                with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example",
                                  timeout=10) as smtp:
                    smtp.ehlo()
                    if smtp.mail("a@local.example")[0] != 250:
                        raise smtplib.SMTPException("MAIL")
                    if smtp.rcpt("b@remote.example")[0] != 250:
                        raise smtplib.SMTPException("RCPT")
                    code, _ = smtp.data(message(name, size=self.size, msgid=name))
                ok = code == 250
            except (OSError, smtplib.SMTPException):
                ok = False
            with self.lock:
                (self.acked if ok else self.failed).add(name)


@pytest.mark.parametrize("moment", ["data_stream", "after_250s", "outbound"])
def test_kill_9_under_load_loses_nothing_acknowledged(daemon, capture, moment):
    rng = random.Random(f"relaygw-kill9-{moment}")
    sink = with_handler(capture(), DelayHandler(0.3 if moment == "outbound" else 0.0))
    config = (FAST_RETRY + f"max_connections_per_destination = {PER_DESTINATION}\n"
              + smarthost("up", sink.port) + route_to("up"))
    daemon.start(config)
    # Large bodies keep the DATA stream busy; small ones make many 250s quickly.
    load = Load(daemon.port, size=64 * 1024 if moment == "data_stream" else 2 * 1024)
    load.start()
    if moment == "data_stream":
        assert wait_until(lambda: load.acked, timeout=60)
        # Not a wait for a state: a random moment, while clients are mid-DATA with
        # 64 KiB bodies, paced by the load and chosen by the seeded rng.
        time.sleep(rng.uniform(0.1, 0.5))
    elif moment == "after_250s":
        k = rng.randint(20, 120)
        assert wait_until(lambda: len(load.acked) >= k, timeout=60)
    else:
        k = rng.randint(10, 60)
        assert wait_until(lambda: len(sink.messages) >= k and sink.handler.in_data > 0,
                          timeout=60, interval=0.005)
    daemon.stop(signal.SIGKILL)
    delivered_at_kill = len(sink.messages)
    load.join()
    acked_at_kill = set(load.acked)
    assert acked_at_kill, "the kill came before any 250: choose a later moment"
    if moment == "outbound":
        assert delivered_at_kill < len(acked_at_kill), "nothing left to deliver at the kill"
    else:
        assert len(acked_at_kill) < N, "the kill came after the load: choose an earlier moment"

    daemon.start(config)
    # Nothing more can arrive once the spool is empty (each message is removed after its
    # last attempt ended, so its copies are in the sink) and no DATA of the killed
    # process's sessions is still being answered.
    wait_until(lambda: daemon.queued() == [] and sink.handler.in_data == 0, timeout=90,
               what="an empty spool and an idle sink",
               detail=lambda: (daemon.queued(), sink.handler.in_data))
    counts = collections.Counter()
    for _, rcpts, content in sink.messages:
        assert rcpts == ["b@remote.example"]
        (name,) = MSGID.findall(content)
        counts[name.decode()] += 1
    missing = sorted(acked_at_kill - set(counts))
    assert missing == [], f"acknowledged but never delivered: {missing}"
    assert set(counts) <= acked_at_kill | load.failed
    print(f"\n{moment}: acked={len(acked_at_kill)} failed={len(load.failed)} "
          f"delivered_at_kill={delivered_at_kill} arrived={sum(counts.values())}")
    duplicates = {name: c for name, c in counts.items() if c > 1}
    assert len(duplicates) <= PER_DESTINATION, duplicates
    assert all(c == 2 for c in duplicates.values()), duplicates
    assert spool_files(daemon.spool, "tmp") == []
    assert spool_files(daemon.spool, "corrupt") == []
    assert "Traceback" not in daemon.logs()
