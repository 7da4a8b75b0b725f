"""Waiting on a condition in tests that drive real processes and sockets.

``wait_until`` fails the test when the condition never holds, so a call needs no
``assert`` to check something. For something that may legitimately not happen,
say so: ``poll`` returns None when the time is up and the caller decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_SHOWN = 2000  # characters of the last value and the detail shown in a failure


def poll(predicate: Callable[[], T], timeout: float = 20.0,
         interval: float = 0.05) -> T | None:
    """The first truthy value of ``predicate()`` within ``timeout`` seconds, or None if
    there was none: for something that may not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def wait_until(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05,
               what: str | None = None, detail: Callable[[], Any] | None = None) -> T:
    """The first truthy value of ``predicate()``, polled every ``interval`` seconds.

    Raises AssertionError naming ``what`` was waited for (by default the predicate's
    repr) and the last value when ``timeout`` seconds pass without one; ``detail``, if
    given, is called then and its value added (say, ``daemon.logs``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    message = (f"timed out after {timeout:g}s waiting for {what or repr(predicate)}; "
               f"last value: {_shorten(repr(value))}")
    if detail is not None:
        message += f"\n{_shorten(str(detail()))}"
    raise AssertionError(message)


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN else f"...{text[-_SHOWN:]}"
