"""What ``relaygw queue list`` and ``queue show`` report, as plain JSON-able dicts.

The same functions serve the daemon (over the control socket, from the queue manager's
messages) and the command line when no daemon runs (from the spool, read-only), so both
answer with the same keys. Everything here is pure except :func:`read_content`,
:func:`read_spool` and :func:`read_message`, which block on the disk and never write to it.

Times are ISO 8601 in UTC (``2024-05-01T12:00:00Z``); ages are whole seconds.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from relaygw.delivery.courier import MessageContent
from relaygw.envelope import Envelope
from relaygw.queue.manager import recipient_state_name
from relaygw.queue.state import PENDING, QueueState
from relaygw.queue.store import Spool, StoredMessage
from relaygw.routing import RouteContext, route_recipient

__all__ = ["check_route", "details", "iso", "matches", "parse_age", "read_content", "read_message",
           "read_only_spool", "read_spool", "route_labels", "summarise"]

_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_QUEUE_ID = re.compile(r"[0-9A-Za-z]+")


def iso(when: float | None) -> str | None:
    """Unix time as ISO 8601 UTC to the second, ``None`` stays ``None``."""
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_age(value: str | float) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h``, ``1.5d``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not an age: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"not an age: {value!r}")
        return float(value)
    m = _AGE.fullmatch(value)
    if m is None:
        raise ValueError(f"not an age: {value!r} (use seconds or a number with s, m, h or d)")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def route_labels(envelope: Envelope, state: QueueState, config: Any) -> list[str | None]:
    """For each recipient still pending, the route the config now sends it to
    (``routes[2]``, or ``none``); ``None`` for recipients already final."""
    try:
        client_ip = ip_address(envelope.client_ip) if envelope.client_ip else None
    except ValueError:
        client_ip = None
    context = RouteContext(sender=envelope.sender, client_ip=client_ip,
                           authenticated=envelope.auth_user is not None)
    return [route_recipient(r.address, context, config).route_label
            if r.status == PENDING else None for r in state.recipients]


def summarise(envelope: Envelope, state: QueueState, size: int, now: float,
              config: Any = None) -> dict[str, Any]:
    """One row of ``queue list``. With ``config``, each pending recipient has the ``route``
    the current configuration sends it to; without, ``route`` is ``None``."""
    held = state.held
    routes: Sequence[str | None] = (route_labels(envelope, state, config) if config is not None
                                    else [None] * len(state.recipients))
    recipients = []
    for r, route in zip(state.recipients, routes, strict=True):
        name = recipient_state_name(r, held)
        recipients.append({
            "address": r.address,
            "state": name,
            "attempts": r.attempts,
            # None when no attempt is coming: held, delivered or failed.
            "next_attempt": iso(r.next_attempt) if name in ("pending", "deferred") else None,
            "last_reply": r.last_reply,
            "route": route,
        })
    return {
        "id": envelope.queue_id,
        "arrived": iso(envelope.arrived),
        "age": max(0, int(now - envelope.arrived)),
        "size": size,
        "sender": envelope.sender,
        "held": held,
        "recipients": recipients,
    }


def details(envelope: Envelope, state: QueueState, size: int, now: float, headers: bytes,
            message: bytes | None = None, config: Any = None) -> dict[str, Any]:
    """``queue show``: the summary plus the rest of the envelope, each recipient's history,
    the header section and, when ``message`` is given, the whole message (text, undecodable
    bytes replaced)."""
    result = summarise(envelope, state, size, now, config)
    result.update({
        "client_ip": envelope.client_ip,
        "client_port": envelope.client_port,
        "helo": envelope.helo,
        "tls": envelope.tls,
        "auth_user": envelope.auth_user,
        "params": dict(envelope.params),
        "smtputf8": envelope.smtputf8,
    })
    params = [dict(r.params) for r in envelope.recipients]
    for i, (row, r) in enumerate(zip(result["recipients"], state.recipients, strict=True)):
        row.update({
            "status": r.status,
            "last_attempt": iso(r.last_attempt),
            "enhanced": r.enhanced,
            "remote_host": r.remote_host,
            "notified": r.notified,
            "params": params[i] if i < len(params) else {},
        })
    result["headers"] = headers.decode("utf-8", "replace")
    result["message"] = None if message is None else message.decode("utf-8", "replace")
    return result


def read_content(content: MessageContent, body: bool = False) -> tuple[bytes, bytes | None]:
    """The header section of a queued message and, with ``body``, the whole message.
    Blocking; OSError when the file cannot be read."""
    headers = content.read_headers()
    if not body:
        return headers, None
    return headers, content.read_all()


def read_only_spool(spool_dir: Path) -> Spool:
    """A Spool for reading ``spool_dir`` from outside the daemon: it has no thread pool,
    so only its blocking reads (``queue_ids``, ``_load``, and the blocking methods of
    ``content(...)``) may be used; none of them writes."""
    return Spool(Path(spool_dir), reactor=None, threadpool=None)


def read_spool(spool_dir: Path, errors: list[str] | None = None) -> list[StoredMessage]:
    """The messages in ``spool_dir/queue``, oldest first, read without changing anything.

    Unlike ``Spool.recover`` nothing is created, removed or quarantined: a file that cannot
    be read is skipped, with ``"ID: reason"`` appended to ``errors``. A message removed while
    the directory is read is skipped silently. A missing spool reads as empty.
    """
    spool = read_only_spool(spool_dir)
    try:
        names = spool.queue_ids()
    except FileNotFoundError:
        return []
    messages = []
    for name in names:
        if not _QUEUE_ID.fullmatch(name):
            continue
        try:
            messages.append(spool._load(name))
        except FileNotFoundError:
            continue  # delivered or removed meanwhile
        except (OSError, ValueError, TypeError, KeyError) as exc:
            if errors is not None:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return messages


def read_message(spool_dir: Path, queue_id: str) -> StoredMessage | None:
    """One queued message read from the spool without changing it; ``None`` if there is no
    such message. Other read errors (OSError, ValueError...) propagate."""
    if not _QUEUE_ID.fullmatch(queue_id):
        return None
    try:
        return read_only_spool(spool_dir)._load(queue_id)
    except FileNotFoundError:
        return None


_ROUTE_LABEL = re.compile(r"routes\[([0-9]+)\]")


def check_route(route: str, config: Any) -> None:
    """Raise ValueError, naming it, when the ``route`` filter names a route ``config`` does
    not have: a filter that can never match would look like an empty queue."""
    label = f"routes[{route}]" if route.isdigit() else route.lower()
    if label == "none":
        return
    found = _ROUTE_LABEL.fullmatch(label)
    if found is None:
        raise ValueError(f'not a route: {route} (give routes[N], N, or "none")')
    count = len(config.routes)
    if int(found[1]) >= count:
        have = "routes[0]" if count == 1 else f"routes[0] to routes[{count - 1}]"
        raise ValueError(f"no such route: {route} (the configuration has {have})")


def matches(summary: dict[str, Any], sender: str | None = None,
            recipient_domain: str | None = None, route: str | None = None,
            older_than: str | float | None = None) -> bool:
    """Whether a :func:`summarise` row passes every filter given.

    ``sender``: a glob (``*@example.org``), case-insensitive; ``<>`` or ``""`` is the null
    sender. ``recipient_domain``: any recipient's domain, case-insensitive. ``route``: any
    pending recipient is routed by it (``routes[2]`` or ``2``; ``none`` for no route); needs
    a summary made with a config. ``older_than``: seconds, or a number with s, m, h or d.
    """
    if sender is not None:
        pattern = "" if sender == "<>" else sender.lower()
        if not fnmatch.fnmatchcase(summary["sender"].lower(), pattern):
            return False
    if recipient_domain is not None:
        wanted = recipient_domain.lower().rstrip(".")
        if not any(r["address"].rpartition("@")[2].lower() == wanted
                   for r in summary["recipients"]):
            return False
    if route is not None:
        label = f"routes[{route}]" if route.isdigit() else route.lower()
        if not any(r["route"] == label for r in summary["recipients"]):
            return False
    if older_than is not None and summary["age"] < parse_age(older_than):
        return False
    return True
