"""Start-up as an administrator meets it, through the `relaygw` command: the file
checks that check-config, start-up and reload share; start-up failures that end the
process with one line; running as an unprivileged user; the default configuration
path; the log file and SIGUSR1."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, RELAYGW, Daemon, wait_for_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

WITHIN = 10.0  # seconds: "within seconds" for a start-up failure, on a loaded machine
MESSAGE = b"From: a@client.example\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="drops privileges: run as root")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """`relaygw ARGS` and the seconds it took."""
    start = time.monotonic()
    result = subprocess.run([RELAYGW, *args], capture_output=True, text=True, timeout=timeout,
                            cwd=cwd, env={**os.environ, **(env or {})})
    return result, time.monotonic() - start


def start(daemon: Daemon, argv: list[str], env: dict[str, str] | None = None,
          wait: bool = True) -> None:
    """Start the daemon with exactly ``argv`` (no --config is added), its output in its
    log; ``daemon.stop()`` ends it."""
    daemon.log = open(daemon.log_path, "ab")
    daemon.proc = subprocess.Popen(argv, cwd=daemon.dir, stdout=daemon.log,
                                   stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    if wait:
        wait_for_port(daemon.port, daemon.proc)


# -- item 5: one check of every file the configuration names --------------------------------

FILE_CASES = ["missing certificate", "missing key", "key of another certificate",
              "junk PEM", "missing users_file", "missing password_file", "junk CA file"]


def bad_files(daemon: Daemon, case: str) -> tuple[str, str]:
    """Make ``case`` true of the daemon's next configuration: (the body to write with
    it, the one problem expected)."""
    d = daemon.dir
    if case == "missing certificate":
        daemon.cert = d / "missing-cert.pem"
        return "", f"tls.certificate: cannot read {daemon.cert}: No such file or directory"
    if case == "missing key":
        daemon.key = d / "missing-key.pem"
        return "", f"tls.private_key: cannot read {daemon.key}: No such file or directory"
    if case == "key of another certificate":
        daemon.key = d / "other-key.pem"
        daemon.ca.issue_cert("other.test").private_key_pem.write_to_path(str(daemon.key))
        return "", "tls.private_key: does not match tls.certificate"
    if case == "junk PEM":
        daemon.cert = d / "junk.pem"
        daemon.cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n"
                               "-----END CERTIFICATE-----\n")
        return "", "tls.certificate: not a PEM certificate"
    if case == "missing users_file":
        return ('[auth]\nusers_file = "users"\n',
                f"auth.users_file: cannot read {d / 'users'}: No such file or directory")
    if case == "missing password_file":
        return (f'[smarthosts.up]\nhosts = ["127.0.0.1:{daemon.dead_port}"]\ntls = "none"\n'
                'username = "relay"\npassword_file = "up.secret"\n',
                f"smarthosts.up.password_file: cannot read {d / 'up.secret'}: "
                "No such file or directory")
    assert case == "junk CA file"
    (d / "ca-junk.pem").write_text("not a certificate\n")
    return (f'[smarthosts.up]\nhosts = ["127.0.0.1:{daemon.dead_port}"]\ntls = "verify"\n'
            'ca_file = "ca-junk.pem"\n',
            f"smarthosts.up.ca_file: {d / 'ca-junk.pem'}: no PEM certificate in it")


@pytest.mark.parametrize("case", FILE_CASES)
def test_check_config_and_start_up_find_the_same_file_problem_naming_its_key(daemon, case):
    body, problem = bad_files(daemon, case)
    config = daemon.write_config(body)
    checked, _ = cli("check-config", "-c", str(config))
    assert (checked.returncode, checked.stdout, checked.stderr) == (1, "", problem + "\n")
    ran, took = cli("run", "-c", str(config), timeout=30)
    assert (ran.returncode, ran.stderr) == (1, f"relaygw: {problem}\n")
    assert "Traceback" not in ran.stdout and took < WITHIN


def test_reload_refuses_each_file_problem_check_config_finds(daemon):
    daemon.start()
    good_cert, good_key = daemon.cert, daemon.key
    for case in FILE_CASES:
        body, problem = bad_files(daemon, case)
        config = daemon.write_config(body)
        result, _ = cli("reload", "-c", str(config))
        assert (result.returncode, result.stderr) == (1, f"relaygw: reload: {problem}\n"), case
        assert f"reload refused, the old configuration stays: {problem}" in daemon.logs()
        daemon.cert, daemon.key = good_cert, good_key
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:  # still serving
        assert smtp.ehlo()[0] == 250
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_check_config_warns_of_a_host_name_that_is_not_fully_qualified(daemon):
    config = daemon.write_config("").read_text().replace('hostname = "relay.test"',
                                                         'hostname = "mailhub"')
    path = daemon.dir / "short.toml"
    path.write_text(config)
    result, _ = cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        'warning: server.hostname: "mailhub" is not a fully qualified domain name: peers '
        "may refuse it in EHLO",
        f"{path}: configuration is valid"]


# -- item 6: a start-up failure ends the process, with one line ------------------------------

@pytest.mark.parametrize("workers", ["0", '"auto"'])
def test_a_spool_its_user_cannot_write_ends_start_up_with_one_line(daemon, tmp_path, workers):
    private = tmp_path / "private"
    private.mkdir()
    daemon.spool = private / "spool"
    config = daemon.write_config("", server_extra=f"workers = {workers}\n")
    if ROOT:  # root writes anywhere: the daemon's user is who cannot
        private.chmod(0o700)
        argv = ["run", "-c", str(config), "--user", "nobody", "--group", "nogroup"]
        expected = (f"relaygw: server.spool_dir: cannot reach {daemon.spool}: Permission "
                    "denied (relaygw runs as nobody)")
    else:
        private.chmod(0o500)
        argv = ["run", "-c", str(config)]
        expected = (f"relaygw: server.spool_dir: cannot create {daemon.spool}: Permission "
                    f"denied (relaygw runs as {pwd.getpwuid(os.geteuid()).pw_name})")
    result, took = cli(*argv, timeout=30)
    private.chmod(0o700)
    assert (result.returncode, result.stderr) == (1, expected + "\n")
    assert took < WITHIN
    assert "Traceback" not in result.stdout
    assert f"[relaygw.tap#critical] {expected}" in result.stdout  # the log says it too


def test_a_daemonizing_twistd_says_why_and_exits_1(daemon, tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    daemon.spool = private / "spool"
    config = daemon.write_config("", server_extra="workers = 0\n")
    argv = [str(BIN / "twistd"), f"--pidfile={tmp_path / 'twistd.pid'}",
            f"--logfile={tmp_path / 'twistd.log'}"]
    if ROOT:
        private.chmod(0o700)
        argv += ["-u", "nobody", "-g", "nogroup"]
        expected = (f"relaygw: server.spool_dir: cannot reach {daemon.spool}: Permission "
                    "denied (relaygw runs as nobody)")
    else:
        private.chmod(0o500)
        expected = (f"relaygw: server.spool_dir: cannot create {daemon.spool}: Permission "
                    f"denied (relaygw runs as {pwd.getpwuid(os.geteuid()).pw_name})")
    started = time.monotonic()
    result = subprocess.run([*argv, "relaygw", "-c", str(config)], capture_output=True,
                            text=True, timeout=30, cwd=tmp_path)
    private.chmod(0o700)
    assert result.returncode == 1
    assert time.monotonic() - started < WITHIN
    assert result.stderr.splitlines() == [
        f"An error has occurred: {expected.encode()[:98]!r}",
        "Please look at log file for more information."]
    log = (tmp_path / "twistd.log").read_text()
    assert f"[relaygw.tap#critical] {expected}\n" in log and "Traceback" not in log


def test_a_port_in_use_ends_start_up_with_one_line(daemon):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", daemon.port))
        busy.listen()
        result, took = cli("run", "-c", str(daemon.write_config("")), timeout=30)
    expected = f"relaygw: cannot listen on 127.0.0.1:{daemon.port}: Address already in use"
    assert (result.returncode, result.stderr) == (1, expected + "\n")
    assert f"[relaygw.tap#critical] {expected}\n" in result.stdout
    assert took < WITHIN and "Traceback" not in result.stdout


FAKE_WORKER = """#!/bin/sh
echo "F tls.private_key: cannot read /etc/relaygw/key.pem: Permission denied" >&3
exit 2
"""


def test_a_worker_that_cannot_start_stops_the_daemon_with_its_reason(daemon, tmp_path):
    # A worker gets the key from the main process, so it cannot fail to read it; this
    # one stands for any worker that exits with the configuration status, saying why.
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_WORKER)
    fake.chmod(0o755)
    config = daemon.write_config("", server_extra="workers = 2\n")
    log_file = tmp_path / "relaygw.log"
    code = ("import sys\n"
            f"sys.executable = {str(fake)!r}  # the interpreter workers are started with\n"
            "from relaygw.ops.cli import main\n"
            f"sys.exit(main(['run', '-c', {str(config)!r}, '--logfile', {str(log_file)!r}]))\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, env=os.environ.copy())
    reason = ("worker 0 cannot start: tls.private_key: cannot read /etc/relaygw/key.pem: "
              "Permission denied")
    assert (result.returncode, result.stderr, result.stdout) == (1, f"relaygw: {reason}\n", "")
    assert time.monotonic() - started < WITHIN
    log = log_file.read_text()
    assert f"[relaygw.tap#critical] relaygw: {reason}; stopping" in log
    assert log.count(" started pid=") == 2  # the two workers, and no respawn
    assert "Server Shut Down." in log  # twistd ran its shutdown


@needs_root
def test_workers_the_daemon_user_cannot_start_end_start_up_with_one_line(daemon):
    if os.access(sys.executable, os.X_OK) and _nobody_can_run(sys.executable):
        pytest.skip("nobody can run this Python: its workers start")
    daemon.spool = Path(tempfile.mkdtemp(prefix="relaygw-spool-", dir="/tmp"))
    try:
        config = daemon.write_config("", server_extra="workers = 2\n")
        result, took = cli("run", "-c", str(config), "--user", "nobody", "--group", "nogroup",
                           timeout=30)
    finally:
        shutil.rmtree(daemon.spool)
    # The daemon's interpreter is the one its script names (python or python3).
    python = Path(RELAYGW).read_text().splitlines()[0].removeprefix("#!").strip()
    assert (result.returncode, result.stderr) == (
        1, f"relaygw: server.workers: cannot start a worker process ({python}): "
           "Permission denied (relaygw runs as nobody)\n")
    assert took < WITHIN and "Traceback" not in result.stdout


def _nobody_can_run(path: str) -> bool:
    probe = subprocess.run(["su", "-s", "/bin/sh", "nobody", "-c", f"{path} -c pass"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def test_run_refuses_an_unknown_user_before_starting(daemon):
    config = daemon.write_config("")
    result, _ = cli("run", "-c", str(config), "--user", "no-such-user-here")
    assert (result.returncode, result.stderr) == (
        2, "relaygw run: --user: no such user: no-such-user-here\n")


# -- item 7: running as an unprivileged user -------------------------------------------------

@pytest.fixture
def shared(ca) -> Iterator[Daemon]:
    """A daemon whose directory other users may enter (pytest's are root-only)."""
    directory = Path(tempfile.mkdtemp(prefix="relaygw-test-", dir="/tmp"))
    directory.chmod(0o755)
    daemon = Daemon(directory, ca)
    yield daemon
    daemon.stop()
    shutil.rmtree(directory)


@needs_root
@pytest.mark.parametrize("workers", ["0", '"auto"'])
def test_dropped_to_nobody_it_accepts_delivers_and_answers_the_queue_tools(shared, workers):
    daemon = shared
    if workers != "0" and not _nobody_can_run(sys.executable):
        pytest.skip(f"nobody cannot run {sys.executable}, so no worker can start as nobody "
                    "(test_workers_the_daemon_user_cannot_start_... covers that)")
    daemon.key.chmod(0o600)  # root's alone: read before the drop
    daemon.cert.chmod(0o644)
    body = (f'[smarthosts.nowhere]\nhosts = ["127.0.0.1:{daemon.dead_port}"]\ntls = "none"\n'
            '[[routes]]\nrecipient_domains = ["example.org"]\naction = "maildir"\n'
            f'maildir = "{daemon.dir}/mail/{{domain}}/{{localpart}}"\n'
            '[[routes]]\naction = "smarthost"\nsmarthost = "nowhere"\n')
    config = daemon.write_config(body, server_extra=f"workers = {workers}\n")
    start(daemon, [RELAYGW, "run", "-c", str(config), "--user", "nobody", "--group", "nogroup"])
    nobody = pwd.getpwnam("nobody")
    assert _uid_of(daemon.proc.pid) == nobody.pw_uid
    context = ssl.create_default_context(cadata=daemon.ca.cert_pem.bytes().decode())
    with smtplib.SMTP("127.0.0.1", daemon.port, local_hostname="client.example",
                      timeout=30) as smtp:
        smtp.starttls(context=context)  # the root-only key serves TLS
        assert smtp.sendmail("a@client.example", ["bob@example.org"], MESSAGE) == {}
        assert smtp.sendmail("a@client.example", ["carol@elsewhere.example"], MESSAGE) == {}
    new = daemon.dir / "mail" / "example.org" / "bob" / "new"
    (delivered,) = wait_until(lambda: list(new.iterdir()) if new.is_dir() else [],
                              detail=daemon.logs)
    assert delivered.read_bytes().endswith(b"Subject: hi\r\n\r\nbody\r\n") or \
        delivered.read_bytes().endswith(b"Subject: hi\n\nbody\n")
    assert delivered.stat().st_uid == nobody.pw_uid
    for path in (daemon.spool, daemon.spool / "queue", daemon.spool / "control.sock"):
        assert path.stat().st_uid == nobody.pw_uid, path
    assert daemon.spool.stat().st_mode & 0o777 == 0o700
    assert (daemon.spool / "control.sock").stat().st_mode & 0o777 == 0o600
    listed, _ = cli("queue", "list", "-c", str(config))
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    assert "carol@elsewhere.example" in listed.stdout and listed.stdout.endswith("1 message\n")
    # A reload after the drop: the key cannot be read now, but it has not changed.
    reloaded, _ = cli("reload", "-c", str(config))
    assert (reloaded.returncode, reloaded.stdout, reloaded.stderr) == (
        0, f"reloaded {config}\n", "")


@needs_root
def test_a_maildir_base_the_dropped_user_cannot_write_is_a_warning_at_start(shared, tmp_path):
    daemon = shared
    private = tmp_path / "private"  # pytest's directories are root's alone
    private.mkdir(mode=0o700)
    body = (f'[[routes]]\naction = "maildir"\n'
            f'maildir = "{private}/mail/{{domain}}/{{localpart}}"\n')
    config = daemon.write_config(body, server_extra="workers = 0\n")
    start(daemon, [RELAYGW, "run", "-c", str(config), "--user", "nobody", "--group", "nogroup"])
    assert (f"[relaygw.tap#warn] routes[0].maildir: {private}/mail is not writable by this "
            f"process (uid {pwd.getpwnam('nobody').pw_uid}): deliveries there will be "
            "deferred\n") in daemon.logs()


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # the effective uid
    raise AssertionError("no Uid line")


# -- item 8: the default configuration path --------------------------------------------------

def test_queue_list_without_c_uses_relaygw_config_and_says_so(daemon):
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as smtp:
        smtp.sendmail("a@client.example", ["b@remote.example"], MESSAGE)
    config = daemon.dir / "relaygw.toml"
    elsewhere = daemon.dir / "elsewhere"
    elsewhere.mkdir()
    result, _ = cli("queue", "list", env={"RELAYGW_CONFIG": str(config)}, cwd=elsewhere)
    assert result.returncode == 0
    assert result.stderr == f"relaygw: using {config} (from $RELAYGW_CONFIG)\n"
    assert "b@remote.example" in result.stdout and result.stdout.endswith("1 message\n")


@pytest.mark.skipif(Path("/etc/relaygw/relaygw.toml").exists(),
                    reason="this machine has /etc/relaygw/relaygw.toml")
def test_without_a_file_anywhere_the_built_in_default_is_said(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RELAYGW_CONFIG"}
    result = subprocess.run([RELAYGW, "queue", "list"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=60)
    assert result.stderr.splitlines()[0] == (
        "relaygw: no /etc/relaygw/relaygw.toml and no $RELAYGW_CONFIG: using the built-in "
        f"default configuration (data in {tmp_path / 'relaygw-data'})")


def test_the_twistd_plugin_without_c_runs_relaygw_config_and_logs_it(daemon):
    config = daemon.write_config("")
    start(daemon, [str(BIN / "twistd"), "-n", "--pidfile=", "relaygw"],
          env={"RELAYGW_CONFIG": str(config)})
    assert f"[relaygw.tap#info] configuration {config}\n" in daemon.logs()


# -- item 9: the log file and SIGUSR1 --------------------------------------------------------

@pytest.mark.parametrize("log_format", ["text", "json"])
def test_sigusr1_reopens_the_log_file_logrotate_moved(daemon, log_format):
    config = daemon.write_config("")
    log_file = daemon.dir / "mail.log"
    start(daemon, [RELAYGW, "run", "-c", str(config), "--logfile", str(log_file),
                   "--log-format", log_format])
    assert wait_until(lambda: "connect" in log_file.read_text())  # wait_for_port's visit
    log_file.rename(daemon.dir / "mail.log.1")
    daemon.proc.send_signal(signal.SIGUSR1)
    wait_until(log_file.exists)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        assert s.recv(100).startswith(b"220 ")
    wait_until(lambda: "connect" in log_file.read_text(), detail=log_file.read_text)
    assert "twistd" not in log_file.read_text()  # the start-up lines stayed in the old one
    assert "starting up" in (daemon.dir / "mail.log.1").read_text()
    assert log_file.stat().st_mode & 0o777 == 0o640


def test_sigusr1_without_a_log_file_changes_nothing(daemon):
    daemon.start()
    daemon.proc.send_signal(signal.SIGUSR1)
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        assert s.recv(100).startswith(b"220 ")
    assert daemon.proc.poll() is None


def test_version():
    from relaygw import __version__

    result, _ = cli("--version")
    assert (result.returncode, result.stdout) == (0, f"relaygw {__version__}\n")


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_the_shipped_logrotate_file_rotates_a_running_daemons_log(daemon):
    config = daemon.write_config("")
    log_dir = daemon.dir / "log"
    log_dir.mkdir()
    log_file = log_dir / "relaygw.log"
    start(daemon, [RELAYGW, "run", "-c", str(config), "--logfile", str(log_file)])
    assert daemon.proc is not None
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    shipped = (Path(__file__).parents[2] / "contrib" / "logrotate.relaygw").read_text()
    # The shipped file, for this test's paths, user, and process (no systemd here).
    rules = (shipped.replace("/var/log/relaygw/relaygw.log", str(log_file))
             .replace("create 0640 relaygw adm", f"create 0640 {user} {group}")
             .replace("systemctl kill --signal=USR1 --kill-who=main relaygw.service",
                      f"kill -USR1 {daemon.proc.pid}"))
    assert f"{log_file} {{" in rules and f"create 0640 {user}" in rules
    assert f"kill -USR1 {daemon.proc.pid}" in rules
    (daemon.dir / "logrotate.conf").write_text(rules)
    wait_until(lambda: "connect" in log_file.read_text())
    rotated = subprocess.run(["logrotate", "-f", "-s", str(daemon.dir / "state"),
                              str(daemon.dir / "logrotate.conf")],
                             capture_output=True, text=True, timeout=60)
    assert rotated.returncode == 0, rotated.stderr
    assert "starting up" in (log_dir / "relaygw.log.1").read_text()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        assert s.recv(100).startswith(b"220 ")
    wait_until(lambda: "connect" in log_file.read_text(), detail=log_file.read_text)
    assert "starting up" not in log_file.read_text()
