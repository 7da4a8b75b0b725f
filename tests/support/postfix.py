"""A private, loopback-only Postfix instance, for interoperability tests and benchmarks.

:class:`PostfixInstance` writes a complete Postfix configuration (``main.cf`` and
``master.cf``) and queue under one directory of its own and runs it with the Debian
``postfix`` package's binaries::

    pf = PostfixInstance(Path("/tmp/pf"), smtpd_port=2600, relayhost="[127.0.0.1]:2525")
    pf.start()                       # `postfix -c /tmp/pf/etc start`, waits for the 220
    pf.sendmail("a@postfix.test", ["b@example.org"], b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
    pf.flush()
    assert pf.queue_empty()
    pf.stop()                        # `postfix -c /tmp/pf/etc stop`, then nothing is left

Layout under ``directory``: ``etc/`` (``config_directory``: ``main.cf``, ``master.cf``,
``texthash:`` tables, ``sasl/smtpd.conf``), ``spool/`` (``queue_directory``), ``data/``
(``data_directory``), ``sasl/sasldb2`` (owned by postfix, so kept out of ``etc/``, which
``postfix check`` wants owned by root), ``vmail/`` (``virtual_mailbox_base``, Maildirs as
``vmail/<domain>/<local>/``) and ``maillog`` (``maillog_file``, written by ``postlogd``:
no syslog daemon is needed).

Loopback only, never DNS:

- ``inet_interfaces = 127.0.0.1`` and ``inet_protocols = ipv4``; ``smtpd`` listens on
  ``127.0.0.1:smtpd_port`` only (``master.cf``), and since ``inet_interfaces`` names one
  address the SMTP client binds to it as well.
- ``smtp_dns_support_level = disabled`` with ``smtp_host_lookup = native``,
  ``smtpd_peername_lookup = no``, and ``myhostname``/``mydomain`` set, so Postfix never asks
  a name server.  Even native lookups (``/etc/nsswitch.conf`` may fall through to DNS) are
  never made: ``relayhost`` must be a bracketed loopback address (``[127.0.0.1]:PORT``),
  which is used as is, and without a relayhost every non-local destination goes to the
  ``error`` transport instead of to the recipients' MX hosts.  Local delivery
  (``mydestination``) is the ``error`` transport too; mail for ``virtual_domains`` is
  delivered by ``virtual(8)`` into the Maildirs.
- ``biff = no`` (no comsat datagrams).

Running it as root, without touching the system Postfix: every command gets ``-c`` /
``-C`` with this instance's ``config_directory`` (``MAIL_CONFIG``).  Postfix insists that a
non-default configuration directory be listed in ``alternate_config_directories`` (or
``multi_instance_directories``) of the *default* ``/etc/postfix/main.cf`` only for callers
it does not trust; root is trusted (``mail_conf_suck()`` skips ``mail_conf_checkdir()``
when the effective uid is 0), so ``postfix``, ``sendmail`` (with its set-gid ``postdrop``)
and ``postqueue`` all accept the private directory when run as root (checked with Postfix
3.7 on Debian 12).  The master has to start as root anyway.  So ``/etc/postfix`` is only
read, for ``postfix-files`` and ``dynamicmaps.cf`` (``meta_directory``), never changed,
and the system instance is neither started nor stopped.  The instance's ``directory``
must be reachable by the ``postfix`` user (every parent searchable by others): pytest's
``tmp_path`` lives under a mode-0700 directory, so use :func:`make_directory` or a
``tempfile.mkdtemp()`` directory made mode 0755.

``postfix start`` creates the queue directories with their owners (``mail_owner =
postfix``, ``setgid_group = postdrop``, both created by the Debian package);
``data_directory`` is made here, owned by postfix, as ``postfix check`` wants it.
``master.cf`` runs every service unchrooted, so no files need copying into a chroot.

TLS: ``smtpd_tls_cert_file``/``key_file`` make smtpd offer STARTTLS (and AUTH only after
it); ``smtp_tls_security_level``/``smtp_tls_CAfile`` set the client side.  With a
``[127.0.0.1]:PORT`` relayhost, level ``verify`` and ``smtp_tls_verify_cert_match =
nexthop`` (or the default ``hostname``), Postfix 3.7 checks the certificate's iPAddress
SAN against 127.0.0.1 ("IP address mismatch" otherwise).  ``smtp_tls_match=`` writes a
``smtp_tls_policy_maps`` entry ``[127.0.0.1]:PORT verify match=VALUE`` for the relayhost:
``VALUE`` is a strategy (``nexthop``) or a literal DNS name such as ``relay.test``, which is
matched against the certificate's DNS SANs without any lookup of that name.

SASL: ``relayhost_auth=(user, password)`` makes the SMTP client authenticate to the
relayhost (``smtp_sasl_password_maps`` is a ``texthash:`` table, so no ``postmap``);
``smtpd_sasl_users={user: password}`` makes smtpd offer AUTH PLAIN/LOGIN with Cyrus SASL
from a private ``sasldb2`` written by ``saslpasswd2`` (Debian ``sasl2-bin``), and
``smtpd_require_auth=True`` refuses recipients of unauthenticated clients.  Both sides need
Cyrus SASL plugins: PLAIN/LOGIN from ``libsasl2-modules`` (only recommended by
``libsasl2-2``, so name it when installing with ``--no-install-recommends``) and the sasldb
auxprop from ``libsasl2-modules-db`` (a dependency of Postfix's ``libsasl2-2``).

:func:`unavailable_reason` says why an instance cannot run here (no binaries, not root),
for ``pytest.skip``.  Importing this module has no side effects.
"""

from __future__ import annotations

import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = ["OFFLINE_PARAMETERS", "PostfixError", "PostfixInstance", "make_directory",
           "unavailable_reason"]

POSTFIX = "/usr/sbin/postfix"
SENDMAIL = "/usr/sbin/sendmail"
POSTQUEUE = "/usr/sbin/postqueue"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"

# main.cf parameters that keep an instance on loopback and away from DNS.
OFFLINE_PARAMETERS = frozenset({
    "relayhost", "default_transport", "inet_interfaces", "inet_protocols",
    "disable_dns_lookups", "smtp_dns_support_level", "smtp_host_lookup", "lmtp_host_lookup",
    "smtpd_peername_lookup", "local_transport", "relay_domains", "biff",
})

_SERVICES = """\
# service type  private unpriv  chroot  wakeup  maxproc command
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """A Postfix command failed or the instance did not come up; the message says why."""


def unavailable_reason(need_sasl_server: bool = False) -> str | None:
    """Why a :class:`PostfixInstance` cannot run on this machine, or None if it can."""
    missing = [p for p in (POSTFIX, SENDMAIL, POSTQUEUE) if not os.access(p, os.X_OK)]
    if missing:
        return f"Postfix binaries missing: {', '.join(missing)} (Debian package postfix)"
    if need_sasl_server and not os.access(SASLPASSWD2, os.X_OK):
        return f"{SASLPASSWD2} missing: no Cyrus sasldb for smtpd (Debian package sasl2-bin)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    for name, lookup in (("user postfix", pwd.getpwnam), ("group postdrop", grp.getgrnam)):
        try:
            lookup(name.split()[1])
        except KeyError:
            return f"{name} does not exist (created by the Debian postfix package)"
    return None


def make_directory(prefix: str = "relaygw-postfix-") -> Path:
    """A new directory under the system temporary directory that Postfix can use."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _loopback_relayhost(relayhost: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9.]+)\](?::(\d+))?", relayhost)
    if m is None:
        raise ValueError(f"relayhost must be [IPv4]:PORT, which needs no lookup "
                         f"(got {relayhost!r})")
    ip = ipaddress.IPv4Address(m.group(1))
    if not ip.is_loopback:
        raise ValueError(f"relayhost must be a loopback address (got {relayhost!r})")
    return str(ip), int(m.group(2) or 25)


class PostfixInstance:
    """One Postfix master with its own configuration, queue, Maildirs and log.

    ``virtual_domains`` and ``virtual_mailboxes`` (``"user@domain"``) set up delivery into
    ``vmail/<domain>/<user>/`` Maildirs owned by ``mailbox_user`` (default ``nobody``).
    ``main_cf`` adds or overrides ``main.cf`` parameters, except those that keep the
    instance on loopback and away from DNS (:data:`OFFLINE_PARAMETERS`).
    """

    def __init__(self, directory: Path, smtpd_port: int, relayhost: str | None = None, *,
                 hostname: str = "postfix.test",
                 smtpd_tls_cert_file: str | os.PathLike[str] | None = None,
                 smtpd_tls_key_file: str | os.PathLike[str] | None = None,
                 smtp_tls_security_level: str = "none",
                 smtp_tls_ca_file: str | os.PathLike[str] | None = None,
                 smtp_tls_match: str | None = None,
                 relayhost_auth: tuple[str, str] | None = None,
                 smtpd_sasl_users: Mapping[str, str] | None = None,
                 smtpd_require_auth: bool = False,
                 virtual_domains: Sequence[str] = (),
                 virtual_mailboxes: Sequence[str] = (),
                 mailbox_user: str = "nobody",
                 main_cf: Mapping[str, str] | None = None) -> None:
        self.dir = Path(directory).absolute()
        self.smtpd_port = smtpd_port
        self.relayhost = relayhost
        if relayhost is not None:
            _loopback_relayhost(relayhost)
        if (smtpd_tls_cert_file is None) != (smtpd_tls_key_file is None):
            raise ValueError("give both smtpd_tls_cert_file and smtpd_tls_key_file, or neither")
        if smtp_tls_match is not None and relayhost is None:
            raise ValueError("smtp_tls_match applies to the relayhost; there is none")
        if offending := sorted(set(main_cf or ()) & OFFLINE_PARAMETERS):
            raise ValueError(f"main_cf may not set {', '.join(offending)}: they keep the "
                             "instance offline (use relayhost= for the relayhost)")
        if smtpd_require_auth and not smtpd_sasl_users:
            raise ValueError("smtpd_require_auth needs smtpd_sasl_users")
        self.hostname = hostname
        self.smtpd_tls_cert_file = smtpd_tls_cert_file
        self.smtpd_tls_key_file = smtpd_tls_key_file
        self.smtp_tls_security_level = smtp_tls_security_level
        self.smtp_tls_ca_file = smtp_tls_ca_file
        self.smtp_tls_match = smtp_tls_match
        self.relayhost_auth = relayhost_auth
        self.smtpd_sasl_users = dict(smtpd_sasl_users or {})
        self.smtpd_require_auth = smtpd_require_auth
        self.virtual_mailboxes = list(virtual_mailboxes)
        self.virtual_domains = list(virtual_domains) or sorted(
            {m.rpartition("@")[2] for m in self.virtual_mailboxes})
        self.mailbox_user = mailbox_user
        self.main_cf_extra = dict(main_cf or {})
        self.config_dir = self.dir / "etc"
        self.queue_dir = self.dir / "spool"
        self.data_dir = self.dir / "data"
        self.vmail_dir = self.dir / "vmail"
        self.maillog_path = self.dir / "maillog"
        self.sasldb = self.dir / "sasl" / "sasldb2"  # owned by postfix: not in config_dir

    # -- configuration -------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The ``main.cf`` parameters, in the order they are written."""
        d = self.dir
        p: dict[str, str] = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(d),
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2] or self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "$myhostname, localhost",
            "local_transport": "error:5.1.1 local delivery is disabled in this instance",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "mynetworks": "127.0.0.0/8",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "relayhost": self.relayhost or "",
            "disable_dns_lookups": "yes",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP Postfix",
            "smtp_tls_security_level": self.smtp_tls_security_level,
            "smtp_tls_loglevel": "1",
            "smtpd_tls_loglevel": "1",
            # A retry in a test should be quick; the queue is scanned often.
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
        }
        if self.relayhost is None:
            # Never look up a recipient domain's MX or address, not even natively.
            p["default_transport"] = "error:5.4.6 no relayhost in this instance"
        if self.smtp_tls_ca_file is not None:
            p["smtp_tls_CAfile"] = str(self.smtp_tls_ca_file)
        if self.smtp_tls_match is not None:
            p["smtp_tls_policy_maps"] = f"texthash:{self.config_dir / 'tls_policy'}"
        if self.relayhost_auth is not None:
            p.update({
                "smtp_sasl_auth_enable": "yes",
                "smtp_sasl_password_maps": f"texthash:{self.config_dir / 'sasl_passwd'}",
                # PLAIN and LOGIN are fine under TLS; the defaults forbid them everywhere.
                "smtp_sasl_security_options": "noanonymous, noplaintext",
                "smtp_sasl_tls_security_options": "noanonymous",
            })
        if self.smtpd_tls_cert_file is not None:
            p.update({
                "smtpd_tls_cert_file": str(self.smtpd_tls_cert_file),
                "smtpd_tls_key_file": str(self.smtpd_tls_key_file),
                "smtpd_tls_security_level": "may",
            })
        if self.smtpd_sasl_users:
            p.update({
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "cyrus",
                "smtpd_sasl_path": "smtpd",
                "cyrus_sasl_config_path": str(self.config_dir / "sasl"),
                "smtpd_sasl_local_domain": "$myhostname",
                "smtpd_sasl_security_options": "noanonymous",
                "smtpd_tls_auth_only": "yes",
            })
        if self.smtpd_require_auth:
            p["smtpd_client_restrictions"] = "permit_sasl_authenticated, reject"
        if self.virtual_domains:
            user = pwd.getpwnam(self.mailbox_user)
            p.update({
                "virtual_mailbox_domains": ", ".join(self.virtual_domains),
                "virtual_mailbox_base": str(self.vmail_dir),
                "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
                "virtual_uid_maps": f"static:{user.pw_uid}",
                "virtual_gid_maps": f"static:{user.pw_gid}",
                "virtual_minimum_uid": "1",
            })
        p.update(self.main_cf_extra)
        return p

    def master_cf(self) -> str:
        return (f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd\n"
                + _SERVICES)

    def write_config(self) -> None:
        """Write every configuration file; :meth:`start` calls it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_reachable()
        for path in (self.dir, self.config_dir, self.queue_dir):
            path.mkdir(exist_ok=True)
            path.chmod(0o755)  # whatever the umask: the postfix user must get in
        self.data_dir.mkdir(exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)
        self.data_dir.chmod(0o700)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main)
        (self.config_dir / "master.cf").write_text(self.master_cf())
        if self.smtp_tls_match is not None:
            host, port = _loopback_relayhost(self.relayhost or "")
            self._write_table("tls_policy", {f"[{host}]:{port}":
                                             f"verify match={self.smtp_tls_match}"})
        if self.relayhost_auth is not None:
            user, password = self.relayhost_auth
            host, port = _loopback_relayhost(self.relayhost or "")
            self._write_table("sasl_passwd", {f"[{host}]:{port}": f"{user}:{password}"},
                              secret=True)
        if self.virtual_domains:
            self._write_table("vmailbox", {m: "{1}/{0}/".format(*m.rsplit("@", 1))
                                           for m in self.virtual_mailboxes})
            user = pwd.getpwnam(self.mailbox_user)
            self.vmail_dir.mkdir(exist_ok=True)
            os.chown(self.vmail_dir, user.pw_uid, user.pw_gid)
            self.vmail_dir.chmod(0o700)
        if self.smtpd_sasl_users:
            self._write_sasl()

    def _check_reachable(self) -> None:
        for parent in self.dir.parents:
            if not parent.stat().st_mode & 0o001:
                raise PostfixError(f"{parent} is not searchable by the postfix user; put the "
                                   "instance elsewhere (see make_directory())")

    def _write_table(self, name: str, entries: Mapping[str, str], secret: bool = False) -> None:
        path = self.config_dir / name
        path.write_text("".join(f"{k} {v}\n" for k, v in entries.items()))
        path.chmod(0o600 if secret else 0o644)

    def _write_sasl(self) -> None:
        sasl_dir = self.config_dir / "sasl"
        sasl_dir.mkdir(exist_ok=True)
        (sasl_dir / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {self.sasldb}\n")
        self.sasldb.parent.mkdir(exist_ok=True)
        self.sasldb.unlink(missing_ok=True)
        for user, password in self.smtpd_sasl_users.items():
            self._run([SASLPASSWD2, "-f", str(self.sasldb), "-c", "-p", "-u", self.hostname,
                       user], input=password.encode())
        postfix = pwd.getpwnam("postfix")
        os.chown(self.sasldb, postfix.pw_uid, postfix.pw_gid)
        self.sasldb.chmod(0o600)

    # -- running -------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {**os.environ, "MAIL_CONFIG": str(self.config_dir)}

    def _run(self, argv: Sequence[str], input: bytes | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                                env=self._env(), cwd=self.dir)
        if result.returncode != 0:
            raise PostfixError(f"{' '.join(argv)} exited with {result.returncode}: "
                               f"{result.stderr.decode(errors='replace').strip()}")
        return result

    def postfix(self, *args: str) -> subprocess.CompletedProcess:
        """Run ``postfix -c CONFIG_DIR ARGS``."""
        return self._run([POSTFIX, "-c", str(self.config_dir), *args])

    def start(self, timeout: float = 30.0) -> PostfixInstance:
        """Write the configuration, start the master and wait for smtpd's 220 greeting."""
        self.write_config()
        try:
            self.postfix("start")  # creates the queue directories
            self._wait_for_greeting(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_greeting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | bytes | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.smtpd_port), timeout=5) as s:
                    last = s.recv(512)
                    if last.startswith(b"220 "):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise PostfixError(f"smtpd on 127.0.0.1:{self.smtpd_port} did not greet ({last!r}); "
                           f"maillog:\n{self.maillog()[-3000:]}")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def processes(self) -> list[int]:
        """Every process of this instance (its ``MAIL_CONFIG``), the master included."""
        wanted = b"MAIL_CONFIG=" + os.fsencode(self.config_dir)
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if wanted in environ and state != "Z":
                pids.append(int(entry.name))
        return sorted(pids)

    def stop(self, timeout: float = 20.0) -> None:
        """``postfix stop``, wait for the master to exit, and kill anything left over."""
        if self.config_dir.joinpath("main.cf").exists():
            master = self.master_pid()
            if master is not None and _alive(master):
                subprocess.run([POSTFIX, "-c", str(self.config_dir), "stop"],
                               capture_output=True, timeout=60, env=self._env())
                deadline = time.monotonic() + timeout
                while _alive(master) and time.monotonic() < deadline:
                    time.sleep(0.05)
            deadline = time.monotonic() + 5
            while (left := self.processes()) and time.monotonic() < deadline:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            if left := self.processes():
                raise PostfixError(f"Postfix processes still running: {left}")

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- mail ----------------------------------------------------------------------------

    def sendmail(self, sender: str, recipients: Iterable[str], message: bytes) -> None:
        """Submit ``message`` with Postfix's sendmail (``-i``: a lone dot is not the end)."""
        self._run([SENDMAIL, "-C", str(self.config_dir), "-i", "-f", sender, "--",
                   *recipients], input=message)

    def flush(self) -> None:
        """Attempt delivery of everything queued (``postqueue -f``)."""
        self._run([POSTQUEUE, "-c", str(self.config_dir), "-f"])

    def queue(self) -> list[dict]:
        """The queue as ``postqueue -j`` describes it, one dict per message."""
        out = self._run([POSTQUEUE, "-c", str(self.config_dir), "-j"]).stdout
        return [json.loads(line) for line in out.decode().splitlines() if line.strip()]

    def queue_empty(self) -> bool:
        return not self.queue()

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maildir(self, mailbox: str) -> Path:
        """The Maildir of ``"user@domain"``, or of a path relative to ``vmail/``."""
        if "@" in mailbox:
            local, domain = mailbox.rsplit("@", 1)
            return self.vmail_dir / domain / local
        return self.vmail_dir / mailbox

    def maildir_messages(self, mailbox: str) -> list[bytes]:
        """The messages in a Maildir (``new/`` and ``cur/``), oldest first."""
        root = self.maildir(mailbox)
        files = [p for sub in ("new", "cur") if (root / sub).is_dir()
                 for p in (root / sub).iterdir() if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [p.read_bytes() for p in files]

    def remove(self) -> None:
        """Stop the instance and delete its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
