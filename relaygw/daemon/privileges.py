"""Privileges: what root does for the user relaygw drops to (``--user``/``--group``,
twistd's ``-u``/``-g``) before the drop, and what that user is checked for after it.

Secrets need nothing here: they are read before the drop (``wiring.prepare``, from
twistd's ``makeService``), and worker processes get them from the main process.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.logger import Logger

from relaygw.config import Config
from relaygw.daemon.wiring import StartupError

# The namespace start-up lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.tap")


def give_to_user(config: Config, uid: int, gid: int) -> None:
    """As root, before the drop to ``uid``/``gid``: make the spool's directories (0700)
    and the fixed part of each Maildir template, and give the ones made (and the spool
    layout in any case) to that user, so it can write there after the drop. Secrets
    stay as they are: they were read already."""
    spool = config.server.spool_dir
    layout = [spool, spool / "tmp", spool / "queue", spool / "corrupt", spool / "tls"]
    try:
        for directory in layout:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The layout and what is directly in it (queued mail of an earlier run as root).
        entries = [entry for directory in layout[1:] for entry in directory.iterdir()]
        for path in [*layout, *entries]:
            if os.lstat(path).st_uid != uid:
                os.chown(path, uid, gid, follow_symlinks=False)
    except OSError as e:
        raise StartupError(f"server.spool_dir: cannot prepare {e.filename or spool} for "
                           f"uid {uid}: {e.strerror or e}") from None
    for route in config.routes:
        base = maildir_base(route.maildir) if route.maildir else None
        if base is None or base.exists():
            continue
        try:
            base.mkdir(mode=0o750, parents=True)
            os.chown(base, uid, gid)
        except OSError as e:
            raise StartupError(f"routes[{route.index}].maildir: cannot create {base} for "
                               f"uid {uid}: {e.strerror or e}") from None


def maildir_base(template: str) -> Path | None:
    """The directory of a Maildir template before its first placeholder
    (``/var/mail/{domain}/{localpart}`` -> ``/var/mail``)."""
    fixed = template.split("{", 1)[0]
    base = Path(fixed) if fixed.endswith("/") else Path(fixed).parent
    return base if base.is_absolute() and base != Path("/") else None


def warn_unwritable_maildirs(config: Config) -> None:
    """After the drop: a Maildir base this user cannot write in defers every delivery
    there; say so at start rather than at the first message."""
    for route in config.routes:
        base = maildir_base(route.maildir) if route.maildir else None
        while base is not None:
            try:
                os.stat(base)
            except FileNotFoundError:  # made at the first delivery: its parent must allow it
                base = base.parent if base != base.parent else None
                continue
            except OSError:
                pass  # cannot even reach it
            if not os.access(base, os.W_OK | os.X_OK):
                log.warn("routes[{index}].maildir: {path} is not writable by this process "
                         "(uid {uid}): deliveries there will be deferred", index=route.index,
                         path=str(base), uid=os.geteuid())
            break
