"""Long DATA lines through the real daemon, from smtplib to an aiosmtpd next hop."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest

from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

ROUTE = ('[smarthosts.up]\nhosts = ["127.0.0.1:{port}"]\ntls = "none"\n'
         '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n')
LINE = ("Grüße aus der Zentrale, " * 200).encode()[:5000]  # one 5000-octet line of UTF-8
BODY = (b"From: app@local.example\r\nTo: b@remote.example\r\nSubject: report\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n<html>\r\n" + LINE + b"\r\n</html>\r\n")


def send(daemon, body: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("app@local.example")[0] == 250
        assert smtp.rcpt("b@remote.example")[0] == 250
        return smtp.data(body)


def test_a_5000_octet_line_arrives_in_lines_of_998_and_decodes_to_what_was_sent(daemon, capture):
    sink = capture()  # aiosmtpd itself refuses a line over 1001 octets
    daemon.start(ROUTE.format(port=sink.port))
    code, text = send(daemon, BODY)
    assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[1]
    ((_, _, content),) = sink.wait_for(1)
    assert max(len(line) for line in content.split(b"\r\n")) <= 998
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_content() == (b"<html>\r\n" + LINE + b"\r\n</html>\r\n").decode()
    # Everything but the encoding header is as sent.
    sent_header = BODY.split(b"\r\n\r\n")[0].replace(b"8bit", b"quoted-printable")
    assert content.split(b"\r\n\r\n")[0].endswith(sent_header)
    assert wait_until(lambda: f"long lines id={queue_id} reencoded=1 parts=1 folded=0"
                      in daemon.logs())


def test_a_line_over_max_line_length_is_refused_with_500(daemon):
    daemon.start(server_extra="max_line_length = 4096\n")
    assert send(daemon, BODY) == (
        500, b"5.5.2 Message contains a line longer than 4096 octets")
    assert daemon.queued() == []


def test_long_lines_reject_keeps_the_rfc_5321_refusal(daemon):
    daemon.start(server_extra='long_lines = "reject"\n')
    assert send(daemon, BODY) == (
        500, b"5.5.2 Message contains a line longer than 1000 octets")
    assert daemon.queued() == []
