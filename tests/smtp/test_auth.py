"""Tests for relaygw.smtp.auth: hashes, the users file, SASL PLAIN/LOGIN, Authenticator."""

from __future__ import annotations

import base64
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.threadpool import ThreadPool

from relaygw.smtp import auth
from relaygw.smtp.auth import (
    Authenticator,
    Challenge,
    Credentials,
    UsersFileError,
    hash_password,
    load_users,
    set_password,
    start_sasl,
    verify_password,
)
from relaygw.smtp.replies import Reply

# A cheap cost factor keeps the suite fast; the default one is exercised once below.
FAST = {"n": 2**4, "r": 8, "p": 1}


def b64(text: str | bytes) -> str:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


# ---------------------------------------------------------------------------
# hash_password / verify_password


def test_hash_format_with_default_parameters() -> None:
    stored = hash_password("correct horse")
    match = re.fullmatch(r"\$scrypt\$n=16384,r=8,p=1\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)", stored)
    assert match is not None
    assert len(base64.b64decode(match[1], validate=True)) == 16
    assert len(base64.b64decode(match[2], validate=True)) == 32
    assert verify_password("correct horse", stored) is True


def test_round_trip_and_wrong_password() -> None:
    stored = hash_password("s3cret ünïcode", **FAST)
    assert stored.startswith("$scrypt$n=16,r=8,p=1$")
    assert verify_password("s3cret ünïcode", stored) is True
    assert verify_password("s3cret unicode", stored) is False
    assert verify_password("", stored) is False


def test_salt_is_random() -> None:
    assert hash_password("same", **FAST) != hash_password("same", **FAST)


def test_lone_surrogate_password_is_false_not_an_error() -> None:
    assert verify_password("\ud800", hash_password("x", **FAST)) is False


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plaintext",
        "$2b$12$abcdefghijklmnopqrstuu",
        "$scrypt$n=16,r=8,p=1$",
        "$scrypt$n=16,r=8,p=1$$",
        "$scrypt$n=16,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==",
        "$scrypt$n=16,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA$" + "A" * 44,  # bad padding
        "$scrypt$n=16,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "!",
        "$scrypt$n=16,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$aGFzaA==",  # digest too short
        "$scrypt$n=15,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=",  # n not 2**k
        "$scrypt$n=1,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=",
        "$scrypt$n=2097152,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=",  # too costly
        "$scrypt$n=16,r=0,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=",
        "$scrypt$n=16,r=8,p=99$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=",
        "$scrypt$n=16,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=\n",
        " $scrypt$n=16,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "=",
    ],
)
def test_malformed_stored_hash_is_false(stored: str) -> None:
    assert auth._parse_stored(stored) is None  # rejected as malformed, not as a mismatch
    assert verify_password("anything", stored) is False


def test_well_formed_but_wrong_hash_is_false() -> None:
    stored = "$scrypt$n=16,r=8,p=1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "="
    assert auth._parse_stored(stored) is not None
    assert verify_password("x", stored) is False


@pytest.mark.parametrize("params", [{"n": 15}, {"n": 2**21}, {"r": 0}, {"p": 0}])
def test_hash_password_rejects_bad_parameters(params: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        hash_password("x", **params)


# ---------------------------------------------------------------------------
# load_users


def test_load_users(tmp_path: Path) -> None:
    alice, bob = hash_password("a", **FAST), hash_password("b", **FAST)
    path = tmp_path / "users"
    path.write_bytes(
        f"# relaygw users\n\nalice@example.test:{alice}\r\n  # indented comment\n"
        f"bob:{bob}\n\n".encode()
    )
    assert load_users(path) == {"alice@example.test": alice, "bob": bob}


def test_load_users_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# nobody yet\n")
    assert load_users(path) == {}


def test_load_users_reports_every_problem(tmp_path: Path) -> None:
    good = hash_password("x", **FAST)
    path = tmp_path / "users"
    path.write_bytes(
        b"\n".join(
            [
                f"alice:{good}".encode(),  # 1
                b"no separator here",  # 2
                f":{good}".encode(),  # 3
                f"{'u' * 256}:{good}".encode(),  # 4
                f"bad\tname:{good}".encode(),  # 5
                f"bell\x07:{good}".encode(),  # 6
                b"carol:$scrypt$n=16,r=8,p=1$bm90$bm90",  # 7
                b"dave:hunter2",  # 8
                f"alice:{good}".encode(),  # 9
                b"\xffname:x",  # 10
                f"{'u' * 255}:{good}".encode(),  # 11: exactly 255 is fine
            ]
        )
        + b"\n"
    )
    with pytest.raises(UsersFileError) as info:
        load_users(path)
    assert info.value.problems == [
        f"{path}: line 2: expected name:hash",
        f"{path}: line 3: empty user name",
        f"{path}: line 4: user name longer than 255 characters",
        f"{path}: line 5: user name contains spaces or control characters",
        f"{path}: line 6: user name contains spaces or control characters",
        f"{path}: line 7: not a valid $scrypt$ password hash",
        f"{path}: line 8: not a valid $scrypt$ password hash",
        f"{path}: line 9: duplicate user 'alice' (first on line 1)",
        f"{path}: line 10: not valid UTF-8",
    ]
    assert str(info.value) == "\n".join(info.value.problems)


def test_load_users_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent"
    with pytest.raises(UsersFileError) as info:
        load_users(path)
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


# ---------------------------------------------------------------------------
# set_password


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    # The file must be 0600 whatever the umask lets through.
    old = os.umask(0o000)
    try:
        yield
    finally:
        os.umask(old)


def test_set_password_creates_file_mode_0600(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "users"
    set_password(path, "alice", "pa55-word-alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = load_users(path)
    assert list(users) == ["alice"]
    assert verify_password("pa55-word-alice", users["alice"])
    assert b"pa55-word-alice" not in path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]  # no temp file left


def test_set_password_replaces_one_user_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "users"
    bob = hash_password("bob-pw", **FAST)
    alice_old = hash_password("old-pw", **FAST)
    before = f"# header comment\nbob:{bob}\n\nalice:{alice_old}\n# trailer\n"
    path.write_text(before)
    path.chmod(0o644)

    set_password(path, "alice", "new-pw-42")

    after = path.read_text()
    lines = after.splitlines()
    assert lines[:3] == ["# header comment", f"bob:{bob}", ""]
    assert lines[3].startswith("alice:$scrypt$") and lines[3] != f"alice:{alice_old}"
    assert lines[4:] == ["# trailer"]
    users = load_users(path)
    assert users["bob"] == bob
    assert verify_password("new-pw-42", users["alice"])
    assert not verify_password("old-pw", users["alice"])
    assert "new-pw-42" not in after
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the mode the file had


def test_set_password_keeps_the_files_mode(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "users"
    set_password(path, "alice", "pw-1")
    path.chmod(0o640)  # e.g. root:relaygw, readable by the daemon's group
    set_password(path, "bob", "pw-2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert list(load_users(path)) == ["alice", "bob"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_set_password_as_root_keeps_the_files_owner_and_group(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_password(path, "alice", "pw-1")
    os.chown(path, 65534, 65533)  # nobody, and a group root is not in
    set_password(path, "bob", "pw-2")
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65533, 0o600)
    assert list(load_users(path)) == ["alice", "bob"]


def test_set_password_refuses_what_would_change_the_owner(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "users"
    set_password(path, "alice", "pw-1")
    before = path.read_bytes()
    real_stat = Path.stat

    def owned_by_someone_else(self, *args, **kwargs):
        info = real_stat(self, *args, **kwargs)
        if self != path:
            return info
        fields = list(info)
        fields[stat.ST_UID] = info.st_uid + 1
        return os.stat_result(fields)

    def refused(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "stat", owned_by_someone_else)
    monkeypatch.setattr(os, "fchown", refused)
    with pytest.raises(UsersFileError) as info:
        set_password(path, "bob", "pw-2")
    uid, gid = real_stat(path).st_uid + 1, real_stat(path).st_gid
    assert info.value.problems == [
        f"{path}: cannot keep its owner {uid}:{gid} (run relaygw passwd as root or as that user)"]
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users"]


def test_set_password_appends_new_user(tmp_path: Path) -> None:
    path = tmp_path / "users"
    bob = hash_password("bob-pw", **FAST)
    path.write_text(f"bob:{bob}")  # no final newline
    set_password(path, "carol", "carol-pw")
    users = load_users(path)
    assert list(users) == ["bob", "carol"]
    assert users["bob"] == bob
    assert path.read_text().endswith("\n")


@pytest.mark.parametrize(
    "name", ["", "has space", "has:colon", "#comment-like", "ctl\x00", "x" * 256]
)
def test_set_password_rejects_bad_names(tmp_path: Path, name: str) -> None:
    path = tmp_path / "users"
    with pytest.raises(ValueError):
        set_password(path, name, "pw")
    assert not path.exists()


def test_set_password_refuses_to_rewrite_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("garbage line\n")
    with pytest.raises(UsersFileError) as info:
        set_password(path, "alice", "pw")
    assert info.value.problems == [f"{path}: line 1: expected name:hash"]
    assert path.read_text() == "garbage line\n"


# ---------------------------------------------------------------------------
# SASL

INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
CANNOT_DECODE = Reply(501, "5.5.2", "Cannot decode response")


def test_unknown_mechanism() -> None:
    assert start_sasl("CRAM-MD5", None) == (
        None,
        Reply(504, "5.5.4", "Unrecognized authentication type"),
    )


def test_plain_with_initial_response() -> None:
    mech, step = start_sasl("PLAIN", b64("\0alice\0pw with spaces"))
    assert mech is not None
    assert step == Credentials("alice", "pw with spaces")


def test_plain_mechanism_name_is_case_insensitive() -> None:
    assert start_sasl("plain", b64("\0alice\0pw"))[1] == Credentials("alice", "pw")


def test_plain_without_initial_response() -> None:
    mech, step = start_sasl("PLAIN", None)
    assert step == Challenge("")
    assert mech is not None
    assert mech.respond(b64("\0alice\0pw")) == Credentials("alice", "pw")
    assert mech.respond(b64("\0alice\0pw")) == Reply(503, "5.5.1", "Bad sequence of commands")


def test_plain_authzid_equal_to_authcid_is_accepted() -> None:
    assert start_sasl("PLAIN", b64("alice\0alice\0pw"))[1] == Credentials("alice", "pw")


def test_plain_authzid_mismatch() -> None:
    assert start_sasl("PLAIN", b64("root\0alice\0pw"))[1] == INVALID


def test_plain_cancel() -> None:
    mech, _ = start_sasl("PLAIN", None)
    assert mech is not None
    assert mech.respond("*") == CANCELLED


@pytest.mark.parametrize(
    "line",
    [
        "not base64!",
        "AGFsaWNlAHB3MQ",
        "AGFsaWNlAHB3MQ===",
        "AGFsaWNlAHB3MQ==AA",
        " AGFsaWNlAHB3MQ==",
        "ä",
        "=",
    ],
)
def test_plain_bad_base64(line: str) -> None:
    mech, _ = start_sasl("PLAIN", None)
    assert mech is not None
    assert mech.respond(line) == CANNOT_DECODE


def test_plain_bad_utf8() -> None:
    assert start_sasl("PLAIN", b64(b"\0al\xffice\0pw"))[1] == CANNOT_DECODE


@pytest.mark.parametrize(
    "message",
    [
        "",
        "alice",
        "\0alice",
        "\0alice\0",
        "\0\0pw",
        "\0alice\0pw\0extra",
        "\0al\rice\0pw",
        "\0al\nice\0pw",
    ],
)
def test_plain_malformed_message(message: str) -> None:
    assert start_sasl("PLAIN", b64(message))[1] == INVALID


def test_plain_initial_equals_means_empty() -> None:
    assert start_sasl("PLAIN", "=")[1] == INVALID


def test_login_flow() -> None:
    mech, step = start_sasl("LOGIN", None)
    assert step == Challenge("VXNlcm5hbWU6")
    assert mech is not None
    assert mech.respond(b64("alice")) == Challenge("UGFzc3dvcmQ6")
    assert mech.respond(b64("pw")) == Credentials("alice", "pw")
    assert mech.respond(b64("pw")) == Reply(503, "5.5.1", "Bad sequence of commands")


def test_login_initial_response_is_the_username() -> None:
    mech, step = start_sasl("login", b64("bob"))
    assert step == Challenge("UGFzc3dvcmQ6")
    assert mech is not None
    assert mech.respond(b64("pw")) == Credentials("bob", "pw")


@pytest.mark.parametrize("at_password", [False, True])
def test_login_cancel(at_password: bool) -> None:
    mech, _ = start_sasl("LOGIN", None)
    assert mech is not None
    if at_password:
        mech.respond(b64("alice"))
    assert mech.respond("*") == CANCELLED


def test_login_bad_base64_and_utf8() -> None:
    mech, _ = start_sasl("LOGIN", None)
    assert mech is not None
    assert mech.respond("@@@") == CANNOT_DECODE
    mech, _ = start_sasl("LOGIN", b64("alice"))
    assert mech is not None
    assert mech.respond(b64(b"\xc3")) == CANNOT_DECODE


@pytest.mark.parametrize("username", ["al\0ice", "al\rice", "al\nice", ""])
def test_login_bad_username(username: str) -> None:
    mech, _ = start_sasl("LOGIN", None)
    assert mech is not None
    assert mech.respond(b64(username)) == INVALID


def test_login_empty_password() -> None:
    mech, _ = start_sasl("LOGIN", b64("alice"))
    assert mech is not None
    assert mech.respond("") == INVALID


def test_credentials_repr_hides_password() -> None:
    assert "hunter2" not in repr(Credentials("alice", "hunter2"))


# ---------------------------------------------------------------------------
# Authenticator


@pytest.fixture
def threadpool() -> Iterator[ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth")
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def reactor():
    # The global reactor, which pytest-twisted installed before any test ran.
    from twisted.internet import reactor

    return reactor


@pytest_twisted.inlineCallbacks
def test_authenticator_check(threadpool: ThreadPool, reactor, monkeypatch) -> None:
    users = {"alice": hash_password("alice-pw", **FAST), "bob": hash_password("bob-pw", **FAST)}
    calls: list[tuple[str, bool]] = []
    real_verify = auth.verify_password

    def recording_verify(password: str, stored: str) -> bool:
        # Records whether scrypt ran off the reactor (main) thread.
        on_main = threading.current_thread() is threading.main_thread()
        calls.append((stored, on_main))
        return real_verify(password, stored)

    monkeypatch.setattr(auth, "verify_password", recording_verify)
    authenticator = Authenticator(users, threadpool, reactor)
    assert authenticator.has_users is True

    assert (yield authenticator.check(Credentials("alice", "alice-pw"))) is True
    assert (yield authenticator.check(Credentials("alice", "bob-pw"))) is False
    assert (yield authenticator.check(Credentials("mallory", "alice-pw"))) is False

    assert [on_main for _, on_main in calls] == [False, False, False]
    assert calls[0][0] == users["alice"]
    # An unknown user still pays for one scrypt, at the same cost as a real user.
    dummy = calls[2][0]
    assert dummy not in users.values()
    assert dummy.startswith("$scrypt$n=16,r=8,p=1$")


@pytest_twisted.inlineCallbacks
def test_authenticator_without_users(threadpool: ThreadPool, reactor) -> None:
    authenticator = Authenticator({}, threadpool, reactor)
    assert authenticator.has_users is False
    assert (yield authenticator.check(Credentials("alice", "pw"))) is False


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_twisted.inlineCallbacks
def test_authenticator_rereads_the_users_file_when_it_changes(
        tmp_path: Path, threadpool: ThreadPool, reactor) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('alice-pw', **FAST)}\n")
    clock = FakeClock()
    authenticator = Authenticator(load_users(path), threadpool, reactor, source=path,
                                  clock=clock)
    assert (yield authenticator.check(Credentials("alice", "alice-pw"))) is True
    # A user added as `relaygw passwd` adds one: a new file renamed into place. Less
    # than a second after the last look, the failed check looks again at once.
    set_password(path, "bob", "bob-pw")
    clock.now += 0.5
    assert (yield authenticator.check(Credentials("bob", "bob-pw"))) is True
    assert (yield authenticator.check(Credentials("alice", "alice-pw"))) is True
    assert (yield authenticator.check(Credentials("bob", "wrong"))) is False

    # A broken file keeps the users read before; once fixed, it is read again.
    good = path.read_text()
    path.write_text(good + "garbage\n")
    clock.now += 1
    with capturedLogs() as broken:
        assert (yield authenticator.check(Credentials("bob", "bob-pw"))) is True
    path.write_text(f"carol:{hash_password('carol-pw', **FAST)}\n")
    clock.now += 1
    with capturedLogs() as fixed:
        assert (yield authenticator.check(Credentials("carol", "carol-pw"))) is True
    assert (yield authenticator.check(Credentials("bob", "bob-pw"))) is False

    # A removed file keeps them too.
    path.unlink()
    clock.now += 1
    with capturedLogs() as removed:
        assert (yield authenticator.check(Credentials("carol", "carol-pw"))) is True
    assert [(e["log_level"], formatEvent(e)) for e in broken + fixed + removed] == [
        (LogLevel.warn, f"auth: cannot re-read {path}; keeping the 2 user(s) read before: "
                        f"{path}: line 3: expected name:hash"),
        (LogLevel.info, f"auth: {path} re-read: 1 user(s)"),
        (LogLevel.warn, f"auth: cannot look at {path}: No such file or directory; keeping "
                        "the 1 user(s) read before"),
    ]


@pytest_twisted.inlineCallbacks
def test_authenticator_stats_the_file_at_most_once_a_second(
        tmp_path: Path, threadpool: ThreadPool, reactor, monkeypatch) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('alice-pw', **FAST)}\n")
    clock = FakeClock()
    authenticator = Authenticator(load_users(path), threadpool, reactor, source=path,
                                  clock=clock)
    looks: list[bool] = []
    real_stat = os.stat

    def recording_stat(target, *args, **kwargs):
        if target == path:
            looks.append(threading.current_thread() is threading.main_thread())
        return real_stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", recording_stat)
    for _ in range(5):
        assert (yield authenticator.check(Credentials("alice", "alice-pw"))) is True
    clock.now += 1
    assert (yield authenticator.check(Credentials("alice", "alice-pw"))) is True
    assert looks == [False, False]  # twice, never on the reactor thread
    assert (yield authenticator.check(Credentials("alice", "wrong"))) is False
    assert looks == [False, False, False]  # a failure looks again, at once


@pytest_twisted.inlineCallbacks
def test_an_empty_users_file_offers_auth_once_a_user_is_added(
        tmp_path: Path, threadpool: ThreadPool, reactor) -> None:
    path = tmp_path / "users"
    path.write_text("# no users yet\n")
    authenticator = Authenticator(load_users(path), threadpool, reactor, source=path,
                                  clock=FakeClock())
    set_password(path, "alice", "alice-pw")
    assert authenticator.has_users is False  # looks in the pool; the next EHLO sees it
    for _ in range(500):  # the look's answer comes back through the reactor
        if authenticator.has_users:
            break
        yield deferLater(reactor, 0.01, lambda: None)
    assert authenticator.has_users is True
    assert (yield authenticator.check(Credentials("alice", "alice-pw"))) is True


def test_authenticator_copies_users(threadpool: ThreadPool, reactor) -> None:
    users = {"alice": hash_password("pw", **FAST)}
    authenticator = Authenticator(users, threadpool, reactor)
    users.clear()
    assert authenticator.has_users is True
