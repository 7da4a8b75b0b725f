"""The inbound ESMTP protocol over an in-memory transport: every rule, exact replies."""

from __future__ import annotations

import re

from twisted.internet.defer import fail

from relaygw.queue.store import SpoolError
from relaygw.smtp.replies import Reply
from tests.smtp.conftest import SlowPolicy

MESSAGE = "Subject: hi\r\n\r\nHello\r\n.\r\n"


def codes(lines):
    return [line[:3] for line in lines]


def transaction(session, rcpt="bob@relay.example", body=MESSAGE, sender="alice@client.example"):
    return session.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n") + \
        session.send(body)


# -- greeting and EHLO ---------------------------------------------------------

def test_greeting_names_the_host(harness):
    s = harness.connect()
    assert s.greeting == ["220 relay.test ESMTP relaygw"]


def test_ehlo_advertises_extensions_and_starttls_but_not_auth_before_tls(harness):
    s = harness.connect()
    assert s.ehlo() == [
        "250-relay.test Hello client.example [127.0.0.1]",
        "250-SIZE 10000",
        "250-8BITMIME",
        "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES",
        "250-SMTPUTF8",
        "250-DSN",
        "250 STARTTLS",
    ]


def test_ehlo_without_tls_listener_does_not_offer_starttls(harness):
    s = harness.connect(tls_mode="none", tls_options=None)
    assert s.ehlo()[-2:] == ["250-SMTPUTF8", "250 DSN"]
    assert s.send("STARTTLS\r\n") == ["502 5.5.1 STARTTLS not available on this port"]


def test_helo_answers_plain_250(harness):
    s = harness.connect()
    assert s.send("HELO client.example\r\n") == ["250 relay.test"]


def test_empty_and_malformed_helo_are_refused(harness):
    s = harness.connect()
    assert s.send("EHLO\r\n") == ["501 5.5.4 HELO/EHLO requires a domain name"]
    assert s.send("HELO bad host\r\n") == ["501 5.5.4 Invalid HELO/EHLO argument"]


def test_mail_before_helo_is_out_of_sequence(harness):
    s = harness.connect()
    assert s.send("MAIL FROM:<a@b.example>\r\n") == ["503 5.5.1 Send HELO/EHLO first"]


# -- a whole transaction -------------------------------------------------------

def test_message_is_queued_with_received_header_and_unstuffed_body(harness):
    s = harness.connect()
    s.ehlo()
    replies = transaction(s, body="Subject: hi\r\n\r\n..leading dot\r\nend\r\n.\r\n")
    assert replies[:3] == ["250 2.1.0 Sender <alice@client.example> OK",
                           "250 2.1.5 Recipient <bob@relay.example> OK",
                           "354 End data with <CR><LF>.<CR><LF>"]
    m = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)", replies[3])
    assert m, replies
    queue_id = m.group(1)
    assert harness.queue_files() == [queue_id]
    data = harness.message(queue_id)
    header, _, rest = data.partition(b"\r\nSubject:")
    assert header.startswith(b"Received: from client.example ([127.0.0.1])\r\n"
                             b"\tby relay.test (relaygw) with ESMTP id " + queue_id.encode())
    assert b"\tfor <bob@relay.example>; " in header
    assert rest == b" hi\r\n\r\n.leading dot\r\nend\r\n"
    stored = harness.spool._load(queue_id)
    assert stored.envelope.sender == "alice@client.example"
    assert [r.address for r in stored.envelope.recipients] == ["bob@relay.example"]
    assert stored.envelope.helo == "client.example"
    assert [m.envelope.queue_id for m in harness.queued] == [queue_id]
    assert harness.queued[0].content_offset == stored.content_offset
    assert harness.queued[0].size == stored.size


def test_pipelined_commands_are_answered_in_order(harness):
    s = harness.connect()
    replies = s.send("EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<x@relay.example>\r\n"
                     "RCPT TO:<y@relay.example>\r\nDATA\r\n")
    assert codes(replies) == ["250"] * 8 + ["250", "250", "250", "354"]
    replies = s.send("Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert codes(replies) == ["250", "221"]
    assert s.closed


def test_null_sender_is_accepted(harness):
    s = harness.connect()
    s.ehlo()
    assert s.send("MAIL FROM:<>\r\n") == ["250 2.1.0 Sender <> OK"]


def test_second_mail_needs_rset(harness):
    s = harness.connect()
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\n")
    assert s.send("MAIL FROM:<a@c.example>\r\n") == ["503 5.5.1 Sender already specified"]
    assert s.send("RSET\r\n") == ["250 2.0.0 OK"]
    assert s.send("MAIL FROM:<a@c.example>\r\n") == ["250 2.1.0 Sender <a@c.example> OK"]


def test_rcpt_and_data_out_of_sequence(harness):
    s = harness.connect()
    s.ehlo()
    assert s.send("RCPT TO:<b@relay.example>\r\n") == ["503 5.5.1 Need MAIL command first"]
    assert s.send("DATA\r\n") == ["503 5.5.1 Need MAIL command first"]
    s.send("MAIL FROM:<a@c.example>\r\n")
    assert s.send("DATA\r\n") == ["554 5.5.1 No valid recipients"]


def test_body_sent_behind_a_refused_data_is_never_run_as_commands(harness):
    s = harness.connect()
    s.ehlo()
    replies = s.send("MAIL FROM:<a@c.example>\r\nDATA\r\nRSET\r\nMAIL FROM:<evil@x.example>\r\n")
    assert replies == ["250 2.1.0 Sender <a@c.example> OK",
                       "554 5.5.1 No valid recipients",
                       "554 5.5.0 SMTP protocol synchronization error"]
    assert s.closed
    assert harness.queue_files() == []


def test_small_commands(harness):
    s = harness.connect()
    assert s.send("NOOP\r\n") == ["250 2.0.0 OK"]
    assert s.send("VRFY bob\r\n") == [
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"]
    assert s.send("HELP\r\n") == [
        "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT STARTTLS AUTH VRFY HELP"]
    assert s.send("EXPN list\r\n") == ["502 5.5.1 EXPN not available"]
    assert s.send("FOO\r\n") == ["500 5.5.2 Command not recognized"]
    assert s.send("RSET x\r\n") == ["501 5.5.4 Syntax error in parameters or arguments"]
    assert s.send("QUIT\r\n") == ["221 2.0.0 Bye"]
    assert s.closed


def test_duplicate_recipients_are_stored_once(harness):
    s = harness.connect()
    s.ehlo()
    replies = s.send("MAIL FROM:<a@c.example>\r\nRCPT TO:<b@relay.example>\r\n"
                     "RCPT TO:<b@relay.example>\r\nDATA\r\n" + MESSAGE)
    assert codes(replies) == ["250", "250", "250", "354", "250"]
    (queue_id,) = harness.queue_files()
    assert len(harness.spool._load(queue_id).envelope.recipients) == 1


# -- framing ------------------------------------------------------------------

def test_bare_lf_in_data_rejects_the_message_and_keeps_the_session(harness):
    s = harness.connect()
    s.ehlo()
    replies = transaction(s, body="Subject: x\r\n\r\nline\n.\nMAIL FROM:<evil@x>\r\n.\r\n")
    assert replies[-1] == "550 5.5.2 Message contains bare CR or LF characters"
    assert harness.queue_files() == []
    assert codes(transaction(s)) == ["250", "250", "354", "250"]


def test_bare_cr_in_data_rejects_the_message(harness):
    s = harness.connect()
    s.ehlo()
    replies = transaction(s, body="Subject: x\r\n\r\nline\r.\rmore\r\n.\r\n")
    assert replies[-1] == "550 5.5.2 Message contains bare CR or LF characters"
    assert harness.queue_files() == []


def test_bare_newlines_are_normalized_when_configured(harness):
    s = harness.connect(normalize_bare_newlines=True)
    s.ehlo()
    replies = transaction(s, body="Subject: x\r\n\r\na\nb\rc\r\n.\r\n")
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    (queue_id,) = harness.queue_files()
    assert harness.message(queue_id).endswith(b"\r\nSubject: x\r\n\r\na\r\nb\r\nc\r\n")


def test_bare_lf_in_a_command_is_refused(harness):
    s = harness.connect()
    assert s.send("NOOP\nQUIT\r\n") == ["500 5.5.2 Bare CR or LF in command"]
    assert s.send("HELO a\rb\r\n") == ["500 5.5.2 Bare CR or LF in command"]
    assert not s.closed


def test_command_line_over_512_octets_is_refused_and_session_stays_in_sync(harness):
    s = harness.connect()
    assert s.send("NOOP " + "x" * 505 + "\r\n") == ["250 2.0.0 OK"]  # exactly 512 octets
    assert s.send("NOOP " + "x" * 506 + "\r\n") == ["500 5.5.2 Line too long"]
    assert s.send("NOOP\r\n") == ["250 2.0.0 OK"]


def test_endless_line_keeps_memory_bounded(harness):
    s = harness.connect()
    for _ in range(100):
        assert s.send(b"A" * 65536) == []
        assert len(s.proto._buffer) <= 1
    assert s.send("\r\nNOOP\r\n") == ["500 5.5.2 Line too long", "250 2.0.0 OK"]


def test_message_over_the_size_limit_is_read_to_its_end_then_refused(harness):
    s = harness.connect()
    s.ehlo()
    body = "Subject: big\r\n\r\n" + ("y" * 98 + "\r\n") * 200 + ".\r\n"
    replies = transaction(s, body=body)
    assert replies[-1] == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert harness.queue_files() == []
    assert list(harness.spool.tmp_dir.iterdir()) == []
    assert s.send("NOOP\r\n") == ["250 2.0.0 OK"]


def test_over_long_data_line_is_refused_after_the_end(harness):
    s = harness.connect()
    s.ehlo()
    replies = transaction(s, body="Subject: x\r\n\r\n" + "z" * 999 + "\r\nRSET\r\n.\r\n")
    assert replies[-1] == "500 5.5.2 Message contains a line longer than 1000 octets"
    assert harness.queue_files() == []


def test_data_line_up_to_the_configured_cap_is_accepted_and_stored_within_998(harness):
    s = harness.connect(max_line_length=4096)
    s.ehlo()
    line = "z" * 4094  # 4096 octets with its CRLF
    replies = transaction(s, body="Subject: x\r\n\r\n" + line + "\r\n.\r\n")
    queue_id = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)", replies[-1]).group(1)
    stored = harness.message(queue_id)
    assert max(map(len, stored.split(b"\r\n"))) <= 998
    assert b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" in stored


def test_data_line_over_the_configured_cap_is_refused_after_the_end(harness):
    s = harness.connect(max_line_length=4096)
    s.ehlo()
    replies = transaction(s, body="Subject: x\r\n\r\n" + "z" * 4095 + "\r\nRSET\r\n.\r\n")
    assert replies[-1] == "500 5.5.2 Message contains a line longer than 4096 octets"
    assert harness.queue_files() == []
    assert s.send("NOOP\r\n") == ["250 2.0.0 OK"]


def test_declared_size_over_the_limit_is_refused_at_mail(harness):
    s = harness.connect()
    s.ehlo()
    assert s.send("MAIL FROM:<a@c.example> SIZE=10001\r\n") == [
        "552 5.3.4 Message size exceeds fixed maximum message size"]
    assert s.send("MAIL FROM:<a@c.example> SIZE=10000\r\n") == [
        "250 2.1.0 Sender <a@c.example> OK"]


def test_unknown_mail_parameter(harness):
    s = harness.connect()
    s.ehlo()
    assert s.send("MAIL FROM:<a@c.example> FOO=BAR\r\n") == [
        "555 5.5.4 Unsupported parameter FOO"]


# -- limits -------------------------------------------------------------------

def test_recipients_past_the_limit_get_452(harness):
    s = harness.connect()
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\n")
    replies = s.send("".join(f"RCPT TO:<u{i}@relay.example>\r\n" for i in range(6)))
    assert codes(replies) == ["250"] * 5 + ["452"]
    assert replies[-1] == "452 4.5.3 Too many recipients"


def test_too_many_received_headers_is_a_loop(harness):
    s = harness.connect()
    s.ehlo()
    body = "Received: a\r\nReceived: b\r\nreceived: c\r\nRECEIVED : d\r\n\r\nx\r\n.\r\n"
    assert transaction(s, body=body)[-1] == "554 5.4.6 Too many hops (mail loop?)"
    assert harness.queue_files() == []
    body = "Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nReceived: in body\r\n.\r\n"
    assert transaction(s, body=body)[-1].startswith("250 2.0.0 Ok: queued as ")


def test_idle_timeout_closes_with_421(harness):
    s = harness.connect()
    harness.clock.advance(299)
    assert s.take() == []
    harness.clock.advance(1)
    assert s.take() == ["421 4.4.2 Idle timeout, closing connection"]
    assert s.closed


def test_trickled_bytes_do_not_extend_the_idle_timeout(harness):
    s = harness.connect()
    seen = []
    for _ in range(30):
        harness.clock.advance(10)
        seen += s.send(b"N")
    assert seen == ["421 4.4.2 Idle timeout, closing connection"]
    assert s.closed


def test_too_many_errors_closes_the_session(harness):
    s = harness.connect(max_errors=3)
    assert s.send("FOO\r\nBAR\r\n") == ["500 5.5.2 Command not recognized"] * 2
    assert s.send("BAZ\r\n") == ["500 5.5.2 Command not recognized",
                                 "421 4.7.0 Too many errors, closing connection"]
    assert s.closed


def test_per_client_connection_cap_answers_421_and_others_are_still_served(harness):
    factory = harness.factory()
    sessions = [harness.session(factory, "192.0.2.1") for _ in range(3)]
    assert all(s.greeting == ["220 relay.test ESMTP relaygw"] for s in sessions)
    fourth = harness.session(factory, "192.0.2.1")
    assert fourth.greeting == ["421 4.7.0 Too many connections from your address"]
    assert fourth.closed
    other = harness.session(factory, "192.0.2.2")
    assert other.greeting == ["220 relay.test ESMTP relaygw"]
    sessions[0].proto.connectionLost(None)
    assert harness.session(factory, "192.0.2.1").greeting == ["220 relay.test ESMTP relaygw"]


def test_total_connection_cap_answers_421(harness):
    factory = harness.factory()
    for i in range(10):
        assert harness.session(factory, f"192.0.2.{i}").greeting[0].startswith("220 ")
    last = harness.session(factory, "192.0.2.200")
    assert last.greeting == ["421 4.7.0 Too many connections, try again later"]
    assert last.closed


# -- relaying -----------------------------------------------------------------

def test_untrusted_client_may_send_to_relay_domains_only(harness):
    s = harness.connect(client_ip="192.0.2.7")
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\n")
    assert s.send("RCPT TO:<b@relay.example>\r\n") == ["250 2.1.5 Recipient <b@relay.example> OK"]
    assert s.send("RCPT TO:<b@elsewhere.example>\r\n") == ["554 5.7.1 Relay access denied"]
    assert s.send("RCPT TO:<b%elsewhere.example@relay.example>\r\n") == [
        "554 5.7.1 Routing characters in local part not allowed"]


def test_trusted_client_may_relay_anywhere(harness):
    s = harness.connect(client_ip="127.0.0.9")
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\n")
    assert s.send("RCPT TO:<b@elsewhere.example>\r\n") == [
        "250 2.1.5 Recipient <b@elsewhere.example> OK"]


def test_address_with_control_characters_is_refused(harness):
    s = harness.connect()
    s.ehlo()
    assert s.send("MAIL FROM:<a\x00b@c.example>\r\n") == [
        "501 5.1.7 Invalid characters in sender address"]


def test_free_space_below_the_margin_answers_452_at_mail(harness):
    harness.min_free_space = 10 ** 18
    s = harness.connect()
    s.ehlo()
    assert s.send("MAIL FROM:<a@c.example>\r\n") == [
        "452 4.3.1 Insufficient system storage, try again later"]


# -- asynchronous checks keep replies in order -----------------------------------

def test_replies_wait_for_a_pending_check_and_reading_pauses(harness):
    factory = harness.factory()
    factory.policy = SlowPolicy()
    s = harness.session(factory)
    s.ehlo()
    replies = s.send("MAIL FROM:<a@c.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n"
                     "Subject: x\r\n\r\nbody\r\n.\r\n")
    assert replies == ["250 2.1.0 Sender <a@c.example> OK"]
    assert s.transport.producerState == "paused"
    factory.policy.pending[0].callback(None)
    replies = s.take()
    assert codes(replies) == ["250", "354", "250"]
    assert s.transport.producerState == "producing"


def test_refusing_check_answers_its_own_reply(harness):
    factory = harness.factory()
    factory.policy = SlowPolicy()
    s = harness.session(factory)
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\nRCPT TO:<b@x.example>\r\nNOOP\r\n")
    factory.policy.pending[0].callback(Reply(550, "5.1.1", "No such user"))
    assert s.take() == ["550 5.1.1 No such user", "250 2.0.0 OK"]


# -- spool faults -------------------------------------------------------------

def test_spool_write_failure_answers_451_never_5xx(harness, monkeypatch):
    s = harness.connect()
    s.ehlo()
    monkeypatch.setattr("relaygw.queue.store.MessageWriter.commit",
                        lambda self: fail(SpoolError("fsync: I/O error")))
    assert transaction(s)[-1] == "451 4.3.0 Temporary local problem, try again later"


def test_disk_full_answers_452(harness, monkeypatch):
    s = harness.connect()
    s.ehlo()
    monkeypatch.setattr("relaygw.queue.store.MessageWriter.commit",
                        lambda self: fail(SpoolError("No space left", no_space=True)))
    assert transaction(s)[-1] == "452 4.3.1 Insufficient system storage, try again later"


def test_client_leaving_mid_data_leaves_nothing_behind(harness):
    s = harness.connect()
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\nRCPT TO:<b@relay.example>\r\nDATA\r\nSubject: x\r\n")
    s.proto.connectionLost(None)
    assert harness.queue_files() == []
    assert list(harness.spool.tmp_dir.iterdir()) == []


# -- STARTTLS -----------------------------------------------------------------

def test_starttls_discards_pipelined_plaintext_and_resets_state(harness):
    s = harness.connect()
    s.ehlo()
    replies = s.send("STARTTLS\r\nMAIL FROM:<injected@x.example>\r\n")
    assert replies == ["220 2.0.0 Ready to start TLS"]
    assert s.transport.tls_options is harness.settings.tls_options
    assert s.send("MAIL FROM:<a@c.example>\r\n") == ["503 5.5.1 Send HELO/EHLO first"]
    ehlo = s.ehlo()
    assert "250-STARTTLS" not in ehlo and "250 STARTTLS" not in ehlo
    assert ehlo[-1] == "250 AUTH PLAIN LOGIN"
    assert s.send("STARTTLS\r\n") == ["503 5.5.1 TLS already active"]


def test_starttls_with_arguments_is_refused(harness):
    s = harness.connect()
    s.ehlo()
    assert s.send("STARTTLS now\r\n") == ["501 5.5.4 STARTTLS takes no arguments"]


def test_starttls_without_a_certificate_answers_454(harness):
    s = harness.connect(tls_options=None)
    assert s.send("STARTTLS\r\n") == ["454 4.7.0 TLS not available due to temporary reason"]


def test_require_tls_refuses_mail_before_starttls(harness):
    s = harness.connect(require_tls=True)
    s.ehlo()
    assert s.send("MAIL FROM:<a@c.example>\r\n") == [
        "530 5.7.0 Must issue a STARTTLS command first"]


# -- AUTH -----------------------------------------------------------------------

def tls_session(harness, **settings):
    s = harness.connect(**settings)
    s.ehlo()
    s.send("STARTTLS\r\n")
    s.ehlo()
    return s


def test_auth_before_tls_is_refused(harness):
    s = harness.connect()
    s.ehlo()
    assert s.send("AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n") == [
        "538 5.7.11 Encryption required for requested authentication mechanism"]


def test_auth_plain_after_tls_succeeds_and_lets_the_client_relay(harness):
    s = tls_session(harness)
    assert s.send("AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n") == ["235 2.7.0 Authentication successful"]
    assert s.send("AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n") == ["503 5.5.1 Already authenticated"]


def raw(session, data: str) -> bytes:
    """What the server wrote in answer to ``data``, byte for byte."""
    session.proto.dataReceived(data.encode())
    out = session.transport.value()
    session.transport.clear()
    return out


def test_auth_login_flow(harness):
    s = tls_session(harness)
    assert raw(s, "AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert raw(s, "YWxpY2U=\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert raw(s, "czNjcmV0\r\n") == b"235 2.7.0 Authentication successful\r\n"
    assert s.proto._session.auth_user == "alice"


def test_auth_plain_without_initial_response_gets_an_empty_challenge_with_its_space(harness):
    # RFC 4954 4: continue-req = "334" SP [base64] CRLF. s-nail waits for the space.
    s = tls_session(harness)
    assert raw(s, "AUTH PLAIN\r\n") == b"334 \r\n"
    assert raw(s, "AGFsaWNlAHMzY3JldA==\r\n") == b"235 2.7.0 Authentication successful\r\n"
    assert s.proto._session.auth_user == "alice"


def test_two_step_plain_with_a_wrong_password_and_cancelled_exchanges(harness):
    s = tls_session(harness)
    assert raw(s, "AUTH PLAIN\r\n") == b"334 \r\n"
    assert raw(s, "*\r\n") == b"501 5.7.0 Authentication cancelled\r\n"
    assert raw(s, "AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert raw(s, "*\r\n") == b"501 5.7.0 Authentication cancelled\r\n"
    assert raw(s, "AUTH PLAIN\r\n") == b"334 \r\n"
    assert raw(s, "AGFsaWNlAHdyb25n\r\n") == b""  # answered after the failure delay
    harness.clock.advance(1)
    assert s.transport.value() == b"535 5.7.8 Authentication credentials invalid\r\n"


def test_wrong_password_is_answered_after_a_delay_and_three_failures_close(harness):
    s = tls_session(harness)
    bad = "AUTH PLAIN AGFsaWNlAHdyb25n\r\n"
    assert s.send(bad) == []
    harness.clock.advance(1)
    assert s.take() == ["535 5.7.8 Authentication credentials invalid"]
    s.send(bad)
    harness.clock.advance(1)
    assert s.take() == ["535 5.7.8 Authentication credentials invalid"]
    assert s.send(bad) == ["421 4.7.0 Too many authentication failures"]
    assert s.closed


def test_auth_inside_a_transaction_is_refused(harness):
    s = tls_session(harness)
    s.send("MAIL FROM:<a@c.example>\r\n")
    assert s.send("AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n") == [
        "503 5.5.1 AUTH not permitted during a mail transaction"]


def test_auth_required_listener_refuses_mail_before_auth(harness):
    s = tls_session(harness, auth_mode="required")
    assert s.send("MAIL FROM:<a@c.example>\r\n") == ["530 5.7.0 Authentication required"]


def test_authenticated_untrusted_client_may_relay(harness):
    s = tls_session(harness, client_ip="192.0.2.9")
    s.send("MAIL FROM:<alice@c.example>\r\n")
    assert s.send("RCPT TO:<x@anywhere.example>\r\n") == ["554 5.7.1 Relay access denied"]
    s.send("RSET\r\n")
    assert s.send("AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n") == ["235 2.7.0 Authentication successful"]
    s.send("MAIL FROM:<alice@c.example>\r\n")
    assert s.send("RCPT TO:<x@anywhere.example>\r\n") == [
        "250 2.1.5 Recipient <x@anywhere.example> OK"]


def test_a_bound_user_may_use_only_its_senders(harness):
    harness.auth = {"senders": {"alice": ["alice@c.example", "*@team.c.example"]}}
    s = tls_session(harness, client_ip="192.0.2.9")
    s.send("AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n")
    assert raw(s, "MAIL FROM:<ceo@c.example>\r\n") == (
        b"553 5.7.1 Sender address <ceo@c.example> not allowed for user alice\r\n")
    assert raw(s, "MAIL FROM:<Alice@C.Example>\r\n") == (
        b"250 2.1.0 Sender <Alice@c.example> OK\r\n")
    s.send("RSET\r\n")
    assert s.send("MAIL FROM:<x@team.c.example>\r\n") == ["250 2.1.0 Sender <x@team.c.example> OK"]
    s.send("RSET\r\n")
    assert s.send("MAIL FROM:<>\r\n") == ["250 2.1.0 Sender <> OK"]


def test_a_user_not_listed_and_an_anonymous_client_may_use_any_sender(harness):
    harness.auth = {"senders": {"bob": ["bob@c.example"]}}
    s = tls_session(harness)
    assert s.send("MAIL FROM:<ceo@c.example>\r\n") == ["250 2.1.0 Sender <ceo@c.example> OK"]
    s.send("RSET\r\n")
    s.send("AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n")
    assert s.send("MAIL FROM:<ceo@c.example>\r\n") == ["250 2.1.0 Sender <ceo@c.example> OK"]


def test_bare_auth_is_a_syntax_error(harness):
    s = tls_session(harness)
    assert s.send("AUTH\r\n") == ["501 5.5.4 Syntax: AUTH mechanism [initial-response]"]


# -- routing at RCPT ------------------------------------------------------------

def test_recipient_without_a_route_is_refused_at_rcpt(harness):
    harness.routes = [{"recipient_domains": ["relay.example"], "action": "mx"}]
    s = harness.connect()
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\n")
    assert s.send("RCPT TO:<b@relay.example>\r\n") == ["250 2.1.5 Recipient <b@relay.example> OK"]
    assert s.send("RCPT TO:<b@other.example>\r\n") == [
        "550 5.1.2 No route to destination for <b@other.example>"]


def test_reject_route_answers_its_configured_reply(harness):
    harness.routes = [{"recipients": ["re:^noreply-"], "action": "reject",
                       "reply": "550 5.1.1 Mailbox unavailable"}, {"action": "mx"}]
    s = harness.connect()
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\n")
    assert s.send("RCPT TO:<noreply-x@relay.example>\r\n") == ["550 5.1.1 Mailbox unavailable"]
    assert s.send("RCPT TO:<reply-x@relay.example>\r\n")[0].startswith("250 ")


def test_aliases_are_expanded_into_the_envelope_with_orcpt(harness):
    harness.aliases = {"postmaster@relay.example": ["ops@corp.example", "noc+x@corp.example"],
                       "@old.example": "@relay.example"}
    s = harness.connect()
    s.ehlo()
    replies = s.send("MAIL FROM:<a@c.example>\r\nRCPT TO:<postmaster@relay.example>\r\n"
                     "RCPT TO:<bob@old.example>\r\nRCPT TO:<ops@corp.example>\r\nDATA\r\n"
                     + MESSAGE)
    assert codes(replies) == ["250", "250", "250", "250", "354", "250"]
    (queue_id,) = harness.queue_files()
    recipients = harness.spool._load(queue_id).envelope.recipients
    assert [(r.address, r.params) for r in recipients] == [
        ("ops@corp.example", {"ORCPT": "rfc822;postmaster@relay.example"}),
        ("noc+x@corp.example", {"ORCPT": "rfc822;postmaster@relay.example"}),
        ("bob@relay.example", {"ORCPT": "rfc822;bob@old.example"}),
    ]


# -- shutdown -------------------------------------------------------------------

def test_shutdown_closes_idle_sessions_and_lets_a_transaction_finish(harness):
    factory = harness.factory()
    idle = harness.session(factory)
    busy = harness.session(factory)
    busy.ehlo()
    busy.send("MAIL FROM:<a@c.example>\r\nRCPT TO:<b@relay.example>\r\n")
    drained = []
    factory.drain(30).addCallback(drained.append)
    assert idle.take() == ["421 4.3.2 Service shutting down, try again later"]
    assert idle.closed
    idle.proto.connectionLost(None)
    assert busy.send("DATA\r\n" + MESSAGE)[-1].startswith("250 2.0.0 Ok: queued as ")
    assert busy.send("MAIL FROM:<a@c.example>\r\n") == [
        "421 4.3.2 Service shutting down, try again later"]
    busy.proto.connectionLost(None)
    assert drained == [None]


def test_sessions_still_open_after_the_grace_period_are_closed(harness):
    factory = harness.factory()
    s = harness.session(factory)
    s.ehlo()
    s.send("MAIL FROM:<a@c.example>\r\nRCPT TO:<b@relay.example>\r\nDATA\r\nSubject: x\r\n")
    drained = []
    factory.drain(30).addCallback(drained.append)
    harness.clock.advance(29)
    assert s.take() == [] and not s.closed
    harness.clock.advance(1)
    assert s.take() == ["421 4.3.2 Service shutting down, try again later"]
    s.proto.connectionLost(None)
    assert drained == [None]
    assert harness.queue_files() == [] and list(harness.spool.tmp_dir.iterdir()) == []
