"""The queue's list/show reports and filters: pure functions, exact dicts; the spool read
read-only."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from relaygw.config import parse_config
from relaygw.envelope import Envelope, EnvelopeRecipient
from relaygw.queue.inspect import (
    details,
    iso,
    matches,
    parse_age,
    read_content,
    read_message,
    read_only_spool,
    read_spool,
    summarise,
)
from relaygw.queue.state import DELIVERED, FAILED, QueueState
from relaygw.testing import SynchronousSpool

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
BODY = b"Subject: hello\r\nFrom: a@s.example\r\n\r\nbody line\r\n"


def config():
    return parse_config({
        "server": {"hostname": "relay.test"},
        "listeners": [{"address": "127.0.0.1:0"}],
        "smarthosts": {"up": {"hosts": ["127.0.0.1:2626"], "tls": "none"}},
        "routes": [
            {"recipient_domains": ["corp.example"], "action": "smarthost", "smarthost": "up"},
            {"senders": ["*@auth.example"], "authenticated": True, "action": "mx"},
            {"recipient_domains": ["mx.example"], "action": "mx"},
        ],
    }, Path("/nonexistent"))


def envelope(**kw):
    fields = dict(queue_id="18BCFE5680A1B2C3", sender="Alice@S.example",
                  recipients=(EnvelopeRecipient("b@corp.example"),
                              EnvelopeRecipient("c@mx.example", {"NOTIFY": "FAILURE"}),
                              EnvelopeRecipient("d@nowhere.example")),
                  arrived=T0, client_ip="192.0.2.7", client_port=41000,
                  helo="client.example", tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
                  auth_user=None, params={"BODY": "8BITMIME", "RET": "HDRS"})
    fields.update(kw)
    return Envelope(**fields)


def tried_state(env):
    """b deferred after one attempt, c delivered, d never tried."""
    state = QueueState.initial(env)
    b, c, _ = state.recipients
    state = state.with_recipient(0, replace(
        b, attempts=1, last_attempt=T0 + 5, next_attempt=T0 + 305,
        last_reply="4.4.1 connection refused", enhanced="4.4.1",
        remote_host="up1.example[192.0.2.1]:25"))
    return state.with_recipient(1, replace(c, status=DELIVERED, attempts=1,
                                           last_attempt=T0 + 5, last_reply="250 ok"))


def test_iso_and_parse_age():
    assert iso(T0) == "2023-11-14T22:13:20Z"
    assert iso(None) is None
    assert [parse_age(v) for v in ("90", "90s", "15m", "2h", "1.5d", " 3H ", 7, 2.5)] == [
        90, 90, 900, 7200, 129600, 10800, 7, 2.5]
    for bad in ("", "h", "2w", "-3", "1h30m", -1, True):
        with pytest.raises(ValueError):
            parse_age(bad)


def test_summary_of_a_message_tried_once():
    env = envelope()
    assert summarise(env, tried_state(env), 1234, T0 + 125.9, config()) == {
        "id": "18BCFE5680A1B2C3",
        "arrived": "2023-11-14T22:13:20Z",
        "age": 125,
        "size": 1234,
        "sender": "Alice@S.example",
        "held": False,
        "recipients": [
            {"address": "b@corp.example", "state": "deferred", "attempts": 1,
             "next_attempt": "2023-11-14T22:18:25Z", "last_reply": "4.4.1 connection refused",
             "route": "routes[0]"},
            {"address": "c@mx.example", "state": "delivered", "attempts": 1,
             "next_attempt": None, "last_reply": "250 ok", "route": None},
            {"address": "d@nowhere.example", "state": "pending", "attempts": 0,
             "next_attempt": "2023-11-14T22:13:20Z", "last_reply": None, "route": "none"},
        ],
    }


def test_held_recipients_have_no_next_attempt_and_no_config_means_no_route():
    env = envelope(recipients=(EnvelopeRecipient("b@corp.example"),))
    state = replace(QueueState.initial(env), held=True)
    failed = replace(state.recipients[0], status=FAILED, attempts=2, last_reply="550 no")
    summary = summarise(env, state, 10, T0 - 5)
    assert summary["held"] is True and summary["age"] == 0  # a clock behind never goes < 0
    assert summary["recipients"] == [
        {"address": "b@corp.example", "state": "held", "attempts": 0, "next_attempt": None,
         "last_reply": None, "route": None}]
    assert summarise(env, state.with_recipient(0, failed), 10, T0)["recipients"][0][
        "state"] == "failed"


def test_route_context_uses_the_envelope_sender_and_authentication():
    env = envelope(sender="x@auth.example", recipients=(EnvelopeRecipient("y@other.example"),))
    assert summarise(env, QueueState.initial(env), 1, T0, config())["recipients"][0][
        "route"] == "none"
    authed = replace(env, auth_user="x")
    assert summarise(authed, QueueState.initial(authed), 1, T0, config())["recipients"][0][
        "route"] == "routes[1]"
    bounce = replace(env, sender="", client_ip="", auth_user=None,
                     recipients=(EnvelopeRecipient("a@mx.example"),))
    assert summarise(bounce, QueueState.initial(bounce), 1, T0, config())["recipients"][0][
        "route"] == "routes[2]"


def test_details_add_the_envelope_history_and_headers():
    env = envelope()
    result = details(env, tried_state(env), 1234, T0 + 60, b"Subject: hello\r\n", None,
                     config())
    summary = summarise(env, tried_state(env), 1234, T0 + 60, config())
    extra = {k: v for k, v in result.items() if k not in summary}
    assert extra == {
        "client_ip": "192.0.2.7", "client_port": 41000, "helo": "client.example",
        "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384", "auth_user": None,
        "params": {"BODY": "8BITMIME", "RET": "HDRS"}, "smtputf8": False,
        "headers": "Subject: hello\r\n", "message": None,
    }
    assert {k: result[k] for k in summary if k != "recipients"} == {
        k: v for k, v in summary.items() if k != "recipients"}
    assert result["recipients"][0] == {
        **summary["recipients"][0], "status": "pending",
        "last_attempt": "2023-11-14T22:13:25Z", "enhanced": "4.4.1",
        "remote_host": "up1.example[192.0.2.1]:25", "notified": False, "params": {}}
    assert result["recipients"][1]["params"] == {"NOTIFY": "FAILURE"}
    assert result["recipients"][1]["status"] == "delivered"
    assert result["recipients"][2]["last_attempt"] is None


def test_details_with_the_whole_message_replace_undecodable_bytes():
    env = envelope()
    result = details(env, QueueState.initial(env), 3, T0, b"", b"caf\xe9\r\n")
    assert result["message"] == "caf\ufffd\r\n"


SUMMARY = {
    "id": "X", "age": 7200, "sender": "Alice@S.example",
    "recipients": [{"address": "b@Corp.Example", "route": "routes[0]"},
                   {"address": "c@mx.example", "route": None}],
}


@pytest.mark.parametrize(("filters", "expected"), [
    ({}, True),
    ({"sender": "alice@s.example"}, True),
    ({"sender": "*@S.EXAMPLE"}, True),
    ({"sender": "bob@*"}, False),
    ({"sender": "<>"}, False),
    ({"recipient_domain": "corp.example"}, True),
    ({"recipient_domain": "MX.example."}, True),
    ({"recipient_domain": "example"}, False),
    ({"route": "routes[0]"}, True),
    ({"route": "0"}, True),
    ({"route": "routes[1]"}, False),  # c@mx.example is final: its route does not count
    ({"route": "none"}, False),
    ({"older_than": "2h"}, True),
    ({"older_than": 7201}, False),
    ({"older_than": "1h", "sender": "*@s.example", "route": "0"}, True),
    ({"older_than": "1h", "sender": "*@s.example", "route": "1"}, False),
])
def test_filters(filters, expected):
    assert matches(SUMMARY, **filters) is expected


def test_null_sender_filter():
    assert matches({**SUMMARY, "sender": ""}, sender="<>")
    assert matches({**SUMMARY, "sender": ""}, sender="*")


# -- reading the spool ----------------------------------------------------------------------


def spool_with_messages(tmp_path):
    spool = SynchronousSpool(tmp_path / "spool")
    spool.recover()
    ids = []
    for i, arrived in enumerate((T0 + 10, T0)):
        env = envelope(queue_id=f"18BCFE5680A1B2C{i}", arrived=arrived)
        writer = spool.new_message(env)
        writer.write(BODY)
        writer.commit()
        ids.append(env.queue_id)
    spool.save_state(ids[0], tried_state(envelope(queue_id=ids[0])))
    return spool, ids


def snapshot(directory: Path):
    out = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = Path(root) / name
            st = path.stat()
            out[str(path)] = (st.st_mode, st.st_mtime_ns,
                              path.read_bytes() if path.is_file() else None)
    return out


def test_read_spool_reads_every_message_and_changes_nothing(tmp_path):
    spool, ids = spool_with_messages(tmp_path)
    (spool.queue_dir / "18BCFE5680A1B2FF").write_bytes(b"garbage")  # unreadable
    (spool.queue_dir / "18BCFE5680A1B2EE.state").write_bytes(b"{}")  # stale state
    (spool.tmp_dir / "18BCFE5680A1B2DD").write_bytes(b"partial")  # an unfinished write
    before = snapshot(spool.directory)
    errors: list[str] = []
    messages = read_spool(spool.directory, errors)
    assert snapshot(spool.directory) == before
    assert [m.envelope.queue_id for m in messages] == sorted(ids)
    assert errors == ["18BCFE5680A1B2FF: ValueError: not a relaygw spool file"]
    by_id = {m.envelope.queue_id: m for m in messages}
    assert by_id[ids[0]].state == tried_state(envelope(queue_id=ids[0]))
    assert by_id[ids[1]].state == QueueState.initial(envelope(queue_id=ids[1]))
    assert by_id[ids[1]].size == len(BODY)


def test_read_spool_ignores_names_that_are_no_queue_ids(tmp_path):
    spool, ids = spool_with_messages(tmp_path)
    (spool.queue_dir / ".editor-swap").write_bytes(b"x")
    (spool.queue_dir / "notes.txt").write_bytes(b"x")
    errors: list[str] = []
    assert [m.envelope.queue_id for m in read_spool(spool.directory, errors)] == sorted(ids)
    assert errors == []


def test_read_spool_of_a_missing_spool_is_empty_and_creates_nothing(tmp_path):
    assert read_spool(tmp_path / "nothing") == []
    assert not (tmp_path / "nothing").exists()


def test_read_message_and_content(tmp_path):
    spool, ids = spool_with_messages(tmp_path)
    stored = read_message(spool.directory, ids[1])
    assert stored.envelope.queue_id == ids[1]
    content = read_only_spool(spool.directory).content(stored)
    assert read_content(content) == (
        b"Subject: hello\r\nFrom: a@s.example\r\n", None)
    assert read_content(content, body=True)[1] == BODY
    assert read_message(spool.directory, "18BCFE5680A1B2AA") is None
    assert read_message(spool.directory, "../../etc/passwd") is None
    assert read_message(spool.directory, ids[1] + ".state") is None
