"""RFC 3464 DSNs: exact bytes, fields, injection, line limits, parsing, attached headers."""

from __future__ import annotations

import email
import re
from email import policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygw.delivery.bounce import FailedRecipient, build_dsn, should_bounce
from relaygw.queue.content import SpoolContent

HEADERS = (b"From: Alice <alice@sender.example>\r\n"
           b"To: bob@corp.example\r\n"
           b"Subject: test\r\n")

BOB = FailedRecipient("bob@corp.example", "5.1.1", "550 5.1.1 No such user", "mx.corp.example")
CAROL = FailedRecipient("carol@other.example", "4.4.7",
                        "451 4.3.0 try again later (delivery time expired)", None)


def dsn(recipients=(BOB,), **kw):
    args = dict(reporting_mta="mx.relay.example", envelope_id=None, queue_id="018BCFE5680A1B2C3",
                sender="alice@sender.example", arrival=1700000000.0, recipients=recipients,
                original_headers=HEADERS, now=1700003600.5, message_id_domain="relay.example")
    args.update(kw)
    return build_dsn(**args)


def lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\r\n")
    return raw[:-2].split(b"\r\n")


def status_part(raw: bytes) -> bytes:
    return raw.split(b"Content-Type: message/delivery-status\r\n\r\n")[1].split(b"\r\n--")[0]


GOLDEN = (
    b"From: Mail Delivery System <MAILER-DAEMON@mx.relay.example>\r\n"
    b"To: <alice@sender.example>\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"Date: Tue, 14 Nov 2023 23:13:20 +0000\r\n"
    b"Message-ID: <018BCFE5680A1B2C3.1700003600@relay.example>\r\n"
    b"Auto-Submitted: auto-replied\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/report; report-type=delivery-status;\r\n"
    b' boundary="018BCFE5680A1B2C3.1700003600/mx.relay.example"\r\n'
    b"\r\n"
    b"This is a MIME-encapsulated message.\r\n"
    b"\r\n"
    b"--018BCFE5680A1B2C3.1700003600/mx.relay.example\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"This is the mail system at host mx.relay.example.\r\n"
    b"\r\n"
    b"Your message could not be delivered to one or more recipients. The reasons\r\n"
    b"are listed below, and the header of your message is attached.\r\n"
    b"\r\n"
    b"<bob@corp.example>: delivery failed: host mx.corp.example said: 550 5.1.1 No\r\n"
    b"    such user\r\n"
    b"\r\n"
    b"<carol@other.example>: delivery failed: 451 4.3.0 try again later (delivery\r\n"
    b"    time expired)\r\n"
    b"\r\n"
    b"--018BCFE5680A1B2C3.1700003600/mx.relay.example\r\n"
    b"Content-Type: message/delivery-status\r\n"
    b"\r\n"
    b"Reporting-MTA: dns; mx.relay.example\r\n"
    b"Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"X-Relaygw-Queue-ID: 018BCFE5680A1B2C3\r\n"
    b"\r\n"
    b"Final-Recipient: rfc822; bob@corp.example\r\n"
    b"Action: failed\r\n"
    b"Status: 5.1.1\r\n"
    b"Remote-MTA: dns; mx.corp.example\r\n"
    b"Diagnostic-Code: smtp; 550 5.1.1 No such user\r\n"
    b"\r\n"
    b"Final-Recipient: rfc822; carol@other.example\r\n"
    b"Action: failed\r\n"
    b"Status: 4.4.7\r\n"
    b"Diagnostic-Code: smtp; 451 4.3.0 try again later (delivery time expired)\r\n"
    b"\r\n"
    b"--018BCFE5680A1B2C3.1700003600/mx.relay.example\r\n"
    b"Content-Type: text/rfc822-headers\r\n"
    b"\r\n"
    b"From: Alice <alice@sender.example>\r\n"
    b"To: bob@corp.example\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b"--018BCFE5680A1B2C3.1700003600/mx.relay.example--\r\n"
)


def test_dsn_for_two_recipients_is_byte_exact():
    assert dsn((BOB, CAROL)) == GOLDEN


def test_dsn_is_deterministic():
    assert dsn((BOB, CAROL)) == dsn((BOB, CAROL))


def test_only_crlf_line_ends():
    raw = dsn((BOB, CAROL))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_parses_as_multipart_report_with_three_parts():
    message = email.message_from_bytes(dsn((BOB, CAROL)))
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = message.get_payload()
    assert len(parts) == 3
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert parts[1].get_content_type() == "message/delivery-status"
    per_message, bob, carol = parts[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.relay.example"
    assert bob["Final-Recipient"] == "rfc822; bob@corp.example"
    assert bob["Status"] == "5.1.1"
    assert carol["Action"] == "failed"
    assert parts[2].get_payload() == HEADERS.decode()


def test_parses_with_the_modern_policy_too():
    message = email.message_from_bytes(dsn((BOB, CAROL)), policy=policy.default)
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["To"].addresses[0].addr_spec == "alice@sender.example"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "<bob@corp.example>: delivery failed" in parts[0].get_content()


def test_delayed_variant():
    delayed = FailedRecipient("bob@corp.example", "4.4.1", "connect to mx.corp.example: timed out",
                              "mx.corp.example", action="delayed")
    raw = dsn((delayed,))
    assert b"Subject: Delayed Mail (still being retried)\r\n" in raw
    assert b"Action: delayed\r\nStatus: 4.4.1\r\n" in raw
    assert b"will keep trying" in raw
    assert b"delivery delayed, still trying" in raw


def test_mixed_failed_and_delayed_is_an_undelivered_report():
    delayed = FailedRecipient("carol@other.example", "4.4.1", None, None, action="delayed")
    raw = dsn((BOB, delayed))
    assert b"Subject: Undelivered Mail Returned to Sender\r\n" in raw
    assert b"Action: failed\r\n" in raw and b"Action: delayed\r\n" in raw
    assert b"<carol@other.example>: delivery delayed, still trying: status 4.4.1" in raw


def test_envid_and_orcpt_rendering():
    bob = FailedRecipient("bob@corp.example", "5.1.1", "550 5.1.1 No such user",
                          "mx.corp.example", original_recipient="Bob.Smith@Corp.example")
    part = status_part(dsn((bob,), envelope_id="QQ+314159"))
    assert part == (
        b"Original-Envelope-Id: QQ+314159\r\n"
        b"Reporting-MTA: dns; mx.relay.example\r\n"
        b"Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        b"X-Relaygw-Queue-ID: 018BCFE5680A1B2C3\r\n"
        b"\r\n"
        b"Original-Recipient: rfc822; Bob.Smith@Corp.example\r\n"
        b"Final-Recipient: rfc822; bob@corp.example\r\n"
        b"Action: failed\r\n"
        b"Status: 5.1.1\r\n"
        b"Remote-MTA: dns; mx.corp.example\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 No such user\r\n")


def test_no_envid_and_no_orcpt_means_no_such_fields():
    raw = dsn((BOB,))
    assert b"Original-Envelope-Id" not in raw
    assert b"Original-Recipient" not in raw


def test_optional_recipient_fields_are_left_out():
    bare = FailedRecipient("bob@corp.example", "5.0.0", None, None)
    part = status_part(dsn((bare,)))
    assert part.endswith(b"\r\n\r\nFinal-Recipient: rfc822; bob@corp.example\r\n"
                         b"Action: failed\r\nStatus: 5.0.0\r\n")
    assert b"Remote-MTA" not in part and b"Diagnostic-Code" not in part


def test_invalid_status_is_replaced_by_a_generic_one():
    odd = FailedRecipient("bob@corp.example", "5.1.1\r\nX: y", None, None)
    later = FailedRecipient("c@corp.example", "", None, None, action="delayed")
    part = status_part(dsn((odd, later)))
    assert b"Status: 5.0.0\r\n" in part and b"Status: 4.0.0\r\n" in part


@pytest.mark.parametrize("evil", ["\r\nBcc: x@evil.example", "\nBcc: x@evil.example",
                                  "\rBcc: x@evil.example", "\x00Bcc: x@evil.example"])
def test_header_injection_adds_no_line(evil):
    rcpt = FailedRecipient("bob@corp.example" + evil, "5.1.1", "550 5.1.1 gone" + evil,
                           "mx.corp.example" + evil, original_recipient="o@corp.example" + evil)
    raw = dsn((rcpt,), sender="alice@sender.example" + evil, envelope_id="id" + evil,
              reporting_mta="mx.relay.example" + evil)
    assert not any(line.startswith(b"Bcc:") for line in lines(raw))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert b"\x00" not in raw
    message = email.message_from_bytes(raw)
    assert message["Bcc"] is None
    assert " ".join(message["To"].split()) == "<alice@sender.example Bcc: x@evil.example>"
    (_, group) = message.get_payload()[1].get_payload()
    assert group["Bcc"] is None
    assert re.fullmatch(r"rfc822; bob@corp\.example\?+Bcc:\?x@evil\.example",
                        group["Final-Recipient"])
    assert group["Diagnostic-Code"] == "smtp; 550 5.1.1 gone Bcc: x@evil.example"


def test_other_control_characters_become_question_marks():
    rcpt = FailedRecipient("bob@corp.example", "5.1.1", "550 bad\x1b[31m\x7f\u2028text", None)
    raw = dsn((rcpt,))
    assert b"Diagnostic-Code: smtp; 550 bad?[31m??text\r\n" in raw
    assert b"\x1b" not in raw and b"\x7f" not in raw


def test_delivery_status_part_is_ascii_and_the_text_part_utf8():
    rcpt = FailedRecipient("bob@corp.example", "5.1.1", "550 5.1.1 Benutzer unbekannt: Jürgen",
                           "mx.corp.example")
    raw = dsn((rcpt,))
    assert status_part(raw).isascii()
    assert b"Diagnostic-Code: smtp; 550 5.1.1 Benutzer unbekannt: J?rgen\r\n" in raw
    assert "Benutzer unbekannt: Jürgen".encode() in raw  # the human part keeps it


def test_non_ascii_address_is_an_rfc6533_utf8_address():
    rcpt = FailedRecipient("jürgen+x@bücher.example", "5.1.1", None, None,
                           original_recipient="Jürgen@bücher.example")
    part = status_part(dsn((rcpt,)))
    assert part.isascii()
    assert b"Final-Recipient: utf-8; j\\x{FC}rgen\\x{2B}x@b\\x{FC}cher.example\r\n" in part
    assert b"Original-Recipient: utf-8; J\\x{FC}rgen@b\\x{FC}cher.example\r\n" in part


def test_long_diagnostic_is_folded_at_whitespace():
    words = " ".join(f"word{i:03d}" for i in range(300))  # about 2400 characters
    rcpt = FailedRecipient("bob@corp.example", "5.7.1", f"550 5.7.1 {words}", None)
    raw = dsn((rcpt,))
    assert all(len(line) <= 998 for line in lines(raw))
    part = status_part(raw).split(b"\r\n")[:-1]
    start = next(i for i, line in enumerate(part) if line.startswith(b"Diagnostic-Code:"))
    folded = part[start:]
    assert len(folded) > 20
    assert all(len(line) <= 78 for line in folded)
    assert all(line.startswith(b" ") and line.strip() for line in folded[1:])
    unfolded = b"".join(folded).decode()  # RFC 5322 unfolding: remove the CRLFs
    assert unfolded == f"Diagnostic-Code: smtp; 550 5.7.1 {words}"
    message = email.message_from_bytes(raw, policy=policy.default)
    (_, group) = list(message.iter_parts())[1].get_payload()
    assert group["Diagnostic-Code"] == f"smtp; 550 5.7.1 {words}"


def test_unfoldable_diagnostic_is_truncated_at_900():
    blob = "x" * 5000
    rcpt = FailedRecipient("bob@corp.example", "5.7.1", f"550 5.7.1 {blob} tail", None)
    raw = dsn((rcpt,))
    assert all(len(line) <= 998 for line in lines(raw))
    (long_line,) = [line for line in lines(raw) if line.startswith(b" xxxx")]
    assert len(long_line) == 903 and long_line.endswith(b"...")
    assert b"\r\n tail\r\n" in raw  # what follows the long word survives


def test_long_lines_everywhere_stay_under_998_octets():
    long_host = "h" * 1500
    rcpt = FailedRecipient("b" * 1200 + "@corp.example", "5.1.1", "ü" * 2000, long_host,
                           original_recipient="o" * 1200)
    raw = dsn((rcpt,), sender="s" * 1200, reporting_mta=long_host, envelope_id="e" * 1200,
              original_headers=b"X-Long: " + b"y" * 3000 + b"\r\n")
    assert all(len(line) <= 998 for line in lines(raw))
    message = email.message_from_bytes(raw)
    assert len(message.get_payload()) == 3


def test_original_headers_are_normalised_to_crlf_and_never_include_the_body():
    raw = dsn(original_headers=b"A: 1\nB: 2\rC: 3\r\n\r\nbody text\r\n")
    part = raw.split(b"Content-Type: text/rfc822-headers\r\n\r\n")[1]
    assert part == (b"A: 1\r\nB: 2\r\nC: 3\r\n"
                    b"\r\n--018BCFE5680A1B2C3.1700003600/mx.relay.example--\r\n")
    assert b"body text" not in raw


def test_non_ascii_original_headers_are_declared_8bit():
    raw = dsn(original_headers="Subject: Grüße\r\n".encode())
    assert (b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + "Subject: Grüße\r\n".encode()) in raw


def test_boundary_in_the_content_gets_a_different_boundary():
    default = "018BCFE5680A1B2C3.1700003600/mx.relay.example"
    raw = dsn(original_headers=f"--{default}\r\nX: 1\r\n".encode())
    message = email.message_from_bytes(raw)
    assert message.get_boundary() == default + "=1"
    assert len(message.get_payload()) == 3
    assert message.get_payload()[2].get_payload() == f"--{default}\r\nX: 1\r\n"


def test_explicit_boundary_is_used_and_checked():
    raw = dsn(boundary="b0und4ry")
    assert b'boundary="b0und4ry"' in raw and raw.endswith(b"\r\n--b0und4ry--\r\n")
    with pytest.raises(ValueError):
        dsn(boundary="with space")
    with pytest.raises(ValueError):
        dsn(boundary="x" * 71)
    with pytest.raises(ValueError):
        dsn(boundary="Subject", original_headers=b"--Subject: x\r\n")


def test_default_boundary_is_valid_for_odd_host_names():
    raw = dsn(reporting_mta="[192.0.2.1]", queue_id="Q" * 80)
    boundary = email.message_from_bytes(raw).get_boundary()
    assert len(boundary) <= 70
    assert "[" not in boundary and "]" not in boundary


def test_arguments_are_validated():
    with pytest.raises(ValueError):
        dsn(())
    with pytest.raises(ValueError):
        dsn((FailedRecipient("b@c.example", "2.0.0", None, None, action="expanded"),))


def test_should_bounce_only_the_null_sender_is_exempt():
    assert should_bounce("") is False
    assert should_bounce("alice@sender.example") is True
    assert should_bounce("MAILER-DAEMON@other.example") is True  # an ordinary address here


STATUS_FIELDS = {b"Original-Envelope-Id", b"Reporting-MTA", b"Arrival-Date", b"X-Relaygw-Queue-ID",
                 b"Original-Recipient", b"Final-Recipient", b"Action", b"Status", b"Remote-MTA",
                 b"Diagnostic-Code"}
any_text = st.text(st.characters(codec="utf-8"), max_size=1500)


@settings(max_examples=150, deadline=None)
@given(address=any_text, diagnostic=any_text, remote=any_text, orcpt=any_text, sender=any_text,
       envid=any_text, headers=st.binary(max_size=3000))
def test_any_input_gives_a_well_formed_dsn(address, diagnostic, remote, orcpt, sender, envid,
                                           headers):
    rcpt = FailedRecipient(address, "5.1.1", diagnostic or None, remote or None,
                           original_recipient=orcpt or None)
    raw = dsn((rcpt, BOB), sender=sender, envelope_id=envid or None, original_headers=headers)
    assert all(len(line) <= 998 for line in lines(raw))
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    part = status_part(raw)
    assert part.isascii()
    for line in part.split(b"\r\n"):  # every line is a known field, a fold, or a separator
        assert line == b"" or line.startswith(b" ") or line.split(b":")[0] in STATUS_FIELDS
    header = raw.split(b"\r\n\r\n")[0]
    names = [line.split(b":")[0] for line in header.split(b"\r\n") if not line.startswith(b" ")]
    assert names == [b"From", b"To", b"Subject", b"Date", b"Message-ID", b"Auto-Submitted",
                     b"MIME-Version", b"Content-Type"]
    message = email.message_from_bytes(raw)
    assert message.get_content_type() == "multipart/report"
    parts = message.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert len(parts[1].get_payload()) == 3


# -- the attached headers (extracted by the spool's content: tests/queue/test_content.py) ------


def test_extracted_headers_feed_the_dsn(tmp_path):
    prefix, content = b"SPOOL HEADER\n", HEADERS + b"\r\nsecret body\r\n"
    path = tmp_path / "message"
    path.write_bytes(prefix + content)
    stored = SpoolContent(str(path), len(prefix), len(content), run=None)
    raw = dsn(original_headers=stored.read_headers())
    assert b"Subject: test\r\n" in raw and b"secret body" not in raw


def test_our_own_diagnostics_are_not_labelled_smtp():
    admin = "5.0.0 returned to sender by the mail administrator"
    dsn = build_dsn(reporting_mta="relay.test", envelope_id=None, queue_id="Q1",
                    sender="a@b.example", arrival=0.0, now=60.0, message_id_domain="relay.test",
                    original_headers=b"",
                    recipients=[FailedRecipient("x@y.example", "5.0.0", admin, None),
                                FailedRecipient("z@y.example", "5.1.1", "550 5.1.1 No such user",
                                                "mx.y.example")])
    assert b"Diagnostic-Code: x-relaygw; 5.0.0 returned to sender by the mail administrator" in dsn
    assert b"Diagnostic-Code: smtp; 550 5.1.1 No such user" in dsn


# -- success notices, delay warnings and RET=FULL (RFC 3461) ------------------------------------

DELIVERED_BOB = FailedRecipient("bob@corp.example", "2.0.0", None, None, action="delivered",
                                original_recipient="Bob@corp.example")
RELAYED_CAROL = FailedRecipient("carol@other.example", "2.0.0", "250 2.0.0 Ok: queued as 4XyZ",
                                "mx.other.example", action="relayed")
SUCCESS_GOLDEN_TEXT = (
    b"This is the mail system at host mx.relay.example.\r\n"
    b"\r\n"
    b"Your message was delivered to the recipients listed below. Where it was\r\n"
    b"relayed to a system that does not report delivery, you may still receive\r\n"
    b"notices of delivery errors from other systems.\r\n"
    b"\r\n"
    b"<bob@corp.example>: delivered to the mailbox\r\n"
    b"\r\n"
    b"<carol@other.example>: relayed to a system that does not report delivery:\r\n"
    b"    host mx.other.example said: 250 2.0.0 Ok: queued as 4XyZ\r\n"
)
SUCCESS_GOLDEN_STATUS = (
    b"Original-Envelope-Id: QQ314159\r\n"
    b"Reporting-MTA: dns; mx.relay.example\r\n"
    b"Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"X-Relaygw-Queue-ID: 018BCFE5680A1B2C3\r\n"
    b"\r\n"
    b"Original-Recipient: rfc822; Bob@corp.example\r\n"
    b"Final-Recipient: rfc822; bob@corp.example\r\n"
    b"Action: delivered\r\n"
    b"Status: 2.0.0\r\n"
    b"\r\n"
    b"Final-Recipient: rfc822; carol@other.example\r\n"
    b"Action: relayed\r\n"
    b"Status: 2.0.0\r\n"
    b"Remote-MTA: dns; mx.other.example\r\n"
    b"Diagnostic-Code: smtp; 250 2.0.0 Ok: queued as 4XyZ\r\n"
)


def report(raw: bytes):
    """The parsed DSN: (message, per-message fields, [per-recipient fields], returned part)."""
    message = email.message_from_bytes(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, returned = message.get_payload()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    return message, per_message, per_recipient, returned


def third_part(raw: bytes) -> tuple[bytes, bytes]:
    """The returned part's own header lines and its exact bytes, cut from the raw DSN."""
    boundary = email.message_from_bytes(raw).get_boundary().encode()
    part = raw.split(b"\r\n--" + boundary)[3]
    head, _, body = part.partition(b"\r\n\r\n")
    return head.lstrip(b"\r\n"), body


def test_success_report_for_a_delivered_and_a_relayed_recipient():
    raw = dsn((DELIVERED_BOB, RELAYED_CAROL), envelope_id="QQ314159")
    assert b"\r\nSubject: Successful Mail Delivery Report\r\n" in raw
    assert b"\r\n\r\n" + SUCCESS_GOLDEN_TEXT + b"\r\n--" in raw
    assert status_part(raw) == SUCCESS_GOLDEN_STATUS
    message, per_message, (bob, carol), returned = report(raw)
    assert message["Auto-Submitted"] == "auto-replied"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert (bob["Action"], bob["Status"], bob["Original-Recipient"]) == (
        "delivered", "2.0.0", "rfc822; Bob@corp.example")
    assert bob["Remote-MTA"] is None and bob["Diagnostic-Code"] is None
    assert (carol["Action"], carol["Status"], carol["Remote-MTA"]) == (
        "relayed", "2.0.0", "dns; mx.other.example")
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned.get_payload() == HEADERS.decode()


def test_delay_warning_carries_will_retry_until_and_the_last_attempt():
    delayed = FailedRecipient("bob@corp.example", "4.4.1", "connection refused",
                              "mx.corp.example", action="delayed", last_attempt=1700003500.0,
                              will_retry_until=1700432000.0)
    raw = dsn((delayed,))
    assert status_part(raw).endswith(
        b"Final-Recipient: rfc822; bob@corp.example\r\n"
        b"Action: delayed\r\n"
        b"Status: 4.4.1\r\n"
        b"Remote-MTA: dns; mx.corp.example\r\n"
        b"Diagnostic-Code: x-relaygw; connection refused\r\n"
        b"Last-Attempt-Date: Tue, 14 Nov 2023 23:11:40 +0000\r\n"
        b"Will-Retry-Until: Sun, 19 Nov 2023 22:13:20 +0000\r\n")
    message, _, (bob,), returned = report(raw)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert (bob["Action"], bob["Status"]) == ("delayed", "4.4.1")
    assert bob["Will-Retry-Until"] == "Sun, 19 Nov 2023 22:13:20 +0000"
    assert returned.get_content_type() == "text/rfc822-headers"


@pytest.mark.parametrize("action,given,shown", [
    ("delivered", "5.1.1", "2.0.0"), ("relayed", "4.4.1", "2.0.0"), ("delayed", "5.1.1", "4.0.0"),
    ("delivered", "2.1.5", "2.1.5"), ("failed", "4.4.7", "4.4.7")])
def test_status_matches_the_class_of_the_action(action, given, shown):
    raw = dsn((FailedRecipient("b@corp.example", given, None, None, action=action),))
    assert f"Action: {action}\r\nStatus: {shown}\r\n".encode() in status_part(raw)


FULL = (b"Received: from client.example ([127.0.0.1])\r\n\tby relay.test; Tue, 14 Nov 2023\r\n"
        + HEADERS + b"\r\nbody line 1\r\n.\r\n..dots stay as stored\r\nlast\r\n")


def test_ret_full_returns_the_whole_message_as_message_rfc822_byte_for_byte():
    raw = dsn(returned_message=FULL)
    head, body = third_part(raw)
    assert head == b"Content-Type: message/rfc822"
    assert body == FULL
    assert b"your message is attached." in raw
    _, _, (bob,), returned = report(raw)
    assert bob["Action"] == "failed"
    assert returned.get_content_type() == "message/rfc822"
    (inner,) = returned.get_payload()
    assert inner["Subject"] == "test"
    assert inner.get_payload() == "body line 1\r\n.\r\n..dots stay as stored\r\nlast\r\n"


def test_ret_full_with_8bit_content_is_declared_8bit():
    message = "Subject: Grüße\r\n\r\nSchöne Grüße\r\n".encode()
    head, body = third_part(dsn(returned_message=message))
    assert head == b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit"
    assert body == message


def test_returned_message_without_a_final_line_end_gets_one():
    head, body = third_part(dsn(returned_message=b"Subject: x\r\n\r\nno end"))
    assert body == b"Subject: x\r\n\r\nno end\r\n"


def test_returned_message_holding_the_boundary_changes_the_boundary():
    default = "018BCFE5680A1B2C3.1700003600/mx.relay.example"
    message = f"Subject: a forwarded DSN\r\n\r\n--{default}\r\nX: 1\r\n".encode()
    raw = dsn(returned_message=message)
    assert email.message_from_bytes(raw).get_boundary() == default + "=1"
    assert third_part(raw)[1] == message


def test_message_too_big_to_return_gets_its_header_and_says_so():
    raw = dsn(too_big_to_return=10485760)
    head, body = third_part(raw)
    assert head == b"Content-Type: text/rfc822-headers"
    assert body == HEADERS
    assert (b"are listed below, and your message is larger than 10485760 bytes, so only\r\n"
            b"its header is attached.\r\n") in raw
