"""The daemon with its SMTP sessions in worker processes ([server] workers = 2).

Every test asks for two workers itself, whatever RELAYGW_TEST_WORKERS says. The
worker processes are found in /proc (children of the main pid running
relaygw.daemon.workers.process), and the worker serving a given client connection is found from
/proc/net/tcp (the server side's socket inode) and the workers' descriptors.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import free_port
from tests.support.waiting import poll, wait_until

pytestmark = pytest.mark.integration

WORKERS = "workers = 2\n"
BODY = (b"From: a@local.example\r\nTo: b@remote.example\r\nSubject: via a worker\r\n\r\n"
        b"first line\r\n.starts with a dot\r\n..two dots\r\n\r\nlast line\r\n")
PER_CLIENT_REFUSAL = b"421 4.7.0 Too many connections from your address\r\n"
TOTAL_REFUSAL = b"421 4.7.0 Too many connections, try again later\r\n"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"


# -- processes and connections ------------------------------------------------------


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state, parent pid), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _cmdline(pid: int | str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def worker_pids(daemon) -> dict[int, int]:
    """pid -> worker index, for the live worker processes of the daemon's main pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(entry)
        args = _cmdline(entry)
        if stat is None or stat[0] == "Z" or stat[1] != daemon.proc.pid:
            continue
        if "relaygw.daemon.workers.process" in args and "--index" in args:
            found[int(entry)] = int(args[args.index("--index") + 1])
    return found


def alive(pid: int) -> bool:
    """Running (not a zombie) and still a relaygw worker: pids are not reused that fast."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and "relaygw.daemon.workers.process" in _cmdline(pid)


def running_workers(pids: list[int]) -> list[int]:
    """Those of ``pids`` that are still relaygw workers, whoever their parent now is."""
    out = []
    for pid in pids:
        stat = _stat(str(pid))
        if "relaygw.daemon.workers.process" in _cmdline(str(pid)) and stat and stat[0] != "Z":
            out.append(pid)
    return out


def holder(daemon, client: socket.socket) -> int | None:
    """The worker pid holding the server side of the client's connection."""
    client_port = client.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == daemon.port and fields[9] != "0" and \
                int(remote.split(":")[1], 16) == client_port:
            inode = fields[9]
    if inode is None:
        return None
    for pid in worker_pids(daemon):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def greeted(port: int, timeout: float = 10) -> tuple[socket.socket, bytes]:
    """A raw connection and its first reply line."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock, _line(sock)


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def refused_with(port: int) -> bytes:
    """Everything the server said before it closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


def session(port: int, **kw) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=20, **kw)
    assert smtp.ehlo()[0] == 250
    return smtp


def transaction(smtp: smtplib.SMTP, body: bytes = BODY, rcpt: str = "b@remote.example") -> str:
    assert smtp.mail("a@local.example")[0] == 250
    assert smtp.rcpt(rcpt)[0] == 250
    code, text = smtp.data(body)
    assert code == 250, text
    assert text.startswith(b"2.0.0 Ok: queued as ")
    return text.decode().rsplit(" ", 1)[1]


def send(port: int, body: bytes = BODY) -> str:
    with session(port) as smtp:
        return transaction(smtp, body)


def all_workers_serving(daemon, count: int = 2) -> dict[int, socket.socket]:
    """Waits until ``count`` sessions held at once are each on a worker of its own:
    the least busy ready worker takes each, so that happens once every worker is
    ready. Returns those sessions (greeted raw sockets, still open) by the pid
    serving each."""
    result: dict[int, socket.socket] = {}

    def spread() -> bool:
        socks: list[socket.socket] = []
        try:
            for _ in range(count):
                sock = _greeted_or_none(daemon.port)  # None: a slot not yet released
                if sock is None:
                    return False
                socks.append(sock)
            # None: no worker found holding it yet; this try fails and the next one begins.
            pids = [poll(lambda s=s: holder(daemon, s), timeout=5) for s in socks]
            if None not in pids and len(set(pids)) == count:
                result.update(zip(pids, socks, strict=True))
                socks = []
                return True
            return False
        finally:
            for s in socks:
                s.close()

    wait_until(spread, timeout=30, interval=0.2,
               what=f"{count} held sessions, each on a worker of its own (all workers ready)")
    return result


def _greeted_or_none(port: int) -> socket.socket | None:
    """A connection that got 220, or None if it was refused (a slot not yet released)."""
    sock, greeting = greeted(port)
    if greeting.startswith(b"220 "):
        return sock
    assert greeting in (PER_CLIENT_REFUSAL, TOTAL_REFUSAL), greeting
    sock.close()
    return None


def _session_or_none(port: int) -> smtplib.SMTP | None:
    try:
        return session(port)
    except smtplib.SMTPConnectError as e:
        assert e.smtp_code == 421 and e.smtp_error.startswith(b"4.7.0 Too many"), e
        return None


def removed(daemon, queue_id: str) -> None:
    """Waits for the daemon to log that the message is done and gone from the spool."""
    wait_until(lambda: f"removed id={queue_id} (done)" in daemon.logs(), timeout=30,
               what=f"the removal of {queue_id} logged", detail=daemon.logs)


def exits(logs: str) -> int:
    return len(re.findall(r"worker \d+ exited", logs))


def json_records(daemon) -> list[dict]:
    """The JSON log lines (complete ones); anything else a worker wrote to stderr is skipped."""
    text = daemon.logs()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def scrape(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def smarthost_to(port: int) -> str:
    return (f'[smarthosts.up]\nhosts = ["127.0.0.1:{port}"]\ntls = "none"\n'
            '[[routes]]\naction = "smarthost"\nsmarthost = "up"\n')


# -- the tests ------------------------------------------------------------------------


def test_mail_through_workers_reaches_the_smarthost_byte_exact(daemon, capture):
    sink = capture()
    daemon.start(smarthost_to(sink.port), server_extra=WORKERS)
    pids = wait_until(lambda: len(w := worker_pids(daemon)) == 2 and w)
    assert sorted(pids.values()) == [0, 1]
    # A dot at the start of a line right where a 16 KiB read ends, as in test_delivery.
    filler = b"".join(b"x" * 78 + b"\r\n" for _ in range((16384 - len(BODY)) // 80))
    pad = 16384 - len(BODY) - len(filler)
    body = BODY + filler + b"y" * (pad - 2) + b"\r\n" + b".\r\n..\r\n.x\r\nend\r\n"
    assert body[16384:16387] == b".\r\n"
    with session(daemon.port) as smtp:
        assert smtp.mail("a@local.example") == (250, b"2.1.0 Sender <a@local.example> OK")
        assert smtp.rcpt("b@remote.example") == (250, b"2.1.5 Recipient <b@remote.example> OK")
        assert smtp.rcpt("c@remote.example")[0] == 250
        code, text = smtp.data(body)
        assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[1]
    ((mail_from, rcpts, content),) = sink.wait_for(1)
    assert (mail_from, rcpts) == ("a@local.example", ["b@remote.example", "c@remote.example"])
    received, sep, rest = content.partition(b"\r\nFrom: ")
    assert sep and received.startswith(b"Received: from client.example ([127.0.0.1])")
    assert f"with ESMTP id {queue_id}".encode() in received
    assert b"From: " + rest == body
    removed(daemon, queue_id)  # its last attempt has ended: no other copy can follow
    assert daemon.queued() == []
    assert len(sink.messages) == 1
    assert worker_pids(daemon) == pids  # no worker died on the way
    assert "Traceback" not in daemon.logs()


def test_sessions_spread_over_both_workers_and_their_logs_say_which(daemon):
    metrics = free_port()
    daemon.start(f'[log]\nformat = "json"\n[metrics]\naddress = "127.0.0.1:{metrics}"\n',
                 server_extra=WORKERS)
    raw = list(all_workers_serving(daemon).values())  # one on each worker, held
    # Only those two are open (earlier tries have ended): the least busy worker is exact.
    is_open = ("relaygw_connections_open", (("listener", f"127.0.0.1:{daemon.port}"),))
    assert wait_until(lambda: scrape(metrics)[is_open] == 2)
    sessions = [session(daemon.port) for _ in range(2)]
    socks = raw + [s.sock for s in sessions]
    try:
        # One each already, so the third goes to either and the fourth to the other.
        holders = [wait_until(lambda s=s: holder(daemon, s), timeout=5) for s in socks]
        assert sorted(holders.count(pid) for pid in set(holders)) == [2, 2], holders
        ports = [s.getsockname()[1] for s in socks]
        connects = wait_until(lambda: len(c := [r for r in json_records(daemon)
                                                if r["event"] == "connect"
                                                and r.get("port") in ports]) == 4 and c,
                              what="four connect records",
                              detail=lambda: json_records(daemon)[-10:])
        assert sorted(r["worker"] for r in connects) == [0, 0, 1, 1]
        pids = worker_pids(daemon)
        for sock, pid in zip(socks, holders, strict=True):
            (record,) = [r for r in connects if r["port"] == sock.getsockname()[1]]
            assert record["worker"] == pids[pid]  # the log names the process serving it
            assert (record["client"], record["level"], record["namespace"]) == (
                "127.0.0.1", "info", "relaygw.smtp.server")
        queue_id = transaction(sessions[0])
    finally:
        for s in sessions:
            s.quit()
        for sock in raw:
            sock.close()
    records = wait_until(lambda: [r for r in json_records(daemon)
                                  if r["event"] == "accepted" and r["queue_id"] == queue_id])
    assert records[0]["worker"] == pids[holders[2]]
    # The main process's own events carry no worker field.
    started = [r for r in json_records(daemon) if r["event"] == "worker_started"]
    assert len(started) == 2 and all("worker" not in r for r in started)


def test_per_client_cap_is_daemon_wide(daemon):
    daemon.start(server_extra=WORKERS + "max_connections_per_client = 2\n")
    # Two connections held, one on each worker: either worker alone would take a
    # third; the main process counts them together.
    serving = all_workers_serving(daemon)
    first, second = serving.values()
    try:
        assert refused_with(daemon.port) == PER_CLIENT_REFUSAL
        assert refused_with(daemon.port) == PER_CLIENT_REFUSAL
        first.sendall(b"QUIT\r\n")
        assert _line(first) == b"221 2.0.0 Bye\r\n"
        assert first.recv(10) == b""
        # The worker reports the end of the session; then the slot is free again.
        third = wait_until(lambda: _greeted_or_none(daemon.port))
        assert third is not None
        assert refused_with(daemon.port) == PER_CLIENT_REFUSAL
        third.close()
    finally:
        first.close()
        second.close()
    assert 'connection refused client=127.0.0.1 reply="421 4.7.0 Too many connections from ' \
           'your address"' in daemon.logs()


def test_total_cap_is_daemon_wide(daemon):
    daemon.start(server_extra=WORKERS + "max_connections = 3\nmax_connections_per_client = 50\n")
    held = list(all_workers_serving(daemon).values())
    try:
        held.append(wait_until(lambda: _greeted_or_none(daemon.port)))
        assert held[-1] is not None
        assert refused_with(daemon.port) == TOTAL_REFUSAL
        held.pop(0).close()
        held.append(wait_until(lambda: _greeted_or_none(daemon.port)))
        assert held[-1] is not None
        assert refused_with(daemon.port) == TOTAL_REFUSAL
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


def test_a_killed_worker_is_replaced_and_its_slots_come_back(daemon):
    daemon.start(server_extra=WORKERS + "max_connections_per_client = 2\n")
    serving = all_workers_serving(daemon)  # one idle session held on each worker
    victim, survivor = sorted(serving)
    on_victim, other = serving[victim], serving[survivor]
    victim_index = worker_pids(daemon)[victim]
    on_victim.sendall(b"EHLO client.example\r\n")
    while not _line(on_victim).startswith(b"250 "):
        pass
    assert refused_with(daemon.port) == PER_CLIENT_REFUSAL
    os.kill(victim, signal.SIGKILL)
    assert on_victim.recv(100) == b""  # its sessions die with it
    on_victim.close()
    died = f"worker {victim_index} pid={victim} ended unexpectedly: exit_code=none signal=9"
    wait_until(lambda: died in daemon.logs(), what=repr(died), detail=daemon.logs)
    # The victim's slot is free: one more connection is taken, then the cap holds.
    extra = _greeted_or_none(daemon.port)
    assert extra is not None
    assert refused_with(daemon.port) == PER_CLIENT_REFUSAL
    extra.close()
    other.close()
    # A replacement with the same index and a new pid.
    replaced = wait_until(lambda: len(w := worker_pids(daemon)) == 2 and victim not in w and w,
                          timeout=10, what="a replacement worker",
                          detail=lambda: worker_pids(daemon))
    (replacement,) = set(replaced) - {survivor}
    assert replaced[replacement] == victim_index
    assert f"worker {victim_index} started pid={replacement}" in daemon.logs()
    # The replacement serves sessions and accepts mail; the main process queues it.
    serving = all_workers_serving(daemon)
    assert set(serving) == {replacement, survivor}
    for sock in serving.values():
        sock.close()
    queued = []
    for _ in range(20):
        smtp = wait_until(lambda: _session_or_none(daemon.port))  # slots being released
        with smtp:
            pid = wait_until(lambda smtp=smtp: holder(daemon, smtp.sock), timeout=5)
            queued.append(transaction(smtp))
        if pid == replacement:
            break
    assert pid == replacement
    assert wait_until(lambda: daemon.queued() == sorted(queued))
    assert "Traceback" not in daemon.logs()


def test_acknowledged_mail_survives_kill_9_of_the_main_process(daemon, capture, cli):
    daemon.start(server_extra=WORKERS)
    pids = wait_until(lambda: len(w := worker_pids(daemon)) == 2 and w)
    assert sorted(running_workers(pids)) == sorted(pids)
    queue_id = send(daemon.port)
    assert daemon.queued() == [queue_id]
    daemon.stop(signal.SIGKILL)
    # The workers go with the main process (PR_SET_PDEATHSIG), not a moment later.
    wait_until(lambda: running_workers(pids) == [], timeout=2, what="the workers to end",
               detail=lambda: running_workers(pids))
    assert not any(alive(pid) for pid in pids)
    sink = capture()
    daemon.start(smarthost_to(sink.port), server_extra=WORKERS)
    assert f"spool {daemon.spool}: 1 queued messages" in daemon.logs()  # recovered
    # Its first attempt (to the dead default smarthost) may have deferred it already.
    flushed = cli("queue", "flush", "--all", "-c", str(daemon.dir / "relaygw.toml"))
    assert flushed.returncode == 0, flushed.stderr
    ((_, rcpts, content),) = sink.wait_for(1)
    assert rcpts == ["b@remote.example"]
    assert f"with ESMTP id {queue_id}".encode() in content
    assert content.endswith(BODY.split(b"\r\n\r\n", 1)[1])
    # A second copy (queued twice: by recovery and by a worker) would be sent before the
    # message is removed, or keep it in the queue: wait for both to be decided.
    removed(daemon, queue_id)
    listed = cli("queue", "list", "--json", "-c", str(daemon.dir / "relaygw.toml"))
    assert (listed.returncode, json.loads(listed.stdout)) == (0, []), listed.stderr
    assert daemon.queued() == []
    assert len(sink.messages) == 1
    sent = [ln for ln in daemon.logs().splitlines()
            if f"attempt id={queue_id} " in ln and "status=sent" in ln]
    assert len(sent) == 1, sent
    assert list((daemon.spool / "tmp").iterdir()) == []


def test_sigterm_lets_a_transaction_on_a_worker_finish(daemon):
    daemon.start(server_extra=WORKERS)
    serving = all_workers_serving(daemon)
    pids = set(serving)
    for sock in serving.values():
        sock.close()
    smtp = session(daemon.port)
    assert smtp.mail("a@local.example")[0] == 250
    assert smtp.rcpt("b@remote.example")[0] == 250
    idle, greeting = greeted(daemon.port)
    assert greeting.startswith(b"220 ")
    busy_pid = wait_until(lambda: holder(daemon, smtp.sock), timeout=5)
    assert wait_until(lambda: holder(daemon, idle), timeout=5)
    daemon.proc.send_signal(signal.SIGTERM)
    assert _line(idle) == SHUTTING_DOWN
    assert idle.recv(10) == b""
    idle.close()
    assert wait_until(lambda: _refused(daemon.port))  # the main process stopped listening
    assert alive(busy_pid)  # still finishing the transaction
    code, text = smtp.data(BODY)
    assert code == 250, text
    queue_id = text.decode().rsplit(" ", 1)[1]
    assert smtp.docmd("MAIL", "FROM:<a@local.example>") == (
        421, b"4.3.2 Service shutting down, try again later")
    smtp.close()
    # twistd ends a clean SIGTERM shutdown by re-raising the signal: -15 is its exit status.
    assert daemon.proc.wait(timeout=30) == -signal.SIGTERM
    assert not any(alive(pid) for pid in pids)
    assert daemon.queued() == [queue_id]
    assert list((daemon.spool / "tmp").iterdir()) == []
    logs = daemon.logs()
    assert "ended unexpectedly" not in logs and "Traceback" not in logs
    assert exits(logs) == 2


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_reload_replaces_the_workers_and_old_sessions_go_on(daemon):
    daemon.start(server_extra=WORKERS)
    serving = all_workers_serving(daemon)
    old = set(serving)
    for sock in serving.values():
        sock.close()
    live = session(daemon.port)
    live_pid = wait_until(lambda: holder(daemon, live.sock), timeout=5)
    assert live_pid in old
    first = transaction(live)
    daemon.write_config("", server_extra=WORKERS)
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "applied" in daemon.logs(), timeout=20)
    # Two new workers; of the old ones only the one with a session is left.
    now = wait_until(lambda: len(w := worker_pids(daemon)) == 3 and w, timeout=10,
                     what="two new workers beside the busy old one",
                     detail=lambda: worker_pids(daemon))
    assert set(now) & old == {live_pid}
    new = set(now) - old
    assert sorted(now[pid] for pid in new) == [0, 1]
    # The session opened before the reload goes on, on its worker.
    second = transaction(live)
    assert holder(daemon, live.sock) == live_pid
    # New sessions go to the new workers.
    with session(daemon.port) as fresh:
        assert wait_until(lambda: holder(daemon, fresh.sock), timeout=5) in new
        third = transaction(fresh)
    assert live.quit()[0] == 221
    live.close()
    assert wait_until(lambda: not alive(live_pid), timeout=10)
    assert set(worker_pids(daemon)) == new
    assert daemon.queued() == sorted([first, second, third])
    logs = daemon.logs()
    assert "ended unexpectedly" not in logs and "Traceback" not in logs
    assert exits(logs) == 2  # the two old workers, each when it had no session left


def test_metrics_count_messages_accepted_by_workers(daemon):
    port = free_port()
    daemon.start(f'[metrics]\naddress = "127.0.0.1:{port}"\n', server_extra=WORKERS)
    listener = (("listener", f"127.0.0.1:{daemon.port}"),)
    is_open = ("relaygw_connections_open", listener)
    total = ("relaygw_connections_total", (*listener, ("tls", "false")))
    before = wait_until(lambda: (s := scrape(port)).get(is_open) == 0 and s,
                        what="no connection open (the start-up probe has ended)",
                        detail=lambda: scrape(port))
    sessions = [session(daemon.port) for _ in range(3)]
    assert scrape(port)[is_open] == 3
    for smtp in sessions:
        transaction(smtp)
    for smtp in sessions:
        smtp.quit()
    samples = wait_until(lambda: (s := scrape(port))[is_open] == 0 and s,
                         what="the three sessions closed", detail=lambda: scrape(port))
    assert samples[("relaygw_messages_accepted_total", ())] == 3
    assert samples[("relaygw_tls_inbound_total", (("version", "none"),))] == 3
    assert samples[total] == before[total] + 3
    assert samples[("relaygw_queue_messages", ())] == 3


def test_implicit_tls_and_starttls_listeners_through_workers(daemon):
    starttls_port = free_port()
    listeners = (f'[[listeners]]\naddress = "127.0.0.1:{daemon.port}"\ntls = "implicit"\n'
                 f'[[listeners]]\naddress = "127.0.0.1:{starttls_port}"\ntls = "starttls"\n')
    daemon.start(listeners=listeners, server_extra=WORKERS)
    context = ssl.create_default_context(cafile=daemon.ca_file())
    with smtplib.SMTP_SSL("127.0.0.1", daemon.port, context=context, timeout=20,
                          local_hostname="client.example") as smtp:
        code, _ = smtp.ehlo()
        assert code == 250 and "starttls" not in smtp.esmtp_features
        assert smtp.sock.version() == "TLSv1.3"
        assert wait_until(lambda: holder(daemon, smtp.sock), timeout=5) in worker_pids(daemon)
        implicit_id = transaction(smtp)
    with session(starttls_port) as smtp:
        assert "starttls" in smtp.esmtp_features
        assert smtp.starttls(context=context)[0] == 220
        smtp.ehlo()
        starttls_id = transaction(smtp)
    assert daemon.queued() == sorted([implicit_id, starttls_id])
    for queue_id in (implicit_id, starttls_id):
        stored = (daemon.spool / "queue" / queue_id).read_bytes()
        assert f"with ESMTPS id {queue_id}".encode() in stored
        assert b"(using TLSv1.3 with cipher" in stored
        assert stored.endswith(BODY)


def test_relaygw_reload_answers_once_the_new_workers_serve(daemon, cli):
    daemon.start(server_extra=WORKERS)
    old = set(wait_until(lambda: len(w := worker_pids(daemon)) == 2 and w))
    path = daemon.dir / "relaygw.toml"
    result = cli("reload", "--config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"reloaded {path}\n", "")
    # "applied" means the new workers are ready: every new session is theirs already.
    new = set(worker_pids(daemon)) - old
    assert len(new) == 2
    with session(daemon.port) as smtp:
        assert wait_until(lambda: holder(daemon, smtp.sock), timeout=5) in new
        transaction(smtp)
    assert wait_until(lambda: set(worker_pids(daemon)) == new, timeout=10)
    assert "ended unexpectedly" not in daemon.logs()


UNTRUSTED = '[access]\ntrusted_networks = []\nrelay_domains = ["{domain}"]\n'


def _rcpt(sock: socket.socket, rcpt: str) -> bytes:
    """EHLO, MAIL, RCPT on a greeted raw connection; the reply to RCPT."""
    sock.sendall(b"EHLO client.example\r\n")
    while not _line(sock).startswith(b"250 "):
        pass
    sock.sendall(b"MAIL FROM:<a@client.example>\r\n")
    assert _line(sock).startswith(b"250 ")
    sock.sendall(b"RCPT TO:<%s>\r\n" % rcpt.encode())
    return _line(sock)


def test_a_replacement_worker_serves_the_configuration_in_force(daemon):
    """The configuration in force is the one last loaded; a file edited on disk but
    not reloaded must not reach the sessions of a worker started again after a crash."""
    daemon.start(UNTRUSTED.format(domain="a.example"), server_extra=WORKERS)
    serving = all_workers_serving(daemon)
    victim, survivor = sorted(serving)
    for sock in serving.values():
        sock.close()
    # The operator is editing the file; no reload yet.
    daemon.write_config(UNTRUSTED.format(domain="b.example"), server_extra=WORKERS)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(w := worker_pids(daemon)) == 2 and victim not in w,
                      timeout=10)
    serving = all_workers_serving(daemon)
    (replacement,) = set(serving) - {survivor}
    try:
        replies = {pid: _rcpt(sock, "x@a.example") for pid, sock in serving.items()}
    finally:
        for sock in serving.values():
            sock.close()
    assert replies == {survivor: b"250 2.1.5 Recipient <x@a.example> OK\r\n",
                       replacement: b"250 2.1.5 Recipient <x@a.example> OK\r\n"}, (
        "the replacement worker read the edited, not reloaded, configuration file")


def test_a_message_stored_but_not_reported_by_a_dead_worker_is_still_delivered(daemon, capture):
    """A worker killed between its spool commit and its report to the main process
    leaves a queue file nobody queued; after a worker dies the main process looks
    for such files (older than 30 s, so reports on their way have arrived)."""
    from relaygw.envelope import Envelope, EnvelopeRecipient
    from relaygw.queue.store import MAGIC

    sink = capture()
    daemon.start(smarthost_to(sink.port), server_extra=WORKERS)
    pids = wait_until(lambda: len(w := worker_pids(daemon)) == 2 and w)
    queue_id = "1A0000000000ABCDE"
    envelope = Envelope(queue_id, "a@local.example", (EnvelopeRecipient("b@remote.example"),),
                        time.time() - 60, client_ip="127.0.0.1")
    header = envelope.to_json()
    content = b"Subject: stranded\r\n\r\nbody\r\n"
    path = daemon.spool / "queue" / queue_id
    path.write_bytes(MAGIC + b"%d\n" % len(header) + header + b"\n" + content)
    os.utime(path, (time.time() - 60, time.time() - 60))
    os.kill(min(pids), signal.SIGKILL)
    ((mail_from, rcpts, delivered),) = sink.wait_for(1, timeout=45)
    assert (mail_from, rcpts, delivered) == ("a@local.example", ["b@remote.example"], content)
    assert wait_until(lambda: daemon.queued() == [])
    assert (f"queued id={queue_id}, which a worker stored but did not report before it died"
            in daemon.logs())
