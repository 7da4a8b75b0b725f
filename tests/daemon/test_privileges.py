"""What root does before the drop to --user: the spool and Maildir bases, made and
given to the user."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from relaygw.config import parse_config
from relaygw.daemon.privileges import give_to_user, maildir_base


@pytest.mark.parametrize(("template", "base"), [
    ("/var/mail/{domain}/{localpart}", Path("/var/mail")),
    ("/var/mail/vhosts/{domain}/{localpart}/", Path("/var/mail/vhosts")),
    ("/srv/mail/d-{domain}/{localpart}", Path("/srv/mail")),
    ("/{domain}/{localpart}", None),  # nothing fixed but the root
    ("/srv/one/mailbox", Path("/srv/one")),
])
def test_the_fixed_part_of_a_maildir_template(template: str, base: Path | None) -> None:
    assert maildir_base(template) == base


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_root_makes_the_spool_and_maildir_base_and_gives_them_to_the_user(tmp_path: Path):
    nobody = pwd.getpwnam("nobody")
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    (spool / "queue").mkdir(mode=0o755)  # an existing directory keeps its mode
    queued = spool / "queue" / "1A2B3C"  # mail an earlier run as root left
    queued.write_bytes(b"RELAYGW-SPOOL 1\n")
    kept = tmp_path / "kept"
    kept.mkdir()
    config = parse_config({
        "server": {"hostname": "relay.test", "spool_dir": str(spool)},
        "listeners": [{"address": "127.0.0.1:0"}],
        "routes": [{"recipient_domains": ["a.example"], "action": "maildir",
                    "maildir": str(tmp_path / "mail" / "{domain}" / "{localpart}")},
                   {"action": "maildir", "maildir": str(kept / "{domain}" / "{localpart}")}],
    }, tmp_path)
    give_to_user(config, nobody.pw_uid, nobody.pw_gid)
    for path in (spool, spool / "tmp", spool / "queue", spool / "corrupt", spool / "tls"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
        assert st.st_mode & 0o777 == (0o755 if path == spool / "queue" else 0o700), path
    assert queued.stat().st_uid == nobody.pw_uid
    mail = (tmp_path / "mail").stat()
    assert (mail.st_uid, mail.st_mode & 0o777) == (nobody.pw_uid, 0o750)
    assert kept.stat().st_uid == 0  # an existing base is the administrator's
