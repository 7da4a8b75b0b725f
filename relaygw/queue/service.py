"""The spool's service: its thread pool, start-up recovery, free-space watch."""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from relaygw.queue.store import Spool, StoredMessage

log = Logger()

FREE_SPACE_INTERVAL = 1.0  # seconds; MAIL reads the cached value


class SpoolUnusableError(Exception):
    """The spool cannot be used; the message names ``server.spool_dir`` and the reason."""


def _why(e: OSError) -> str:
    why = e.strerror or str(e)
    uid = os.geteuid()
    if uid != 0 and isinstance(e, PermissionError):
        try:
            why += f" (relaygw runs as {pwd.getpwuid(uid).pw_name})"
        except KeyError:
            why += f" (relaygw runs as uid {uid})"
    return why


def check_spool(spool: Spool) -> None:
    """Blocking: the spool's directories exist (made 0700 when missing) and this process
    may write in them; else SpoolUnusableError says which and why. Without this check a
    spool its user cannot write fails at the first message, with a client told 451."""
    directories = (spool.directory, spool.tmp_dir, spool.queue_dir, spool.corrupt_dir)
    for directory in directories:
        try:
            os.stat(directory)
        except FileNotFoundError:
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise SpoolUnusableError(f"server.spool_dir: cannot create {directory}: "
                                         f"{_why(e)}") from None
        except OSError as e:  # a directory on the way that this user may not enter
            raise SpoolUnusableError(f"server.spool_dir: cannot reach {directory}: "
                                     f"{_why(e)}") from None
    for directory in directories:
        if not os.access(directory, os.W_OK | os.X_OK,
                         effective_ids=os.access in os.supports_effective_ids):
            denied: OSError = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            if _read_only(directory):
                denied = OSError(errno.EROFS, os.strerror(errno.EROFS))
            raise SpoolUnusableError(f"server.spool_dir: cannot write in {directory}: "
                                f"{_why(denied)}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


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
        check_spool(self.spool)
        try:
            self.recovered = self.spool.recover()
        except OSError as e:
            where = f" {e.filename}" if e.filename else ""
            raise SpoolUnusableError(f"server.spool_dir: cannot recover{where}: {_why(e)}") \
                from None
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
