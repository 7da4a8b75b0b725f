"""SMTP AUTH for the server: the users file, scrypt password hashes, SASL PLAIN/LOGIN.

The SASL mechanisms are pure state machines (no Twisted, no I/O) so the server protocol
only moves lines between the client and a mechanism; ``Authenticator`` is the one part
that touches Twisted, to keep scrypt off the reactor thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
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
    """Add or replace one user, keeping every other line; rewrite the file atomically."""
    problem = _name_problem(name)
    if problem is None and name.startswith("#"):
        problem = "user name starts with '#' (it would read as a comment)"
    if problem is not None:
        raise ValueError(problem)
    if path.exists():
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
    write_atomically(path, b"".join(line + b"\n" for line in lines), mode=0o600)


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


class Authenticator:
    """Checks credentials against the users file without blocking the reactor."""

    def __init__(
        self, users: Mapping[str, str], threadpool: ThreadPool, reactor: IReactorFromThreads
    ) -> None:
        self._users = MappingProxyType(dict(users))
        self._dummy = _dummy_hash(self._users)
        self._threadpool = threadpool
        self._reactor = reactor

    @property
    def has_users(self) -> bool:
        return bool(self._users)

    def check(self, credentials: Credentials) -> Deferred[bool]:
        # scrypt takes tens of milliseconds: run it in the pool, never on the reactor.
        return deferToThreadPool(
            self._reactor,
            self._threadpool,
            self._verify,
            credentials.username,
            credentials.password,
        )

    def _verify(self, username: str, password: str) -> bool:
        stored = self._users.get(username)
        if stored is None:
            # Same work for an unknown user, so timing does not reveal which names exist.
            verify_password(password, self._dummy)
            return False
        return verify_password(password, stored)
