"""DSN (RFC 3461) end to end: a real client sets NOTIFY, RET, ENVID and ORCPT on a running
daemon; the notices land in the sender's Maildir and are parsed with the email package."""

from __future__ import annotations

import email
import shutil
import smtplib
import subprocess
import tempfile
from email.message import Message
from pathlib import Path

import pytest

from tests.integration.conftest import free_port
from tests.integration.test_delivery import _listening, mailbox, maildir_route, smarthost
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SENDER = "a@local.example"
BODY = (b"From: a@local.example\r\nTo: b@remote.example\r\nSubject: dsn test\r\n\r\n"
        b"first line\r\n.starts with a dot\r\nlast line\r\n")
ENVID = "QQ+2B314159"  # xtext for "QQ+314159"
ORCPT = "rfc822;Bob+2BSmith@remote.example"  # xtext for "Bob+Smith@remote.example"
TO_SMARTHOST = '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n'


def sendmail(daemon, rcpt: str, rcpt_options: list[str], mail_options=("ENVID=" + ENVID,),
             sender: str = SENDER) -> str:
    """One message through smtplib's sendmail with DSN parameters; the queue id."""
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("dsn")  # sendmail sends the parameters either way
        assert smtp.sendmail(sender, [rcpt], BODY, mail_options=list(mail_options),
                             rcpt_options=rcpt_options) == {}
    # sendmail does not show the 250's text: the daemon's accepted line names the id.
    line = wait_until(lambda: next((ln for ln in daemon.logs().splitlines()
                                    if "accepted id=" in ln), None))
    return line.split("accepted id=")[1].split()[0]


def dsns(daemon) -> list[bytes]:
    """The DSNs in the sender's mailbox (CRLF or LF line ends, as the Maildir keeps them)."""
    return [p.read_bytes() for p in mailbox(daemon, "local.example", "a")]


def report(raw: bytes) -> tuple[Message, Message, list[Message], Message]:
    """(the DSN, its per-message fields, its per-recipient fields, the returned part)."""
    message = email.message_from_bytes(raw)
    assert message["Return-Path"] == "<>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, returned = message.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    return message, per_message, per_recipient, returned


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def test_ehlo_advertises_dsn(daemon):
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as smtp:
        code, _ = smtp.ehlo()
        assert code == 250 and smtp.esmtp_features["dsn"] == ""


def test_notify_never_with_a_5xx_next_hop_gets_no_dsn(daemon, capture):
    sink = capture()
    sink.handler.rcpt_replies = ["550 5.1.1 no such user"]
    daemon.start(smarthost("up", sink.port) + maildir_route(daemon) + TO_SMARTHOST)
    queue_id = sendmail(daemon, "b@remote.example", ["NOTIFY=NEVER"])
    # The DSN, had there been one, would be queued before the message is removed.
    assert wait_until(lambda: daemon.queued() == [])
    assert "status=bounced reply=\"550 5.1.1 no such user\"" in daemon.logs()
    assert f"removed id={queue_id}" in daemon.logs()
    assert "bounced id=" not in daemon.logs()
    assert dsns(daemon) == []


def test_ret_full_failure_returns_the_whole_message(daemon, capture):
    sink = capture()
    sink.handler.rcpt_replies = ["550 5.1.1 no such user"]
    daemon.start(smarthost("up", sink.port) + maildir_route(daemon) + TO_SMARTHOST)
    queue_id = sendmail(daemon, "b@remote.example", ["NOTIFY=FAILURE", "ORCPT=" + ORCPT],
                        mail_options=["RET=FULL", "ENVID=" + ENVID])
    (raw,) = wait_until(lambda: dsns(daemon))
    message, per_message, (bob,), returned = report(raw)
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert per_message["Original-Envelope-Id"] == "QQ+314159"
    assert per_message["X-Relaygw-Queue-ID"] == queue_id
    assert (bob["Original-Recipient"], bob["Final-Recipient"], bob["Action"],
            bob["Status"]) == ("rfc822; Bob+Smith@remote.example", "rfc822; b@remote.example",
                               "failed", "5.1.1")
    assert returned.get_content_type() == "message/rfc822"
    # The whole message as stored: our Received: line, then every byte the client sent.
    boundary = message.get_boundary().encode()
    part = lf(raw).split(b"\n--" + boundary)[3]
    head, _, body = part.partition(b"\n\n")
    assert head.strip() == b"Content-Type: message/rfc822"
    assert body.startswith(b"Received: from client.example ([127.0.0.1])\n")
    assert body.endswith(b"\n" + lf(BODY))


def test_success_into_a_maildir_gets_a_delivered_dsn(daemon):
    daemon.start(maildir_route(daemon, "remote.example") + maildir_route(daemon))
    queue_id = sendmail(daemon, "b@remote.example", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=" + ORCPT],
                        mail_options=["RET=FULL", "ENVID=" + ENVID])
    assert len(wait_until(lambda: mailbox(daemon, "remote.example", "b"))) == 1
    (raw,) = wait_until(lambda: dsns(daemon))
    message, per_message, (bob,), returned = report(raw)
    assert message["Subject"] == "Successful Mail Delivery Report"
    assert per_message["Original-Envelope-Id"] == "QQ+314159"
    assert per_message["X-Relaygw-Queue-ID"] == queue_id
    assert dict(bob.items()) == {"Original-Recipient": "rfc822; Bob+Smith@remote.example",
                                 "Final-Recipient": "rfc822; b@remote.example",
                                 "Action": "delivered", "Status": "2.0.0"}
    # RET=FULL is for failures (RFC 3461 §4.3): a success notice returns the header.
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: dsn test" in lf(returned.get_payload().encode())
    assert b"first line" not in raw
    assert wait_until(lambda: daemon.queued() == [])
    assert f"notified id={queue_id} dsn_id=" in daemon.logs()


def test_success_relayed_to_a_sink_without_dsn_gets_a_relayed_dsn(daemon, capture):
    sink = capture()  # aiosmtpd: no DSN offered, and DSN parameters would get a 555
    daemon.start(smarthost("up", sink.port) + maildir_route(daemon) + TO_SMARTHOST)
    sendmail(daemon, "b@remote.example", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=" + ORCPT],
             mail_options=["RET=FULL", "ENVID=" + ENVID])
    ((mail_from, rcpts, _),) = sink.wait_for(1)
    assert (mail_from, rcpts) == (SENDER, ["b@remote.example"])
    (raw,) = wait_until(lambda: dsns(daemon))
    message, _, (bob,), _ = report(raw)
    assert message["Subject"] == "Successful Mail Delivery Report"
    assert dict(bob.items()) == {"Original-Recipient": "rfc822; Bob+Smith@remote.example",
                                 "Final-Recipient": "rfc822; b@remote.example",
                                 "Action": "relayed", "Status": "2.0.0",
                                 "Remote-MTA": "dns; 127.0.0.1",
                                 "Diagnostic-Code": "smtp; 250 2.0.0 captured"}
    assert wait_until(lambda: daemon.queued() == [])


needs_sink = pytest.mark.skipif(shutil.which("smtp-sink") is None,
                                reason="smtp-sink (Debian package postfix) not installed")


@needs_sink
def test_dsn_parameters_go_on_to_a_next_hop_that_offers_dsn(daemon):
    port = free_port()
    # smtp-sink offers DSN and dumps each transaction with its MAIL and RCPT arguments. It
    # runs as nobody, so the dump directory must be reachable by that user.
    dump = Path(tempfile.mkdtemp(prefix="relaygw-dsn-sink-"))
    dump.chmod(0o777)
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-d", f"{dump}/%M.",
                             f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening(port), what=f"smtp-sink listening on port {port}")
        daemon.start(smarthost("up", port) + maildir_route(daemon) + TO_SMARTHOST)
        queue_id = sendmail(daemon, "b@remote.example",
                            ["NOTIFY=SUCCESS,FAILURE", "ORCPT=" + ORCPT],
                            mail_options=["RET=FULL", "ENVID=" + ENVID])
        (dumped,) = wait_until(lambda: [p for p in dump.iterdir() if p.stat().st_size])
        fields = email.message_from_bytes(wait_until(
            lambda: b"last line" in (data := dumped.read_bytes()) and data))
        assert fields["X-Mail-Args"] == f"<{SENDER}> RET=FULL ENVID={ENVID}"
        assert fields["X-Rcpt-Args"] == f"<b@remote.example> NOTIFY=SUCCESS,FAILURE ORCPT={ORCPT}"
        # The next hop reports from now on: no "relayed" notice from us.
        assert wait_until(lambda: daemon.queued() == [])
        assert f"attempt id={queue_id} to=<b@remote.example>" in daemon.logs()
        assert dsns(daemon) == [] and "notified id=" not in daemon.logs()
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        shutil.rmtree(dump, ignore_errors=True)


def test_delay_gets_one_delayed_dsn_also_across_a_restart(daemon, capture):
    sink = capture()
    sink.handler.rcpt_replies = ["451 4.3.0 try again later"] * 1000
    config = ("[delivery]\nretry_intervals = [1]\ndelay_warning_time = 2\n"
              + smarthost("up", sink.port) + maildir_route(daemon) + TO_SMARTHOST)
    daemon.start(config)
    queue_id = sendmail(daemon, "b@remote.example", ["NOTIFY=DELAY,FAILURE"])
    (raw,) = wait_until(lambda: dsns(daemon), timeout=30)
    message, per_message, (bob,), returned = report(raw)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert per_message["Original-Envelope-Id"] == "QQ+314159"
    assert (bob["Final-Recipient"], bob["Action"], bob["Status"], bob["Remote-MTA"]) == (
        "rfc822; b@remote.example", "delayed", "4.3.0", "dns; 127.0.0.1")
    assert bob["Diagnostic-Code"] == "smtp; 451 4.3.0 try again later"
    arrival = email.utils.parsedate_to_datetime(per_message["Arrival-Date"])
    retry_until = email.utils.parsedate_to_datetime(bob["Will-Retry-Until"])
    assert (retry_until - arrival).total_seconds() == 432000  # max_queue_time's default
    assert returned.get_content_type() == "text/rfc822-headers"
    assert daemon.logs().count(f"notified id={queue_id} dsn_id=") == 1

    # Still deferred after a restart: the warning was remembered, and is not sent again.
    daemon.stop()
    attempts = daemon.logs().count(f"attempt id={queue_id}")
    daemon.start(config)
    assert wait_until(lambda: daemon.logs().count(f"attempt id={queue_id}") >= attempts + 3,
                      timeout=30)
    sink.handler.rcpt_replies = []
    assert len(sink.wait_for(1, timeout=30)) == 1
    assert wait_until(lambda: daemon.queued() == [])
    assert len(dsns(daemon)) == 1
    assert daemon.logs().count(f"notified id={queue_id} dsn_id=") == 1
