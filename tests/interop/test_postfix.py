"""relaygw between real Postfix instances: Postfix as its client, and as its smarthost."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.support.postfix import unavailable_reason
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

UNTRUSTED = '[access]\ntrusted_networks = []\nrelay_domains = ["relay.test"]\n'
# Every header Postfix's cleanup would otherwise add is present, so it only prepends Received.
MESSAGE = (b"Date: Sun, 29 Nov 2026 07:00:00 +0000\r\n"
           b"From: Alice <alice@postfix.test>\r\n"
           b"To: Bob <bob@remote.example>\r\n"
           b"Message-ID: <interop-1@postfix.test>\r\n"
           b"Subject: interop =?utf-8?q?=C3=A9t=C3=A9?=\r\n"
           b"X-Folded: first\r\n\tsecond\r\n"
           b"\r\n"
           b"first line\r\n"
           b".starts with a dot\r\n"
           b".\r\n"
           b"..\r\n"
           b"8-bit: \xc3\xa9t\xc3\xa9\r\n"
           b"trailing spaces   \r\n"
           b"\r\n"
           b"last line\r\n")


def listener(daemon, auth: str) -> str:
    return (f'[[listeners]]\naddress = "127.0.0.1:{daemon.port}"\ntls = "starttls"\n'
            f'auth = "{auth}"\n')


def users_file(daemon, cli, name: str, password: str) -> str:
    path = daemon.dir / "users"
    result = cli("passwd", "--file", str(path), name, input=password + "\n")
    assert result.returncode == 0, result.stderr
    return str(path)


def strip_received(content: bytes) -> tuple[list[bytes], bytes]:
    """The leading Received: headers (each with its folded lines), and the rest."""
    received = []
    while content.startswith(b"Received:"):
        end = content.index(b"\n") + 1
        while content[end:end + 1] in (b" ", b"\t"):
            end = content.index(b"\n", end) + 1
        received.append(content[:end])
        content = content[end:]
    return received, content


# nexthop: [127.0.0.1] against the certificate's IP address SAN; relay.test: a literal name
# against its DNS SAN, set in a TLS policy table (the name is never looked up).
@pytest.mark.parametrize("match", ["nexthop", "relay.test"])
def test_postfix_relays_through_relaygw_with_verified_tls_and_auth(daemon, capture, cli,
                                                                   postfix, match):
    sink = capture()
    users = users_file(daemon, cli, "postfix-client", "pf secret 1")
    daemon.start(UNTRUSTED + f'[auth]\nusers_file = "{users}"\n'
                 f'[smarthosts.sink]\nhosts = ["127.0.0.1:{sink.port}"]\ntls = "none"\n'
                 '[[routes]]\naction = "smarthost"\nsmarthost = "sink"\n',
                 listeners=listener(daemon, "required"))
    pf = postfix(relayhost=f"[127.0.0.1]:{daemon.port}", hostname="postfix.test",
                 smtp_tls_security_level="verify", smtp_tls_ca_file=daemon.ca_file(),
                 smtp_tls_match=match,
                 relayhost_auth=("postfix-client", "pf secret 1"))
    pf.sendmail("alice@postfix.test", ["bob@remote.example", "carol@remote.example"], MESSAGE)

    ((mail_from, rcpts, content),) = sink.wait_for(1)
    assert (mail_from, rcpts) == ("alice@postfix.test",
                                  ["bob@remote.example", "carol@remote.example"])
    received, rest = strip_received(content)
    assert rest == MESSAGE  # byte for byte, dots, 8-bit text and folding included
    ours, theirs = received  # relaygw's, then the one Postfix's pickup wrote
    assert ours.startswith(b"Received: from postfix.test ([127.0.0.1])")
    assert b"with ESMTPSA id " in ours and b"(using TLSv1.3 with cipher" in ours
    assert theirs.startswith(b"Received: by postfix.test (Postfix, from userid 0)")
    assert wait_until(pf.queue_empty)

    log = pf.maillog()
    assert re.search(rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:"
                     rf"{daemon.port}: TLSv1\.3", log), log
    assert f"relay=127.0.0.1[127.0.0.1]:{daemon.port}" in log and "status=sent" in log
    assert "pf secret 1" not in log
    assert not re.search(r"(warning|error|fatal|panic):", log), log
    relay_log = daemon.logs()
    assert re.search(r"auth session=[0-9a-f]{12} client=127\.0\.0\.1 user=postfix-client\n",
                     relay_log), relay_log
    assert re.search(r"accepted id=\w+ session=[0-9a-f]{12} from=<alice@postfix\.test> "
                     r"size=\d+ nrcpt=2 message_id=\S+ client=127\.0\.0\.1 "
                     r"tls=TLSv1\.3/\w+ auth=postfix-client\n", relay_log), relay_log


def test_postfix_refuses_relaygw_certificate_for_another_name(daemon, capture, cli, postfix):
    sink = capture()
    users = users_file(daemon, cli, "postfix-client", "pf secret 1")
    daemon.start(UNTRUSTED + f'[auth]\nusers_file = "{users}"\n'
                 f'[smarthosts.sink]\nhosts = ["127.0.0.1:{sink.port}"]\ntls = "none"\n'
                 '[[routes]]\naction = "smarthost"\nsmarthost = "sink"\n',
                 listeners=listener(daemon, "required"))
    pf = postfix(relayhost=f"[127.0.0.1]:{daemon.port}", smtp_tls_security_level="verify",
                 smtp_tls_ca_file=daemon.ca_file(), smtp_tls_match="other.test",
                 relayhost_auth=("postfix-client", "pf secret 1"))
    pf.sendmail("alice@postfix.test", ["bob@remote.example"], MESSAGE)
    wait_until(lambda: "Server certificate not verified" in pf.maillog(),
               what="Postfix to log the unverified certificate", detail=pf.maillog)
    assert wait_until(lambda: "status=deferred" in pf.maillog())
    assert not pf.queue_empty() and sink.messages == []
    assert " auth session=" not in daemon.logs()


# Postfix's smtpd authenticates with Cyrus SASL from a private sasldb (saslpasswd2, Debian
# sasl2-bin); without it, only the STARTTLS case can run.
@pytest.mark.parametrize("auth", [False, True], ids=["starttls", "starttls+auth"])
def test_relaygw_delivers_into_postfix_maildir(daemon, postfix, auth):
    if auth and (reason := unavailable_reason(need_sasl_server=True)) is not None:
        pytest.skip(reason)
    leaf = daemon.ca.issue_cert("postfix.test", "127.0.0.1")
    cert, key = daemon.dir / "postfix-cert.pem", daemon.dir / "postfix-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    sasl = {"smtpd_sasl_users": {"relaygw": "smarthost secret"}, "smtpd_require_auth": True}
    pf = postfix(hostname="postfix.test", smtpd_tls_cert_file=cert, smtpd_tls_key_file=key,
                 virtual_mailboxes=["bob@mail.example", "carol@mail.example"],
                 **(sasl if auth else {}))
    config = (f'[smarthosts.postfix]\nhosts = ["127.0.0.1:{pf.smtpd_port}"]\n'
              f'tls = "verify"\nca_file = "{daemon.ca_file()}"\n')
    if auth:
        password = daemon.dir / "smarthost.password"
        password.write_text("smarthost secret\n")
        config += f'username = "relaygw"\npassword_file = "{password}"\n'
    daemon.start(config + '[[routes]]\naction = "smarthost"\nsmarthost = "postfix"\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.mail("alice@client.example")[0] == 250
        assert smtp.rcpt("bob@mail.example")[0] == 250
        assert smtp.rcpt("carol@mail.example")[0] == 250
        code, text = smtp.data(MESSAGE)
        assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[1]

    # Maildir files use LF line ends: Postfix stores lines, virtual(8) writes them with LF.
    original = MESSAGE.replace(b"\r\n", b"\n")
    for mailbox in ("bob@mail.example", "carol@mail.example"):
        (data,) = wait_until(lambda m=mailbox: pf.maildir_messages(m))
        head, _, rest = data.partition(b"\nReceived: ")
        assert head == (f"Return-Path: <alice@client.example>\n"
                        f"X-Original-To: {mailbox}\nDelivered-To: {mailbox}").encode()
        received, rest = strip_received(b"Received: " + rest)
        assert rest == original  # headers and body intact, byte for byte but the line ends
        theirs, ours = received  # Postfix's smtpd, then relaygw's
        assert theirs.startswith(b"Received: from relay.test (unknown [127.0.0.1])")
        assert (b"with ESMTPSA id" if auth else b"with ESMTPS id") in theirs
        assert ours.startswith(b"Received: from client.example ([127.0.0.1])")
        assert f"with ESMTP id {queue_id}".encode() in ours
    assert wait_until(lambda: daemon.queued() == [])
    log = pf.maillog()
    assert re.search(r"TLS connection established from \S+\[127\.0\.0\.1\]: TLSv1\.3", log), log
    assert ("sasl_method=PLAIN, sasl_username=relaygw@postfix.test" in log) == auth
    assert log.count("status=sent (delivered to maildir)") == 2
    assert not re.search(r"(warning|error|fatal|panic):", log), log
    assert re.search(rf"attempt id={queue_id} to=<bob@mail\.example> route=routes\[0\] "
                     rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{pf.smtpd_port} tls=TLSv1\.3 .* "
                     r'status=sent reply="250 2\.0\.0 Ok: queued as \w+"', daemon.logs())
    assert "smarthost secret" not in daemon.logs()


def test_postfix_smtpd_refuses_relaygw_without_auth(daemon, postfix):
    """The AUTH case above proves something: the same Postfix refuses an anonymous relaygw."""
    if (reason := unavailable_reason(need_sasl_server=True)) is not None:
        pytest.skip(reason)
    leaf = daemon.ca.issue_cert("postfix.test", "127.0.0.1")
    cert, key = daemon.dir / "postfix-cert.pem", daemon.dir / "postfix-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    pf = postfix(smtpd_tls_cert_file=cert, smtpd_tls_key_file=key,
                 smtpd_sasl_users={"relaygw": "smarthost secret"}, smtpd_require_auth=True,
                 virtual_mailboxes=["bob@mail.example"])
    daemon.start(f'[smarthosts.postfix]\nhosts = ["127.0.0.1:{pf.smtpd_port}"]\n'
                 f'tls = "verify"\nca_file = "{daemon.ca_file()}"\n'
                 '[[routes]]\naction = "smarthost"\nsmarthost = "postfix"\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as smtp:
        smtp.sendmail("alice@client.example", ["bob@mail.example"], MESSAGE)
    refused = (r"attempt id=\w+ to=<bob@mail\.example> route=routes\[0\] .* tls=TLSv1\.3 .* "
               r'status=bounced reply="554 5\.7\.1 <unknown\[127\.0\.0\.1\]>: '
               r'Client host rejected: Access denied"')
    wait_until(lambda: re.search(refused, daemon.logs()), what="the bounced attempt logged",
               detail=daemon.logs)
    assert pf.maildir_messages("bob@mail.example") == []
