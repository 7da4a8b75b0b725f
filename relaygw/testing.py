"""Public fakes for tests of relaygw and of code built on it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from relaygw.queue.store import Spool


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS and pause/resume calls."""

    tls_options: Any = None

    def startTLS(self, contextFactory: Any) -> None:  # noqa: N802, N803 - Twisted's names
        self.tls_options = contextFactory


class SynchronousSpool(Spool):
    """A real on-disk spool whose disk work runs at once on the calling thread."""

    def __init__(self, directory: Any) -> None:
        super().__init__(directory, reactor=None, threadpool=None)

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        return maybeDeferred(fn, *args)


class FakeAuthenticator:
    """Checks credentials against plain-text passwords, at once."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self.users = dict(users)
        self.checked: list[str] = []

    @property
    def has_users(self) -> bool:
        return bool(self.users)

    def check(self, credentials: Any) -> Deferred:
        self.checked.append(credentials.username)
        return succeed(self.users.get(credentials.username) == credentials.password)
