"""A full spool filesystem (a 4 MiB tmpfs): 452 4.3.1, never 250 or 5xx, and recovery."""

from __future__ import annotations

import os
import smtplib

import pytest

from tests.reliability.conftest import (
    message,
    payload,
    route_to,
    smarthost,
    spool_files,
    start,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_min_free_space_above_what_is_free_refuses_mail_with_452(daemon, tmpfs_spool):
    start(daemon, server="min_free_space = 16777216\n")
    assert free_bytes(tmpfs_spool) < 16777216
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        code, text = smtp.mail("a@local.example")
        assert (code, text[:5]) == (452, b"4.3.1"), text
    assert daemon.queued() == []
    assert spool_files(tmpfs_spool, "tmp") == []


def test_enospc_during_data_is_452_then_recovers_without_restart(daemon, capture,
                                                                 tmpfs_spool):
    sink = capture()
    start(daemon, smarthost("up", sink.port) + route_to("up"), server="min_free_space = 0\n")
    filler = tmpfs_spool / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free_bytes(tmpfs_spool) - 300 * 1024))
        f.flush()
        os.fsync(f.fileno())
    assert 200 * 1024 < free_bytes(tmpfs_spool) <= 400 * 1024
    body = message("disk full", size=1024 * 1024)
    assert len(body) > 1000 * 1024

    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@local.example")[0] == 250
        assert smtp.rcpt("b@remote.example")[0] == 250
        code, text = smtp.data(body)
    assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
    assert spool_files(tmpfs_spool, "tmp") == []
    assert spool_files(tmpfs_spool, "queue") == []
    assert sink.messages == []
    assert "Traceback" not in daemon.logs()

    filler.unlink()
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@local.example")[0] == 250
        assert smtp.rcpt("b@remote.example")[0] == 250
        code, text = smtp.data(body)
    assert code == 250, text
    ((mail_from, rcpts, content),) = sink.wait_for(1)
    assert (mail_from, rcpts) == ("a@local.example", ["b@remote.example"])
    assert payload(content) == body
    assert wait_until(lambda: daemon.queued() == [])
    assert spool_files(tmpfs_spool, "tmp") == []
    assert len(sink.messages) == 1
