"""tests.support.waiting: a wait that never comes true fails the test by itself."""

from __future__ import annotations

import pytest

from tests.support.waiting import poll, wait_until


def test_wait_until_returns_the_first_truthy_value():
    values = iter([None, [], ["ready"]])
    assert wait_until(lambda: next(values), timeout=5, interval=0) == ["ready"]


def test_wait_until_raises_naming_what_it_waited_for_and_the_last_value():
    with pytest.raises(AssertionError) as raised:
        wait_until(lambda: [], timeout=0.05, interval=0.01, what="the queue to fill",
                   detail=lambda: "queue: empty")
    assert str(raised.value) == ("timed out after 0.05s waiting for the queue to fill; "
                                 "last value: []\nqueue: empty")


def test_wait_until_names_the_predicate_by_default():
    def spool_is_empty() -> bool:
        return False

    with pytest.raises(AssertionError, match=r"waiting for <function .*spool_is_empty"):
        wait_until(spool_is_empty, timeout=0, interval=0)


def test_wait_until_asks_at_least_once_even_with_no_time():
    calls = []
    with pytest.raises(AssertionError):
        wait_until(lambda: calls.append(1), timeout=0)
    assert calls == [1]


def test_poll_returns_none_for_what_did_not_happen():
    assert poll(lambda: 0, timeout=0.05, interval=0.01) is None
    assert poll(lambda: 7, timeout=0) == 7
