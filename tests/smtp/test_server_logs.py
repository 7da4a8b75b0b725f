"""The inbound log lines of real sessions (the server and the receive stage), written by
relaygw's text and JSON observers and read back as an operator's tools would."""

from __future__ import annotations

import base64
import io
import json
import re

from twisted.logger import capturedLogs

from relaygw.observe.logs import observer_for
from tests.support.log_lines import (
    assert_json_has_the_text_fields,
    python_reprs,
    split_text_line,
)

SERVER = "relaygw.smtp.server"


def written(events: list[dict]) -> list[tuple[str, dict]]:
    """(text message, JSON record) per line the observers write; both checked to agree."""
    text, json_out = io.StringIO(), io.StringIO()
    for event in events:
        observer_for("text", text)(dict(event))
        observer_for("json", json_out)(dict(event))
    lines = [split_text_line(line)[1] for line in text.getvalue().splitlines()]
    records = [json.loads(line) for line in json_out.getvalue().splitlines()]
    assert len(lines) == len(records)
    for message, record in zip(lines, records, strict=True):
        assert message == record["message"]
        assert python_reprs(message) == []
        assert_json_has_the_text_fields(record)
    return list(zip(lines, records, strict=True))


def session_id(line: str) -> str:
    match = re.search(r" session=([0-9a-f]{12}) ", line)
    assert match is not None, line
    return match.group(1)


def test_one_sessions_lines_share_its_id_and_say_who_was_refused(harness):
    with capturedLogs() as events:
        s = harness.connect(client_ip="192.0.2.7")
        s.ehlo("client.example")
        assert s.send("MAIL FROM:<big@client.example> SIZE=999999\r\n") == [
            "552 5.3.4 Message size exceeds fixed maximum message size"]
        replies = s.send("MAIL FROM:<alice@client.example>\r\n"
                         "RCPT TO:<x@elsewhere.example>\r\n"
                         "RCPT TO:<bob@relay.example>\r\nDATA\r\n")
        assert replies[1] == "554 5.7.1 Relay access denied"
        replies = s.send("Message-ID:\r\n <m1.2@client.example>\r\nSubject: hi\r\n\r\n"
                         "Hello\r\n.\r\n")
        queue_id = replies[-1].rsplit(" ", 1)[1]
        s.send("MAIL FROM:<>\r\nRCPT TO:<bob@relay.example>\r\nRCPT TO:<carol@relay.example>\r\n"
               "DATA\r\n")
        assert s.send("Subject: x\r\n\r\nbare\nLF\r\n.\r\n") == [
            "550 5.5.2 Message contains bare CR or LF characters"]
        s.send("MAIL FROM:<alice@client.example>\r\nRCPT TO:<bob@relay.example>\r\nDATA\r\n"
               "Subject: no id\r\n\r\nx\r\n.\r\n")
        s.send("QUIT\r\n")
        s.proto.connectionLost()
    lines = written([e for e in events if e.get("log_namespace") == SERVER])
    messages = [m for m, _ in lines]
    sid = session_id(messages[0])
    second_id = messages[-2].split(" ")[1].removeprefix("id=")
    assert messages == [
        f"connect session={sid} client=192.0.2.7 port=40000 tls=none",
        f"rejected session={sid} client=192.0.2.7 helo=client.example "
        f'from=<big@client.example> stage=mail reply="552 5.3.4 Message size exceeds fixed '
        f'maximum message size"',
        f"rejected session={sid} client=192.0.2.7 helo=client.example "
        f"from=<alice@client.example> to=<x@elsewhere.example> stage=rcpt "
        f'reply="554 5.7.1 Relay access denied"',
        f"accepted id={queue_id} session={sid} from=<alice@client.example> size=59 nrcpt=1 "
        f"message_id=<m1.2@client.example> client=192.0.2.7 tls=none auth=none",
        f"rejected session={sid} client=192.0.2.7 helo=client.example from=<> "
        f"rcpts=bob@relay.example,carol@relay.example stage=data "
        f'reply="550 5.5.2 Message contains bare CR or LF characters"',
        f"accepted id={second_id} session={sid} from=<alice@client.example> size=21 "
        f"nrcpt=1 message_id=none client=192.0.2.7 tls=none auth=none",
        f"disconnect session={sid} client=192.0.2.7 tls=none auth=none",
    ]
    assert [r["event"] for _, r in lines] == [
        "connect", "rejected", "rejected", "accepted", "rejected", "accepted", "disconnect"]
    rcpt_rejected = lines[2][1]
    assert (rcpt_rejected["sender"], rcpt_rejected["rcpt"], rcpt_rejected["helo"]) == (
        "alice@client.example", "x@elsewhere.example", "client.example")
    assert lines[3][1]["message_id"] == "<m1.2@client.example>"


def test_every_session_has_its_own_id(harness):
    with capturedLogs() as events:
        for _ in range(50):
            harness.connect()
    ids = [e["session"] for e in events if e.get("event") == "connect"]
    assert len(ids) == 50 == len(set(ids))
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)


def test_auth_and_tls_lines(harness):
    with capturedLogs() as events:
        s = harness.connect()
        s.ehlo()
        s.send("STARTTLS\r\n")
        s.ehlo()
        plain = base64.b64encode(b"\0alice\0wrong").decode()
        s.send(f"AUTH PLAIN {plain}\r\n")
        harness.clock.advance(1)
        plain = base64.b64encode(b"\0alice\0s3cret").decode()
        assert s.send(f"AUTH PLAIN {plain}\r\n") == [
            "535 5.7.8 Authentication credentials invalid", "235 2.7.0 Authentication successful"]
        s.proto.connectionLost()
    lines = written([e for e in events if e.get("log_namespace") == SERVER])
    sid = session_id(lines[0][0])
    # The fake transport knows no cipher: "TLS", encrypted with a version not known.
    assert [m for m, _ in lines] == [
        f"connect session={sid} client=127.0.0.1 port=40000 tls=none",
        f"auth failed session={sid} client=127.0.0.1 user=alice failures=1",
        f"auth session={sid} client=127.0.0.1 user=alice",
        f"disconnect session={sid} client=127.0.0.1 tls=TLS auth=alice",
    ]


def test_implicit_tls_connect_line(harness):
    with capturedLogs() as events:
        harness.connect(tls_mode="implicit")
    (connect,) = [e for e in events if e.get("event") == "connect"]
    assert connect["tls"] == "implicit"


def test_a_refused_connection_has_a_session_id_too(harness):
    factory = harness.factory()
    with capturedLogs() as events:
        for _ in range(4):  # the harness's counter allows 3 per client
            harness.session(factory)
    (refused,) = written([e for e in events if e.get("event") == "refused"])
    sid = session_id(refused[0])
    assert refused[0] == (f"connection refused session={sid} client=127.0.0.1 "
                          f'reply="421 4.7.0 Too many connections from your address"')
