"""Public fakes for tests of relaygw and of code built on it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relaygw.queue.store import Spool
from relaygw.smtp.auth import Credentials
from relaygw.smtp.transport import TLSOptions

T = TypeVar("T")


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS, pause/resume and the TCP options."""

    tls_options: TLSOptions | None = None
    no_delay = False
    keep_alive = False
    write_closed = False

    def startTLS(self, contextFactory: TLSOptions) -> None:  # noqa: N802, N803 - Twisted's names
        self.tls_options = contextFactory

    # The rest of ITCPTransport, which ITLSTransport extends.

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keep_alive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keep_alive = enabled


class SynchronousSpool(Spool):
    """A real on-disk spool whose disk work runs at once on the calling thread."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, reactor=None, threadpool=None)

    def run(self, fn: Callable[..., T], *args: object) -> Deferred[T]:
        return maybeDeferred(fn, *args)


class FakeAuthenticator:
    """Checks credentials against plain-text passwords, at once."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)
        self.checked: list[str] = []

    @property
    def has_users(self) -> bool:
        return bool(self.users)

    def check(self, credentials: Credentials) -> Deferred[bool]:
        self.checked.append(credentials.username)
        return succeed(self.users.get(credentials.username) == credentials.password)
