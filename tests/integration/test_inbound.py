"""The daemon as clients see it: real sockets, real TLS, smtplib and swaks."""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest

pytestmark = pytest.mark.integration

UNTRUSTED = '[access]\ntrusted_networks = []\nrelay_domains = ["relay.example"]\n'
MESSAGE = b"Subject: hello\r\nFrom: a@client.example\r\n\r\nbody line\r\n.leading dot\r\n"


def tls_context(daemon) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=daemon.ca_file())


def users_file(daemon, cli, name="alice", password="correct horse") -> str:
    path = daemon.dir / "users"
    result = cli("passwd", "--file", str(path), name, input=password + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: password set for {name}\n"
    assert password not in path.read_text()
    return str(path)


def queued_message(daemon) -> bytes:
    (queue_id,) = daemon.queued()
    raw = (daemon.spool / "queue" / queue_id).read_bytes()
    header_len = int(raw.split(b"\n")[1])
    start = raw.index(b"\n", raw.index(b"\n") + 1) + 1 + header_len + 1
    return raw[start:]


def test_starttls_auth_and_relay_with_smtplib(daemon, cli):
    users = users_file(daemon, cli)
    daemon.start(UNTRUSTED + f'[auth]\nusers_file = "{users}"\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=10) as smtp:
        code, _ = smtp.ehlo()
        assert code == 250
        assert "starttls" in smtp.esmtp_features and "auth" not in smtp.esmtp_features
        assert smtp.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=") == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
        assert smtp.starttls(context=tls_context(daemon))[0] == 220
        smtp.ehlo()
        assert smtp.esmtp_features["auth"] == " PLAIN LOGIN"
        assert smtp.mail("a@client.example") == (250, b"2.1.0 Sender <a@client.example> OK")
        assert smtp.rcpt("b@elsewhere.example") == (554, b"5.7.1 Relay access denied")
        smtp.rset()
        assert smtp.login("alice", "correct horse") == (235, b"2.7.0 Authentication successful")
        assert smtp.mail("a@client.example") == (250, b"2.1.0 Sender <a@client.example> OK")
        assert smtp.rcpt("b@elsewhere.example") == (
            250, b"2.1.5 Recipient <b@elsewhere.example> OK")
        code, text = smtp.data(MESSAGE)
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
    stored = queued_message(daemon)
    assert stored.endswith(MESSAGE)
    assert b"with ESMTPSA id " in stored and b"(using TLSv1.3 with cipher" in stored


def test_wrong_password_is_refused_and_three_failures_close(daemon, cli):
    users = users_file(daemon, cli)
    daemon.start(UNTRUSTED + f'[auth]\nusers_file = "{users}"\n')
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
        smtp.starttls(context=tls_context(daemon))
        smtp.ehlo()
        for _ in range(2):
            assert smtp.docmd("AUTH", "PLAIN AGFsaWNlAFRyMHViNGRvciYz") == (
                535, b"5.7.8 Authentication credentials invalid")
        assert smtp.docmd("AUTH", "PLAIN AGFsaWNlAFRyMHViNGRvciYz") == (
            421, b"4.7.0 Too many authentication failures")
    assert "correct horse" not in daemon.logs() and "Tr0ub4dor&3" not in daemon.logs()


def test_relay_domain_accepted_from_untrusted_client_without_auth(daemon):
    daemon.start(UNTRUSTED)
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        assert smtp.mail("a@client.example")[0] == 250
        assert smtp.rcpt("someone@relay.example")[0] == 250
        assert smtp.rcpt("x%elsewhere.example@relay.example") == (
            554, b"5.7.1 Routing characters in local part not allowed")
        assert smtp.docmd("RCPT", "TO:<@relay.example:u@elsewhere.example>") == (
            554, b"5.7.1 Relay access denied")
        assert smtp.data(MESSAGE)[0] == 250
    assert len(daemon.queued()) == 1


def test_implicit_tls_listener(daemon):
    implicit = f'[[listeners]]\naddress = "127.0.0.1:{daemon.port}"\ntls = "implicit"\n'
    daemon.start(listeners=implicit)
    with smtplib.SMTP_SSL("127.0.0.1", daemon.port, context=tls_context(daemon),
                          timeout=10) as smtp:
        code, _ = smtp.ehlo()
        assert code == 250 and "starttls" not in smtp.esmtp_features
        smtp.sendmail("a@client.example", ["b@anywhere.example"], MESSAGE)
    assert b"with ESMTPS id" in queued_message(daemon)


def test_require_tls_listener_refuses_plaintext_mail(daemon):
    listener = (f'[[listeners]]\naddress = "127.0.0.1:{daemon.port}"\ntls = "starttls"\n'
                "require_tls = true\n")
    daemon.start(listeners=listener)
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.mail("a@client.example") == (530, b"5.7.0 Must issue a STARTTLS command first")
        smtp.starttls(context=tls_context(daemon))
        smtp.ehlo()
        assert smtp.mail("a@client.example")[0] == 250


def test_starttls_injection_is_discarded(daemon):
    daemon.start()
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220 ")
    sock.sendall(b"EHLO c.example\r\n")
    while not f.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@x.example>\r\n")
    assert f.readline() == b"220 2.0.0 Ready to start TLS\r\n"
    tls = tls_context(daemon).wrap_socket(sock, server_hostname="relay.test")
    tf = tls.makefile("rb")
    tls.sendall(b"MAIL FROM:<a@c.example>\r\n")
    assert tf.readline() == b"503 5.5.1 Send HELO/EHLO first\r\n"
    tls.close()


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["swaks", *args], capture_output=True, text=True, timeout=60)


needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")


@needs_swaks
def test_swaks_pipelined_tls_transaction(daemon):
    daemon.start()
    result = swaks("-s", "127.0.0.1", "-p", str(daemon.port), "-f", "a@client.example",
                   "-t", "b@anywhere.example,c@anywhere.example", "--pipeline", "-tls",
                   "--tls-ca-path", daemon.ca_file(), "--tls-verify", "--helo", "client.example")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<~  250 2.1.5 Recipient <c@anywhere.example> OK" in result.stdout
    assert "<~  250 2.0.0 Ok: queued as " in result.stdout
    assert len(daemon.queued()) == 1


@needs_swaks
@pytest.mark.parametrize("ending", ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\r", "\r.\r\n"])
def test_swaks_smuggling_attempt_is_refused_and_nothing_queued(daemon, tmp_path, ending):
    daemon.start()
    data = tmp_path / "data.eml"
    data.write_bytes(("Subject: x\r\n\r\nhi" + ending +
                      "MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\n"
                      "Subject: spoofed\r\n\r\nsmuggled\r\n.\r\n").encode())
    result = swaks("-s", "127.0.0.1", "-p", str(daemon.port), "-f", "a@client.example",
                   "-t", "b@anywhere.example", "--data", f"@{data}", "--no-data-fixup")
    assert "<** 550 5.5.2 Message contains bare CR or LF characters" in result.stdout, \
        result.stdout
    assert daemon.queued() == []


def test_check_config_reports_every_problem_naming_its_key(daemon, cli):
    config = daemon.dir / "bad.toml"
    config.write_text('[server]\nmax_mesage_size = 10\nmax_recipients = "abc"\n'
                      '[[listeners]]\naddress = "127.0.0.1:2525"\ntls = "startls"\n')
    result = cli("check-config", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "server.max_mesage_size: unknown key",
        'server.max_recipients: must be an integer (got "abc")',
        'listeners[0].tls: must be one of none, starttls, implicit (got "startls")',
    ]


def test_run_with_an_invalid_config_refuses_to_start_without_traceback(daemon, cli):
    config = daemon.dir / "bad.toml"
    config.write_text('[[listeners]]\naddress = "localhost:25"\n')
    result = cli("run", "--config", str(config))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert 'listeners[0].address: host must be an IP address (got "localhost")' in result.stderr


def test_check_config_accepts_a_valid_file_and_prints_warnings(daemon, cli):
    config = daemon.write_config('[access]\ntrusted_networks = ["0.0.0.0/0"]\n')
    result = cli("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "warning: access.trusted_networks: 0.0.0.0/0 makes relaygw an open relay",
        f"{config}: configuration is valid",
    ]


def test_port_in_use_is_a_clear_error(daemon, cli):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", daemon.port))
        busy.listen()
        config = daemon.write_config("")
        result = cli("run", "--config", str(config))
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert f"127.0.0.1:{daemon.port}" in result.stdout + result.stderr


def test_restart_cleans_leftovers_and_quarantines_unreadable_files(daemon):
    daemon.start()
    daemon.stop()
    (daemon.spool / "tmp" / "1234HALF").write_bytes(b"RELAYGW-SPOOL 1\n")
    (daemon.spool / "queue" / "BROKEN").write_bytes(b"garbage")
    daemon.start()
    assert list((daemon.spool / "tmp").iterdir()) == []
    assert [p.name for p in (daemon.spool / "corrupt").iterdir()] == ["BROKEN"]
    logs = daemon.logs()
    assert "spool: removed incomplete file" in logs and "1234HALF" in logs
    assert "moved unreadable message id=BROKEN" in logs


def test_acknowledged_message_survives_kill_9(daemon):
    import signal

    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("a@client.example")
        smtp.rcpt("b@anywhere.example")
        code, text = smtp.data(MESSAGE)
        assert code == 250
        queue_id = text.decode().rsplit(" ", 1)[1]
        daemon.stop(signal.SIGKILL)
    assert daemon.queued() == [queue_id]
    daemon.start()
    assert daemon.queued() == [queue_id]
    assert "1 queued messages" in daemon.logs()
