"""SMTP AUTH for the server: the users file, scrypt password hashes, SASL PLAIN/LOGIN.

The SASL mechanisms are pure state machines (no Twisted, no I/O) so the server protocol
only moves lines between the client and a mechanism; ``Authenticator`` is the one part
that touches Twisted, to keep scrypt, and the re-reading of a changed users file, off the
reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relaygw.fileio import write_atomically
from relaygw.smtp.replies import BAD_SEQUENCE, Reply

__all__ = [
    "MECHANISMS",
    "Authenticator",
    "Challenge",
    "Credentials",
    "SaslMechanism",
    "UsersFileError",
    "hash_password",
    "load_users",
    "set_password",
    "start_sasl",
    "verify_password",
]

# ---------------------------------------------------------------------------
# Password hashes

_SALT_BYTES = 16
_HASH_BYTES = 32
# Upper bounds on parameters read from a stored hash: a hand-edited users file must
# not be able to make one verification allocate gigabytes or run for minutes.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
_STORED_RE = re.compile(
    r"\$scrypt\$n=(?P<n>[0-9]{1,8}),r=(?P<r>[0-9]{1,3}),p=(?P<p>[0-9]{1,3})"
    r"\$(?P<salt>[A-Za-z0-9+/=]+)\$(?P<hash>[A-Za-z0-9+/=]+)"
)


@dataclass(frozen=True)
class _ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _check_params(n: int, r: int, p: int) -> None:
    if n < 2 or n > _MAX_N or n & (n - 1):
        raise ValueError(f"scrypt n must be a power of two between 2 and {_MAX_N}")
    if not 1 <= r <= _MAX_R:
        raise ValueError(f"scrypt r must be between 1 and {_MAX_R}")
    if not 1 <= p <= _MAX_P:
        raise ValueError(f"scrypt p must be between 1 and {_MAX_P}")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    # OpenSSL refuses work above maxmem (32 MiB by default), so size it to the parameters:
    # 128*r*(n+2) for V plus 128*r*p for B, with slack.
    maxmem = 128 * r * (n + 2 + p) + 1024 * 1024
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _parse_stored(stored: str) -> _ScryptHash | None:
    match = _STORED_RE.fullmatch(stored)
    if match is None:
        return None
    n, r, p = int(match["n"]), int(match["r"]), int(match["p"])
    try:
        _check_params(n, r, p)
        salt = binascii.a2b_base64(match["salt"], strict_mode=True)
        digest = binascii.a2b_base64(match["hash"], strict_mode=True)
    except (ValueError, binascii.Error):
        return None
    if not salt or not 16 <= len(digest) <= 64:
        return None
    return _ScryptHash(n, r, p, salt, digest)


def hash_password(password: str, *, n: int = 2**14, r: int = 8, p: int = 1) -> str:
    """Return ``$scrypt$n=N,r=R,p=P$<salt>$<hash>`` (standard base64, padded)."""
    _check_params(n, r, p)
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password.encode("utf-8"), salt, n, r, p, _HASH_BYTES)
    return f"$scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False for anything malformed."""
    parsed = _parse_stored(stored)
    if parsed is None:
        return False
    try:
        secret = password.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot have been hashed
        return False
    computed = _scrypt(secret, parsed.salt, parsed.n, parsed.r, parsed.p, len(parsed.digest))
    return hmac.compare_digest(computed, parsed.digest)


# ---------------------------------------------------------------------------
# Users file


class UsersFileError(Exception):
    """The users file cannot be used; ``problems`` holds one "PATH: line N: ..." each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_MAX_NAME = 255


def _name_problem(name: str) -> str | None:
    if not name:
        return "empty user name"
    if len(name) > _MAX_NAME:
        return f"user name longer than {_MAX_NAME} characters"
    if ":" in name:
        return "user name contains ':'"
    if not name.isprintable() or any(ch.isspace() for ch in name):
        return "user name contains spaces or control characters"
    return None


@dataclass(frozen=True)
class _Entry:
    line_no: int
    name: str
    stored: str


def _parse_users(path: Path, raw: bytes) -> tuple[list[_Entry], list[str]]:
    entries: list[_Entry] = []
    problems: list[str] = []
    first_seen: dict[str, int] = {}
    for line_no, raw_line in enumerate(raw.splitlines(), start=1):
        where = f"{path}: line {line_no}"
        try:
            line = raw_line.decode("utf-8").strip()
        except UnicodeDecodeError:
            problems.append(f"{where}: not valid UTF-8")
            continue
        if not line or line.startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep:
            problems.append(f"{where}: expected name:hash")
            continue
        name_problem = _name_problem(name)
        if name_problem is not None:
            problems.append(f"{where}: {name_problem}")
            continue
        if _parse_stored(stored) is None:
            problems.append(f"{where}: not a valid $scrypt$ password hash")
            continue
        if name in first_seen:
            problems.append(f"{where}: duplicate user {name!r} (first on line {first_seen[name]})")
            continue
        first_seen[name] = line_no
        entries.append(_Entry(line_no, name, stored))
    return entries, problems


def _read_users_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsersFileError([f"{path}: cannot read: {e.strerror or e}"]) from e


def load_users(path: Path) -> dict[str, str]:
    """Read ``name:$scrypt$...`` lines into {name: stored hash}; raise on any problem."""
    entries, problems = _parse_users(path, _read_users_file(path))
    if problems:
        raise UsersFileError(problems)
    return {entry.name: entry.stored for entry in entries}


def parse_users(path: Path, raw: bytes) -> dict[str, str]:
    """``load_users`` for the bytes of ``path``, read by the caller (while privileged)."""
    entries, problems = _parse_users(path, raw)
    if problems:
        raise UsersFileError(problems)
    return {entry.name: entry.stored for entry in entries}


def set_password(path: Path, name: str, password: str) -> None:
    """Add or replace one user, keeping every other line; rewrite the file atomically.

    An existing file keeps its owner, group and mode (the daemon's user must still be able
    to read it); a new one is created with mode 0600, owned by whoever runs this.
    """
    problem = _name_problem(name)
    if problem is None and name.startswith("#"):
        problem = "user name starts with '#' (it would read as a comment)"
    if problem is not None:
        raise ValueError(problem)
    mode, owner = 0o600, None
    if path.exists():
        info = path.stat()
        mode, owner = stat.S_IMODE(info.st_mode), (info.st_uid, info.st_gid)
        raw = _read_users_file(path)
        entries, problems = _parse_users(path, raw)
        if problems:
            # Rewriting a file we cannot fully parse could silently drop users.
            raise UsersFileError(problems)
        lines = raw.splitlines()
    else:
        entries, lines = [], []
    new_line = f"{name}:{hash_password(password)}".encode()
    replace_at = next((e.line_no for e in entries if e.name == name), None)
    if replace_at is None:
        lines.append(new_line)
    else:
        lines[replace_at - 1] = new_line
    try:
        write_atomically(path, b"".join(line + b"\n" for line in lines), mode=mode,
                         owner=owner)
    except PermissionError as e:
        if e.errno != errno.EPERM or owner is None:
            raise
        # Only root may give a file away: refuse rather than leave one the daemon's user
        # may no longer read.
        raise UsersFileError([f"{path}: cannot keep its owner {owner[0]}:{owner[1]} "
                              "(run relaygw passwd as root or as that user)"]) from e


# ---------------------------------------------------------------------------
# SASL (server side)

MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN")

_INVALID_CREDENTIALS = Reply(535, "5.7.8", "Authentication credentials invalid")
_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
_CANNOT_DECODE = Reply(501, "5.5.2", "Cannot decode response")
_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")

_USERNAME_PROMPT = _b64(b"Username:")
_PASSWORD_PROMPT = _b64(b"Password:")


@dataclass(frozen=True)
class Challenge:
    """Send ``334 <text>`` and feed the client's next line to ``respond``."""

    text: str


@dataclass(frozen=True)
class Credentials:
    """What the client claimed; verify with ``Authenticator.check``."""

    username: str
    password: str = field(repr=False)  # keeps secrets out of logs and tracebacks


Step = Challenge | Credentials | Reply


class SaslMechanism(Protocol):
    def start(self, initial: str | None) -> Step: ...

    def respond(self, line: str) -> Step: ...


class _UndecodableError(Exception):
    pass


def _decode(text: str) -> str:
    """Strict base64 of UTF-8 text, as RFC 4954 requires of every client response."""
    try:
        return binascii.a2b_base64(text.encode("ascii"), strict_mode=True).decode("utf-8")
    except (UnicodeError, binascii.Error) as e:
        raise _UndecodableError from e


def _bad_username(name: str) -> bool:
    # Such names cannot exist in the users file, and NUL/CR/LF would corrupt log lines.
    return not name or any(ch in name for ch in "\0\r\n")


class PlainMechanism:
    """RFC 4616: one message ``authzid NUL authcid NUL passwd``."""

    def __init__(self) -> None:
        self._done = False

    def start(self, initial: str | None) -> Step:
        if initial is None:
            return Challenge("")
        return self._message("" if initial == "=" else initial)

    def respond(self, line: str) -> Step:
        if self._done:
            return BAD_SEQUENCE
        if line == "*":
            self._done = True
            return _CANCELLED
        return self._message(line)

    def _message(self, encoded: str) -> Step:
        self._done = True
        try:
            message = _decode(encoded)
        except _UndecodableError:
            return _CANNOT_DECODE
        parts = message.split("\0")
        if len(parts) != 3:
            return _INVALID_CREDENTIALS
        authzid, authcid, password = parts
        if _bad_username(authcid) or not password:
            return _INVALID_CREDENTIALS
        # relaygw has no proxy authorization: acting as someone else is never allowed.
        if authzid not in ("", authcid):
            return _INVALID_CREDENTIALS
        return Credentials(authcid, password)


class LoginMechanism:
    """The obsolete but ubiquitous LOGIN: username and password, one prompt each."""

    def __init__(self) -> None:
        self._username: str | None = None
        self._done = False

    def start(self, initial: str | None) -> Step:
        if initial is None:
            return Challenge(_USERNAME_PROMPT)
        return self._got_username("" if initial == "=" else initial)

    def respond(self, line: str) -> Step:
        if self._done:
            return BAD_SEQUENCE
        if line == "*":
            self._done = True
            return _CANCELLED
        if self._username is None:
            return self._got_username(line)
        return self._got_password(self._username, line)

    def _got_username(self, encoded: str) -> Step:
        try:
            username = _decode(encoded)
        except _UndecodableError:
            self._done = True
            return _CANNOT_DECODE
        if _bad_username(username):
            self._done = True
            return _INVALID_CREDENTIALS
        self._username = username
        return Challenge(_PASSWORD_PROMPT)

    def _got_password(self, username: str, encoded: str) -> Step:
        self._done = True
        try:
            password = _decode(encoded)
        except _UndecodableError:
            return _CANNOT_DECODE
        if not password or "\0" in password:  # same rule as PLAIN's passwd
            return _INVALID_CREDENTIALS
        return Credentials(username, password)


def start_sasl(
    mechanism_name: str, initial: str | None
) -> tuple[SaslMechanism | None, Challenge | Credentials | Reply]:
    """Begin ``AUTH <mechanism_name> [initial]``; ``initial`` "=" is an empty response."""
    mechanism: SaslMechanism
    name = mechanism_name.upper()  # SASL mechanism names are case-insensitive
    if name == "PLAIN":
        mechanism = PlainMechanism()
    elif name == "LOGIN":
        mechanism = LoginMechanism()
    else:
        return None, _UNKNOWN_MECHANISM
    return mechanism, mechanism.start(initial)


# ---------------------------------------------------------------------------
# Verification


def _dummy_hash(users: Mapping[str, str]) -> str:
    """A well-formed hash nobody's password matches, as costly as a real user's.

    The digest is random bytes rather than scrypt output, so building it costs nothing.
    """
    params = [_parse_stored(stored) for stored in users.values()]
    like = max((h for h in params if h is not None), key=lambda h: h.n * h.r * h.p, default=None)
    n, r, p = (like.n, like.r, like.p) if like else (2**14, 8, 1)
    salt, digest = secrets.token_bytes(_SALT_BYTES), secrets.token_bytes(_HASH_BYTES)
    return f"$scrypt$n={n},r={r},p={p}${_b64(salt)}${_b64(digest)}"


RECHECK_INTERVAL = 1.0  # seconds: the users file is looked at (stat) at most this often

log = Logger(namespace="relaygw.smtp.auth")


@dataclass(frozen=True)
class _Note:
    """A log line about the users file, made in a pool thread, logged by the reactor's."""

    warning: bool
    text: str


def _log_note(note: _Note | None) -> None:
    if note is not None:
        (log.warn if note.warning else log.info)("{text}", text=note.text)


class Authenticator:
    """Checks credentials against the users file without blocking the reactor.

    With ``source`` (the users file), a check first looks whether the file changed (its
    inode, size, mtime or ctime; at most once every ``RECHECK_INTERVAL`` seconds, and again
    after any failed check) and then re-reads it, all in the pool's thread, so users set
    with ``relaygw passwd`` work without a reload. A changed file that cannot be read or
    parsed leaves the users read before in force, with a warning; it is tried again once it
    changes again.
    """

    def __init__(
        self, users: Mapping[str, str], threadpool: ThreadPool, reactor: IReactorFromThreads,
        *, source: Path | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._users = MappingProxyType(dict(users))
        self._dummy = _dummy_hash(self._users)
        self._threadpool = threadpool
        self._reactor = reactor
        self._source = source
        self._clock = clock
        self._lock = threading.Lock()  # one look at the file at a time; pool threads share it
        self._checked_at = -RECHECK_INTERVAL
        # What the file looked like when ``_users`` came from it; None: not known yet, so the
        # first look re-reads it (the users given may have been read a while before).
        self._signature: tuple[int, ...] | None = None
        self._looking = False

    @property
    def has_users(self) -> bool:
        if not self._users and self._source is not None:
            # AUTH is not offered while there are no users, so no check would ever look at
            # the file: look now, in the pool; the next EHLO sees the outcome.
            self._look_soon()
        return bool(self._users)

    def check(self, credentials: Credentials) -> Deferred[bool]:
        # scrypt takes tens of milliseconds: run it in the pool, never on the reactor.
        d = deferToThreadPool(
            self._reactor,
            self._threadpool,
            self._refresh_and_verify,
            credentials.username,
            credentials.password,
        )
        return d.addCallback(self._report)

    # -- in the pool's threads ---------------------------------------------------------

    def _refresh_and_verify(self, username: str, password: str) -> tuple[bool, _Note | None]:
        note = self._refresh()
        ok = self._verify(username, password)
        if not ok and note is None:
            # A user added, or a password changed, less than a second ago must work at
            # once: look again. A failure has already paid for a scrypt, a stat is nothing.
            before = self._users
            note = self._refresh(force=True)
            if self._users is not before:
                ok = self._verify(username, password)
        return ok, note

    def _refresh(self, force: bool = False) -> _Note | None:
        """Re-read the users file if it changed; what to log about it (the reactor thread
        logs it: log observers write files and are not made for threads), or None."""
        source = self._source
        if source is None:
            return None
        with self._lock:
            now = self._clock()
            if now - self._checked_at < RECHECK_INTERVAL and not force:
                return None
            self._checked_at = now
            try:
                info = os.stat(source)
            except OSError as e:
                signature: tuple[int, ...] = (-1, e.errno or 0)
                if signature == self._signature:
                    return None
                self._signature = signature
                return _Note(True, f"auth: cannot look at {source}: {e.strerror or e}; "
                             f"keeping the {len(self._users)} user(s) read before")
            signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                         info.st_ctime_ns)
            if signature == self._signature:
                return None
            first = self._signature is None
            self._signature = signature
            try:
                users = load_users(source)
            except UsersFileError as e:
                return _Note(True, f"auth: cannot re-read {source}; keeping the "
                             f"{len(self._users)} user(s) read before: "
                             + "; ".join(e.problems))
            if first and users == dict(self._users):
                return None
            self._users = MappingProxyType(users)
            self._dummy = _dummy_hash(self._users)
            return _Note(False, f"auth: {source} re-read: {len(users)} user(s)")

    # -- on the reactor thread ---------------------------------------------------------

    def _report(self, result: tuple[bool, _Note | None]) -> bool:
        ok, change = result
        _log_note(change)
        return ok

    def _look_soon(self) -> None:
        if self._looking or self._clock() - self._checked_at < RECHECK_INTERVAL:
            return
        self._looking = True

        def done(result: _Note | Failure | None) -> None:
            self._looking = False
            if isinstance(result, Failure):
                log.failure("auth: cannot look at the users file", result)
            else:
                _log_note(result)

        deferToThreadPool(self._reactor, self._threadpool, self._refresh).addBoth(done)

    def _verify(self, username: str, password: str) -> bool:
        stored = self._users.get(username)
        if stored is None:
            # Same work for an unknown user, so timing does not reveal which names exist.
            verify_password(password, self._dummy)
            return False
        return verify_password(password, stored)
