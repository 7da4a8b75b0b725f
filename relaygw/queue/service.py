"""The spool's service: its thread pool, start-up recovery, free-space watch."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relaygw.queue.store import Spool, StoredMessage

log = Logger()

FREE_SPACE_INTERVAL = 1.0  # seconds; MAIL reads the cached value


class SpoolService(service.Service):
    name = "spool"

    def __init__(self, spool: Spool, threadpool: ThreadPool, clock: Any) -> None:
        self.spool = spool
        self.threadpool = threadpool
        self.clock = clock
        self.recovered: list[StoredMessage] = []
        self._watch: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self.threadpool.start()
        # Blocking on purpose: the queue must be sound before any client is served.
        self.recovered = self.spool.recover()
        log.info("spool {path}: {n} queued messages", path=str(self.spool.directory),
                 n=len(self.recovered))
        self._watch = LoopingCall(self._refresh)
        self._watch.clock = self.clock
        self._watch.start(FREE_SPACE_INTERVAL, now=False)

    def _refresh(self) -> None:
        self.spool.refresh_free_space().addErrback(
            lambda f: log.failure("spool: cannot read free space", f))

    def stopService(self) -> None:
        super().stopService()
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self.threadpool.stop()
