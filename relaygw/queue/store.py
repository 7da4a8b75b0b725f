"""The durable spool: 250 means the message is on disk.

Layout under the spool directory::

    tmp/       files being written; anything here at start-up is a leftover
    queue/     <id>        envelope header + message, written once
               <id>.state  recipient states, replaced atomically after attempts
    corrupt/   files that could not be read, moved aside for the operator

A message file is written to tmp/, fsynced, renamed into queue/, and queue/ is
fsynced before the commit Deferred fires. Directory fsyncs are shared by every
commit that is waiting at the time (group commit), so many messages arriving
together cost one directory sync. All disk work runs in the spool's own thread
pool, and a change and the directory sync that makes it durable run in the same
task (one trip to the pool, not two); nothing here blocks the reactor thread
except ``recover``, which runs before the listeners start, and the methods that say
"Blocking", which callers run through ``run`` (or outside the daemon).

Message bytes are read through :meth:`Spool.content`, a
:class:`relaygw.queue.content.SpoolContent`: nobody else opens queue files.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaygw.envelope import Envelope
from relaygw.fileio import fsync_dir, write_all
from relaygw.observe import fields
from relaygw.queue.content import SpoolContent
from relaygw.queue.state import QueueState

MAGIC = b"RELAYGW-SPOOL 1\n"
STATE_SUFFIX = ".state"
FLUSH_AT = 256 * 1024  # bytes buffered before a write goes to the disk thread
MAX_BACKLOG = 4 * 1024 * 1024  # bytes queued for the disk before the writer asks for a pause

log = Logger()


class SpoolError(Exception):
    """A spool write failed; ``no_space`` tells a full disk from other faults."""

    def __init__(self, message: str, *, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


def new_queue_id() -> str:
    # Time-ordered (sorts by arrival) and unique without coordination.
    return f"{time.time_ns() // 1_000_000:011X}{secrets.token_hex(3).upper()}"


def _as_spool_error(exc: BaseException | None) -> SpoolError:
    if isinstance(exc, SpoolError):
        return exc
    no_space = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return SpoolError(str(exc), no_space=no_space)


def _spool_failure(failure: Failure) -> Failure:
    return Failure(_as_spool_error(failure.value))


@dataclass(frozen=True)
class StoredMessage:
    envelope: Envelope
    state: QueueState
    content_offset: int  # where the message bytes start in the queue file
    size: int  # message bytes

    def encode(self) -> bytes:
        """A just-committed message as a worker reports it: ``OFFSET SIZE ENVELOPE-JSON``
        (the state is the initial one, so it is not sent)."""
        return b"%d %d %s" % (self.content_offset, self.size, self.envelope.to_json())

    @classmethod
    def decode(cls, raw: bytes) -> StoredMessage:
        """The message :meth:`encode` describes; ValueError (or KeyError, TypeError) when
        ``raw`` is not one."""
        offset, size, envelope_json = raw.split(b" ", 2)
        envelope = Envelope.from_json(envelope_json)
        return cls(envelope, QueueState.initial(envelope), int(offset), int(size))


class _Batch:
    """Callers served by one directory fsync; ``done`` once it has run."""

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None


class _GroupSync:
    """fsync a directory for every caller waiting, one fsync per batch.

    Called in the spool's pool threads, after the caller's rename or unlink.
    A caller joins the batch that has not started yet, so the fsync that serves
    it begins after its change; while one fsync runs, the callers that arrive
    wait together and the first of them runs the next fsync for all of them.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._running = False
        self._next = _Batch()

    def sync(self) -> None:
        """Blocking: return once an fsync started after this call has succeeded."""
        with self._cond:
            batch = self._next
            while self._running and not batch.done:
                self._cond.wait()
            lead = not batch.done
            if lead:
                self._running = True
                self._next = _Batch()
        if lead:
            try:
                fsync_dir(self._path)
            except BaseException as exc:
                batch.error = exc
            with self._cond:
                batch.done = True
                self._running = False
                self._cond.notify_all()
        if batch.error is not None:
            raise batch.error


class Spool:
    def __init__(self, directory: Path, reactor: Any, threadpool: Any) -> None:
        self.directory = Path(directory)
        self.tmp_dir = self.directory / "tmp"
        self.queue_dir = self.directory / "queue"
        self._queue_prefix = os.path.join(self.queue_dir, "")
        self.corrupt_dir = self.directory / "corrupt"
        self._reactor = reactor
        self._pool = threadpool
        self._queue_sync = _GroupSync(self.queue_dir)
        self.free_bytes: int | None = None  # refreshed by refresh_free_space

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """Run blocking disk work in the spool's thread pool."""
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    # -- start-up ---------------------------------------------------------

    def recover(self) -> list[StoredMessage]:
        """Create the layout, clear leftovers, quarantine what cannot be read.

        Blocking; called once before listening. Returns the queued messages.
        """
        for d in (self.directory, self.tmp_dir, self.queue_dir, self.corrupt_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for leftover in sorted(self.tmp_dir.iterdir()):
            log.warn("spool: removed incomplete file {path}", path=str(leftover))
            leftover.unlink()
        names = [entry.name for entry in self._scan()]
        present = set(names)
        messages = []
        for name in names:
            path = self.queue_dir / name
            if name.endswith(STATE_SUFFIX):
                if name[: -len(STATE_SUFFIX)] not in present:
                    # Left behind when a finished message was removed.
                    log.info("spool: removed stale state file {path}", path=str(path))
                    path.unlink()
                continue
            try:
                messages.append(self._load(name))
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self._quarantine(name, f"{type(exc).__name__}: {exc}")
        self.free_bytes = self._free_space()
        return messages

    def _quarantine(self, queue_id: str, reason: str) -> None:
        for name in (queue_id, queue_id + STATE_SUFFIX):
            src = self.queue_dir / name
            if src.exists():
                os.replace(src, self.corrupt_dir / name)
        log.error("spool: moved unreadable message id={queue_id} dir={dir} reason={reason}",
                  queue_id=queue_id, dir=fields.text(str(self.corrupt_dir)),
                  reason=fields.text(reason), event="quarantined")

    # -- reading ----------------------------------------------------------

    def _scan(self) -> list[os.DirEntry[str]]:
        """Blocking: every entry of queue/, by name (queue ids sort by arrival)."""
        with os.scandir(self.queue_dir) as it:
            return sorted(it, key=lambda entry: entry.name)

    def queue_ids(self) -> list[str]:
        """Blocking: the messages in queue/ (state files skipped), oldest first.
        FileNotFoundError when there is no queue directory."""
        return [e.name for e in self._scan() if not e.name.endswith(STATE_SUFFIX)]

    def unqueued(self, known: Container[str], older_than: float) -> list[str]:
        """Blocking: ids of messages in queue/ that are not in ``known`` and whose file was
        last changed before the Unix time ``older_than``; files removed meanwhile are
        skipped. For messages a worker stored but never reported (run it in ``run``)."""
        found = []
        for entry in self._scan():
            name = entry.name
            if name.endswith(STATE_SUFFIX) or name in known:
                continue
            try:
                if entry.stat().st_mtime < older_than:
                    found.append(name)
            except FileNotFoundError:  # delivered and removed meanwhile
                continue
        return found

    def _load(self, queue_id: str) -> StoredMessage:
        path = self.queue_dir / queue_id
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError("not a relaygw spool file")
            length_line = f.readline(32)
            if not length_line.endswith(b"\n"):
                raise ValueError("truncated header")
            length = int(length_line)
            raw = f.read(length)
            if len(raw) != length or f.read(1) != b"\n":
                raise ValueError("truncated envelope")
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size - offset
        envelope = Envelope.from_json(raw)
        if envelope.queue_id != queue_id:
            raise ValueError(f"envelope names {envelope.queue_id}")
        try:
            state_raw = (self.queue_dir / (queue_id + STATE_SUFFIX)).read_bytes()
        except FileNotFoundError:
            state = QueueState.initial(envelope)
        else:
            state = QueueState.from_json(state_raw, envelope)
        return StoredMessage(envelope, state, offset, size)

    def load(self, queue_id: str) -> Deferred:
        """Deferred[StoredMessage] for one queued message."""
        return self.run(self._load, queue_id)

    def content(self, stored: StoredMessage) -> SpoolContent:
        """The message bytes of ``stored``, read in this spool's thread pool (or, with
        the blocking methods, in the caller's thread)."""
        # A plain string path: pathlib's parsing costs more than the rest of an attempt's
        # bookkeeping.
        return SpoolContent(self._queue_prefix + stored.envelope.queue_id,
                            stored.content_offset, stored.size, self.run)

    # -- writing ----------------------------------------------------------

    def new_message(self, envelope: Envelope) -> MessageWriter:
        return MessageWriter(self, envelope)

    def save_state(self, queue_id: str, state: QueueState) -> Deferred:
        """Durably replace a message's recipient state."""
        data = state.to_json()

        def write() -> None:
            tmp = self.tmp_dir / f"{queue_id}{STATE_SUFFIX}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.queue_dir / (queue_id + STATE_SUFFIX))
            self._queue_sync.sync()

        return self._as_spool_errors(self.run(write))

    def remove(self, queue_id: str) -> Deferred:
        """Drop a finished message: its file first, so a crash never revives it."""

        def unlink() -> None:
            for name in (queue_id, queue_id + STATE_SUFFIX):
                try:
                    os.unlink(self._queue_prefix + name)
                except FileNotFoundError:
                    pass
            self._queue_sync.sync()

        return self._as_spool_errors(self.run(unlink))

    @staticmethod
    def _as_spool_errors(d: Deferred) -> Deferred:
        return d.addErrback(_spool_failure)

    def _free_space(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def refresh_free_space(self) -> Deferred:
        def store(value: int) -> int:
            self.free_bytes = value
            return value

        return self.run(self._free_space).addCallback(store)


class MessageWriter:
    """Stream one message into tmp/ and commit it into queue/.

    ``write`` buffers and hands large runs to the disk thread; it returns a
    Deferred when the caller should stop reading until the disk catches up.
    The first failure is remembered and reported by ``commit``.
    """

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self.queue_id = envelope.queue_id
        self._spool = spool
        self._tmp = os.path.join(spool.tmp_dir, self.queue_id)
        header = envelope.to_json()
        self._buffer = [MAGIC, b"%d\n" % len(header), header, b"\n"]
        self._buffered = sum(map(len, self._buffer))
        self._envelope = envelope
        self._content_offset = self._buffered
        self._written = 0  # message bytes, after the header
        self._backlog = 0
        self._fd: int | None = None
        self._chain: Deferred = succeed(None)
        self._error: SpoolError | None = None
        self._sync_error: BaseException | None = None  # the directory sync failed
        self._finished = False

    def write(self, data: bytes) -> Deferred | None:
        if self._error is not None or self._finished or not data:
            return None
        self._buffer.append(data)
        self._buffered += len(data)
        self._written += len(data)
        if self._buffered >= FLUSH_AT:
            self._flush(self._write_sync)
            if self._backlog > MAX_BACKLOG:
                waiter: Deferred[None] = Deferred()

                def wake(result: Any) -> Any:
                    waiter.callback(None)
                    return result

                self._chain.addBoth(wake)
                return waiter
        return None

    def _flush(self, fn: Callable[[bytes], None]) -> None:
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        self._backlog += len(data)

        def step(_: Any) -> Deferred | None:
            if self._error is not None:
                return None
            return self._spool.run(fn, data).addCallbacks(done, failed)

        def done(_: Any) -> None:
            self._backlog -= len(data)

        def failed(f: Failure) -> None:
            self._backlog -= len(data)
            if self._error is None:
                self._error = _as_spool_error(f.value)
                log.error("spool: write failed id={queue_id} error={error}",
                          queue_id=self.queue_id, error=fields.text(str(self._error)))

        self._chain.addCallback(step)

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return self._fd

    def _write_sync(self, data: bytes) -> None:
        write_all(self._open(), data)

    def _commit_sync(self, data: bytes) -> None:
        fd = self._open()
        write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        self._fd = None
        queued = os.path.join(self._spool.queue_dir, self.queue_id)
        os.replace(self._tmp, queued)
        try:
            self._spool._queue_sync.sync()
        except BaseException as exc:
            # The client will be told 451 and send again: do not keep a copy it
            # would then receive twice.
            self._sync_error = exc
            try:
                os.unlink(queued)
            except OSError:
                pass

    def commit(self) -> Deferred:
        """Deferred[str]: fires with the queue id once the message is durable,
        or fails with SpoolError (nothing is left behind then)."""
        self._finished = True
        self._flush(self._commit_sync)

        def check(_: Any) -> Deferred | Failure | None:
            if self._error is not None:
                return self._cleanup().addCallback(lambda _: Failure(self._error))
            if self._sync_error is not None:
                return Failure(self._sync_error)
            return None

        d = self._chain.addCallback(check)
        d.addCallback(lambda _: self.queue_id)
        d.addErrback(_spool_failure)
        return d

    @property
    def stored(self) -> StoredMessage:
        """The committed message as the queue manager takes it (no re-read)."""
        return StoredMessage(self._envelope, QueueState.initial(self._envelope),
                             self._content_offset, self._written)

    def abort(self) -> Deferred:
        """Discard the message (refused, or the client went away)."""
        self._finished = True
        self._buffer = []
        return self._chain.addCallback(lambda _: self._cleanup())

    def _cleanup(self) -> Deferred:
        def remove() -> None:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass

        return self._spool.run(remove)
