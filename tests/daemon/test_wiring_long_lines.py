"""The wiring turns [server] long_lines / max_line_length into sessions and transforms."""

from __future__ import annotations

from pathlib import Path

from relaygw.config import parse_config
from relaygw.daemon.wiring import server_settings, transforms
from relaygw.receive.longlines import LongLines
from relaygw.receive.transforms import ReceivedHeader


def config(**server):
    return parse_config({"server": {"hostname": "relay.test", **server},
                         "listeners": [{"address": "127.0.0.1:2525", "tls": "none"}]},
                        Path("/nonexistent"))


def test_accept_passes_the_cap_to_sessions_and_adds_the_transform_after_received():
    c = config(max_line_length=65536)
    assert server_settings(c, c.listeners[0], None).max_line_length == 65536
    assert [type(t) for t in transforms(c)] == [ReceivedHeader, LongLines]


def test_the_default_cap_is_a_mebibyte():
    c = config()
    assert server_settings(c, c.listeners[0], None).max_line_length == 1048576


def test_reject_keeps_rfc_5321s_1000_octets_and_no_transform():
    c = config(long_lines="reject")
    assert server_settings(c, c.listeners[0], None).max_line_length == 1000
    assert [type(t) for t in transforms(c)] == [ReceivedHeader]
