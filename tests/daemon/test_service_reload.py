"""RelayService.reload() under a memory reactor, on a service that was never started.

Starting the service would start its thread pools (real threads) and recover the
spool, so these tests build it and reload it only: listeners of a service that is
not running are not bound (the memory reactor records no listenTCP), and the
reload's file reading runs at once (``run_blocking=maybeDeferred``).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from relaygw.config import Config, ListenerConfig, load_config
from relaygw.daemon.service import RelayService
from relaygw.daemon.wiring import WorkerSetup


def write_config(path: Path, listeners: tuple[str, ...] = ("127.0.0.1:0", "127.0.0.2:0"),
                 server: str = "", spool: str = "spool", workers: int = 0) -> Path:
    text = (f'[server]\nhostname = "relay.test"\nspool_dir = "{spool}"\n'
            f"workers = {workers}\n{server}"
            '[dns]\nnameservers = ["127.0.0.1:9"]\n'
            '[[routes]]\naction = "maildir"\nmaildir = "mail/{domain}/{localpart}"\n')
    for address in listeners:
        text += f'[[listeners]]\naddress = "{address}"\ntls = "none"\nauth = "none"\n'
    path.write_text(text)
    return path


def listener(address: str) -> ListenerConfig:
    host, port = address.rsplit(":", 1)
    return ListenerConfig(address, host, int(port), tls="none", require_tls=False, auth="none")


def fired(d: Deferred) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the reload has not finished"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


class Fixture:
    def __init__(self, tmp_path: Path, **kw: Any) -> None:
        self.path = write_config(tmp_path / "relaygw.toml", **kw)
        self.reactor = MemoryReactorClock()
        self.old = load_config(self.path)
        self.service = RelayService(self.old, self.reactor,
                                    run_blocking=lambda fn: maybeDeferred(fn))

    def reload(self) -> list[str]:
        return fired(self.service.reload())


@pytest.fixture
def relay(tmp_path) -> Fixture:
    return Fixture(tmp_path)


def test_a_valid_edited_file_is_applied(relay):
    kept, dropped, added = listener("127.0.0.1:0"), listener("127.0.0.2:0"), \
        listener("127.0.0.3:0")
    assert set(relay.service.by_listener) == {kept, dropped}
    kept_service = relay.service.by_listener[kept]
    dropped_service = relay.service.by_listener[dropped]
    write_config(relay.path, ("127.0.0.1:0", "127.0.0.3:0"),
                 server="max_connections = 7\nmax_connections_per_client = 3\n"
                        "max_message_size = 4096\n")
    with capturedLogs() as events:
        assert relay.reload() == []
    new = relay.service.holder()
    assert isinstance(new, Config) and new is not relay.old
    assert new == load_config(relay.path)
    assert (new.server.max_connections, new.server.max_message_size) == (7, 4096)
    # The listener that stays keeps its service; new sessions on it get the new settings.
    assert set(relay.service.by_listener) == {kept, added}
    assert relay.service.by_listener[kept] is kept_service
    assert kept_service.sessions.settings.max_message_size == 4096
    assert relay.service.by_listener[added].parent is relay.service.listeners
    assert dropped_service.parent is None
    assert list(relay.service.listeners) == [kept_service, relay.service.by_listener[added]]
    assert (relay.service.counter.max_total, relay.service.counter.max_per_client) == (7, 3)
    assert relay.reactor.tcpServers == []  # not running: nothing bound
    messages = [formatEvent(e) for e in events]
    assert f"reload: {relay.path} applied" in messages
    assert "stopped listening on 127.0.0.2:0" in messages


def test_reloading_an_unchanged_file_keeps_every_listener(relay):
    before = dict(relay.service.by_listener)
    assert relay.reload() == []
    assert relay.service.by_listener == before
    assert all(relay.service.by_listener[lc] is svc for lc, svc in before.items())
    assert relay.service.holder() == relay.old


@pytest.mark.parametrize("server,problems", [
    ("max_connections = 0\n", ["server.max_connections: must be >= 1 (got 0)"]),
    ("max_conections = 5\n", ["server.max_conections: unknown key"]),
    ('max_connections = 0\nbare_newlines = "sometimes"\n',
     ["server.max_connections: must be >= 1 (got 0)",
      'server.bare_newlines: must be one of reject, normalize (got "sometimes")']),
])
def test_an_invalid_file_is_refused_and_the_old_config_stays(relay, server, problems):
    before = dict(relay.service.by_listener)
    write_config(relay.path, ("127.0.0.3:0",), server=server)
    with capturedLogs() as events:
        assert relay.reload() == problems
    assert relay.service.holder() is relay.old
    assert relay.service.by_listener == before
    assert (relay.service.counter.max_total, relay.service.counter.max_per_client) == (
        relay.old.server.max_connections, relay.old.server.max_connections_per_client)
    messages = [formatEvent(e) for e in events]
    assert [m for m in messages if m.startswith("reload")] == [
        f"reload refused, the old configuration stays: {p}" for p in problems]


def test_a_file_that_is_not_toml_is_refused_naming_the_file(relay):
    relay.path.write_text("[server\n")
    (problem,) = relay.reload()
    assert problem.startswith(f"{relay.path}: ")
    assert relay.service.holder() is relay.old


def test_changing_the_spool_dir_is_refused(relay):
    before = dict(relay.service.by_listener)
    write_config(relay.path, ("127.0.0.3:0",), spool="elsewhere")
    assert relay.reload() == ["server.spool_dir: cannot change while running; restart"]
    assert relay.service.holder() is relay.old
    assert relay.service.by_listener == before


@pytest.mark.parametrize("before,after", [(0, 2), (2, 0)])
def test_changing_workers_between_0_and_more_is_refused(tmp_path, before, after):
    relay = Fixture(tmp_path, workers=before)  # worker mode: constructing starts no process
    assert (relay.service.pool is not None) == bool(before)
    write_config(relay.path, workers=after)
    assert relay.reload() == ["server.workers: cannot change between 0 and more while "
                              "running; restart"]
    assert relay.service.holder() is relay.old


def test_changing_the_number_of_workers_is_applied(tmp_path):
    relay = Fixture(tmp_path, workers=2)
    write_config(relay.path, workers=3)
    assert relay.reload() == []
    new = relay.service.holder()
    assert new.server.workers == 3
    # Workers started from now on get the configuration in force, not the file.
    assert pickle.loads(relay.service.pool.snapshot) == WorkerSetup(new, None, None)
