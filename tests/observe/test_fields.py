"""Tests for relaygw.observe.fields: how values are written into log lines."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent, textFileLogObserver

from relaygw.observe import fields
from relaygw.observe.logs import format_event, observer_for
from tests.support.log_lines import pairs


@pytest.mark.parametrize(("value", "written"), [
    ("250", "250"),
    ("mx.example.net[192.0.2.25]:25", "mx.example.net[192.0.2.25]:25"),
    ("<1.2@client.example>", "<1.2@client.example>"),
    ("jörg@bücher.example", "jörg@bücher.example"),
    ("250 2.0.0 Ok", '"250 2.0.0 Ok"'),
    ("", '""'),
    ("a=b", '"a=b"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("two\r\nlines\tand tab", '"two\\r\\nlines\\tand tab"'),
    ("nul\x00 del\x7f", '"nul\\x00 del\\x7f"'),
    ("line\u2028sep", '"line\\u2028sep"'),
    ("lone\udcffsurrogate", '"lone\\udcffsurrogate"'),
    ("nbsp\u00a0here", '"nbsp\\xa0here"'),
])
def test_quote(value: str, written: str) -> None:
    assert fields.quote(value) == written
    assert pairs(f"x={written}") == {"x": value}  # what a reader gets back
    assert " " not in written.strip('"') or written.startswith('"')


def test_helpers() -> None:
    assert fields.text(None) == "none" and type(fields.text(None)) is str
    assert fields.text(4) == "4"
    assert fields.tls(None) == fields.tls("") == "none"
    assert fields.tls("TLSv1.3 TLS_AES_256_GCM_SHA384") == "TLSv1.3/TLS_AES_256_GCM_SHA384"
    assert fields.tls("TLSv1.2") == "TLSv1.2"
    assert f"{fields.address('')}" == "<>"
    assert f"{fields.address(None)}" == "<>"
    assert f"{fields.address('a@b.example')}" == "<a@b.example>"
    assert f"{fields.address('a b@c.example')}" == '"<a b@c.example>"'
    assert f"{fields.addresses(['a@x.example', 'b@y.example'])}" == "a@x.example,b@y.example"


def test_text_lines_quote_and_json_lines_keep_the_value() -> None:
    event = {"log_format": "attempt to={rcpt} reply={reply} message_id={message_id}",
             "rcpt": fields.address("b@example.net"), "reply": fields.text("451 4.3.0 Try later"),
             "message_id": fields.text(None), "log_time": 1e9, "log_level": LogLevel.info,
             "log_namespace": "relaygw.maillog"}
    line = 'attempt to=<b@example.net> reply="451 4.3.0 Try later" message_id=none'
    # Twisted's formatter, the fast one here, and twistd's own text observer agree.
    assert formatEvent(dict(event)) == format_event(dict(event)) == line
    theirs = io.StringIO()
    textFileLogObserver(theirs)(dict(event))
    assert theirs.getvalue().endswith(f" {line}\n")
    stream = io.StringIO()
    Logger(namespace="relaygw.maillog", observer=LogPublisher(observer_for("json", stream))) \
        .info(event["log_format"], rcpt=event["rcpt"], reply=event["reply"],
              message_id=event["message_id"])
    record = json.loads(stream.getvalue())
    assert record["message"] == line
    assert (record["rcpt"], record["reply"], record["message_id"]) == \
        ("b@example.net", "451 4.3.0 Try later", "none")
