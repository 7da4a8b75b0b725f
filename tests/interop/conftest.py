"""Interop fixtures: the real daemon (from the integration tests) and a private Postfix."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.integration.conftest import ca, capture, cli, daemon, free_port  # noqa: F401
from tests.support.postfix import PostfixInstance, make_directory, unavailable_reason

__all__ = ["ca", "capture", "cli", "daemon", "postfix", "require_tool", "without_dns"]


def require_tool(name: str, package: str) -> str:
    """The path of a Debian-packaged command, or skip the test saying which package."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package {package})")
    return path


_RESOLV = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


def without_dns(argv: list[str], directory: Path) -> list[str]:
    """``argv`` in a private mount namespace whose /etc/resolv.conf names only 127.0.0.1.

    A belt to the tools' own no-DNS braces: a lookup they make anyway (testssl resolves
    "invalid." to probe openssl unless NXCONNECT is set) fails on loopback instead of
    reaching the system's name server. Where mount namespaces are not allowed (not root,
    no unshare(1), a locked-down container), ``argv`` is returned unchanged.
    """
    if not _namespaces_work():
        return list(argv)
    resolv = directory / "resolv.conf"
    resolv.write_text(_RESOLV)
    return [*_wrapper(resolv), *argv]


def _wrapper(resolv: Path) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv)]


@functools.cache
def _namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None \
            or not os.path.exists("/etc/resolv.conf"):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        resolv = Path(tmp) / "resolv.conf"
        resolv.write_text(_RESOLV)
        probe = subprocess.run([*_wrapper(resolv), "grep", "-qx", "nameserver 127.0.0.1",
                                "/etc/resolv.conf"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.fixture
def postfix():
    """Make and start private Postfix instances; every one is stopped and removed after."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    instances: list[PostfixInstance] = []
    directories = []

    def make(relayhost: str | None = None, **kw) -> PostfixInstance:
        directory = make_directory()
        directories.append(directory)
        instance = PostfixInstance(directory / "postfix", kw.pop("smtpd_port", free_port()),
                                   relayhost, **kw)
        instances.append(instance)
        return instance.start()

    yield make
    errors = []
    for instance in instances:
        try:
            instance.stop()
        except Exception as e:  # stop them all, then complain
            errors.append(e)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    assert not errors, errors
