"""fsync failures injected into the running daemon: 451, never 250, never 5xx; recovery."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.reliability.conftest import message, payload, route_to, send, smarthost, spool_files
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SHIM = Path(__file__).with_name("failfsync.c")


@pytest.fixture
def shim(tmp_path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fsync-failure shim")
    lib = tmp_path / "libfailfsync.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(SHIM), "-ldl"], check=True)
    return lib


def test_failing_fsync_answers_451_and_recovers_without_restart(daemon, capture, shim, tmp_path):
    sink = capture()
    marker = tmp_path / "fail-fsync"
    daemon.start(smarthost("up", sink.port) + route_to("up"),
                 env={"LD_PRELOAD": str(shim), "RELAYGW_TEST_FAIL_FSYNC": str(marker)})
    marker.touch()
    first = message("while fsync fails")
    code, text = send(daemon.port, first)
    assert (code, text) == (451, b"4.3.0 Temporary local problem, try again later")
    assert spool_files(daemon.spool, "queue") == [] and spool_files(daemon.spool, "tmp") == []
    assert sink.messages == []
    marker.unlink()
    code, text = send(daemon.port, first)  # the client's retry
    assert code == 250, text
    ((_, _, content),) = sink.wait_for(1)
    assert payload(content) == first
    assert wait_until(lambda: spool_files(daemon.spool, "queue") == [])
    assert "Traceback" not in daemon.logs()
