"""``relaygw queue ...`` and ``relaygw reload``: the operator's tools for a running daemon.

They talk to the daemon over its control socket (``<spool_dir>/control.sock``, see
:mod:`relaygw.daemon.control`). Without a daemon, ``queue list`` and ``queue show`` read the spool
directly, read-only; the other commands need the daemon and fail.

Exit status: 0 done, 1 error (unknown message, no daemon, bad configuration...), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from relaygw.config import Config, ConfigError, default_path, load
from relaygw.ops.config_loading import source_line

__all__ = ["EXIT_ERROR", "EXIT_OK", "add_commands", "run_queue"]

EXIT_OK = 0
EXIT_ERROR = 1

# command → (control command, past tense for the answer)
_ACTIONS = {
    "flush": ("queue.flush", "flushed"),
    "hold": ("queue.hold", "held"),
    "release": ("queue.release", "released"),
    "delete": ("queue.delete", "deleted"),
    "bounce": ("queue.bounce", "bounced"),
}

_EPILOG = """\
Without a running daemon, list and show read the spool read-only; the other commands need
the daemon. exit status: 0 done, 1 error, 2 usage error."""


def _age_arg(text: str) -> float:
    from relaygw.queue.inspect import parse_age

    try:
        return parse_age(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_commands(subparsers: Any) -> None:
    """Add ``queue`` (list, show, flush, hold, release, delete, bounce) and ``reload`` to the
    ``relaygw`` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="TOML configuration file (default: "
                        "$RELAYGW_CONFIG, else /etc/relaygw/relaygw.toml when it exists, else "
                        "built-in); its server.spool_dir locates the daemon")
    common.add_argument("--json", action="store_true", help="print the result as JSON")

    queue = subparsers.add_parser("queue", help="inspect and act on the mail queue",
                                  description="Inspect and act on the mail queue.",
                                  epilog=_EPILOG)
    commands = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")

    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filters (with list, or with --all)")
    group.add_argument("--sender", metavar="GLOB",
                       help='sender address glob, case-insensitive ("*@example.org"; "<>" is '
                            "the null sender)")
    group.add_argument("--recipient-domain", metavar="DOMAIN",
                       help="only messages with a recipient in DOMAIN")
    group.add_argument("--route", metavar="LABEL",
                       help="only messages with a pending recipient the configuration now "
                            'routes by LABEL ("routes[2]" or "2"; "none": no route); a route '
                            "the configuration does not have is an error")
    group.add_argument("--older-than", metavar="AGE", type=_age_arg,
                       help="only messages older than AGE: seconds or 30m, 2h, 1d")

    ls = commands.add_parser(
        "list", parents=[common, filters], epilog=_EPILOG,
        help="one row per queued message, recipients with their state",
        description="List queued messages: id, age, size, sender, and each recipient with "
                    "its state (pending, deferred, held), next attempt and last error.")
    ls.set_defaults(func=run_queue)

    show = commands.add_parser(
        "show", parents=[common], epilog=_EPILOG,
        help="one message: envelope, recipient history, headers",
        description="Show one queued message: its envelope, each recipient's history and "
                    "the message headers (--body: the whole message).")
    show.add_argument("id", help="queue id")
    show.add_argument("--body", action="store_true", help="print the whole message")
    show.set_defaults(func=run_queue)

    for name, help_text, more in (
            ("flush", "retry now", " (held messages stay held)"),
            ("hold", "park messages: no attempt until released", ""),
            ("release", "resume held messages", ""),
            ("delete", "drop messages without a bounce", ""),
            ("bounce", "fail pending recipients and send the sender a DSN", " saying that "
             "the mail administrator returned the message")):
        action = commands.add_parser(
            name, parents=[common, filters], epilog=_EPILOG, help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}{more}: the messages named, "
                        "or with --all every queued message that list shows with the same "
                        "filters.")
        action.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
        action.add_argument("--all", action="store_true",
                            help="every queued message the filters select")
        action.set_defaults(func=run_queue, parser=action)

    reload = subparsers.add_parser(
        "reload", parents=[common], help="make the running daemon re-read its configuration",
        description="Make the running daemon re-read its configuration file; on errors the "
                    "old configuration stays and the problems are printed.")
    reload.set_defaults(func=run_reload)


# -- locating the daemon ------------------------------------------------------------------------


def _error(message: str) -> int:
    print(f"relaygw: {message}", file=sys.stderr)
    return EXIT_ERROR


def _chosen(path: str | None) -> str | None:
    """The configuration file to read: ``-c``, else the default one (said on stderr);
    None: the built-in default."""
    if path is not None:
        return path
    chosen = default_path()
    print(source_line(chosen), file=sys.stderr)
    return None if chosen is None else str(chosen)


def _load(path: str | None) -> Config:
    return load(path)


def _spool_dir_only(path: str) -> Path | None:
    """server.spool_dir from a config file that does not validate (for reload)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    base = Path(path).absolute().parent
    server = data.get("server", {})
    value = server.get("spool_dir") if isinstance(server, dict) else None
    if value is None:
        return base / "relaygw-data" / "spool"
    return base / value if isinstance(value, str) and value else None


# -- queue ----------------------------------------------------------------------------------------


def run_queue(args: argparse.Namespace) -> int:
    """The handler of every ``relaygw queue`` command; returns the exit status."""
    from relaygw.daemon.control import ControlError, DaemonNotRunning, call, socket_path

    command = args.queue_command
    if command in _ACTIONS:
        if bool(args.ids) == bool(args.all):
            args.parser.error("give message ids or --all")
        if args.ids and _filters(args):
            args.parser.error("filters select messages only with --all")
    try:
        config = _load(_chosen(args.config))
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_ERROR
    spool_dir = config.server.spool_dir
    cmd, request = _request(args)
    try:
        response = call(socket_path(spool_dir), cmd, request)
    except DaemonNotRunning as e:
        if command not in ("list", "show"):
            return _error(str(e))
        print("relaygw is not running: reading the spool read-only", file=sys.stderr)
        try:
            return _offline(args, config, spool_dir)
        except OSError as err:
            return _error(f"{spool_dir}: {err.strerror or err}")
    except ControlError as e:
        return _error(str(e))
    if not response.get("ok"):
        return _error(str(response.get("error", "the daemon refused without a reason")))
    _output(args, response.get("result"))
    return EXIT_OK


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    filters = {"sender": args.sender, "recipient_domain": args.recipient_domain,
               "route": args.route, "older_than": args.older_than}
    return {k: v for k, v in filters.items() if v is not None}


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    command = args.queue_command
    if command == "list":
        return "queue.list", _filters(args)
    if command == "show":
        return "queue.show", {"id": args.id, "body": args.body}
    if args.all:
        return _ACTIONS[command][0], {"all": True, **_filters(args)}
    return _ACTIONS[command][0], {"ids": list(args.ids)}


def _offline(args: argparse.Namespace, config: Any, spool_dir: Path) -> int:
    """list and show from the spool files: nothing is written, moved or removed."""
    from relaygw.queue.inspect import (
        check_route,
        details,
        matches,
        read_content,
        read_message,
        read_only_spool,
        read_spool,
        summarise,
    )

    now = time.time()
    if args.queue_command == "show":
        try:
            stored = read_message(spool_dir, args.id)
        except (ValueError, TypeError, KeyError) as e:
            return _error(f"{args.id}: unreadable queue file: {e}")
        if stored is None:
            return _error(f"no such message: {args.id}")
        try:
            content = read_only_spool(spool_dir).content(stored)
            headers, message = read_content(content, args.body)
        except FileNotFoundError:
            return _error(f"no such message: {args.id}")
        _output(args, details(stored.envelope, stored.state, stored.size, now, headers,
                              message, config))
        return EXIT_OK
    _, filters = _request(args)
    if "route" in filters:
        try:
            check_route(filters["route"], config)
        except ValueError as e:
            return _error(str(e))
    errors: list[str] = []
    messages = read_spool(spool_dir, errors)
    for problem in errors:
        print(f"relaygw: skipped unreadable queue file {problem}", file=sys.stderr)
    rows = [row for row in (summarise(m.envelope, m.state, m.size, now, config)
                            for m in messages) if matches(row, **filters)]
    _output(args, rows)
    return EXIT_OK


# -- reload ---------------------------------------------------------------------------------------


def run_reload(args: argparse.Namespace) -> int:
    """The handler of ``relaygw reload``."""
    from relaygw.daemon.control import ControlError, call, socket_path

    path = _chosen(args.config)
    try:
        spool_dir = _load(path).server.spool_dir
    except ConfigError as e:
        # The file the daemon is asked to re-read may well be broken: the daemon reports
        # its problems (and keeps its configuration); we only need to find the daemon.
        found = _spool_dir_only(path) if path else None
        if found is None:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return EXIT_ERROR
        spool_dir = found
    try:
        response = call(socket_path(spool_dir), "reload", {})
    except ControlError as e:
        return _error(str(e))
    if not response.get("ok"):
        return _error(str(response.get("error", "the daemon refused without a reason")))
    result = response["result"]
    if args.json:
        _print_json(result)
    else:
        for problem in result["problems"]:
            print(f"relaygw: reload: {problem}", file=sys.stderr)
        if not result["problems"]:
            source = result["config"]
            print(f"reloaded {source}" if source
                  else "nothing to reload: the daemon runs the built-in default")
    return EXIT_ERROR if result["problems"] else EXIT_OK


# -- output ---------------------------------------------------------------------------------------


def _print_json(result: Any) -> None:
    sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def _output(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        _print_json(result)
    elif args.queue_command == "list":
        sys.stdout.write(render_list(result))
    elif args.queue_command == "show":
        sys.stdout.write(render_show(result))
    else:
        verb = _ACTIONS[args.queue_command][1]
        if not result:
            print(f"nothing {verb}: no queued message matches" if _filters(args)
                  else f"nothing {verb}: the queue is empty")
        for queue_id in result:
            print(f"{verb} {queue_id}")


def format_age(seconds: int) -> str:
    """45s, 17m, 5h03m, 3d04h."""
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _sender(sender: str) -> str:
    return f"<{sender}>"


def _recipient_line(r: dict[str, Any]) -> str:
    parts = [r["address"], r["state"]]
    if r["next_attempt"] and r["state"] == "deferred":
        parts.append(f"next {r['next_attempt']}")
    if r["last_reply"]:
        parts.append(r["last_reply"])
    return "    " + "  ".join(parts)


def render_list(rows: list[dict[str, Any]]) -> str:
    """The ``queue list`` table: a header, each message with its recipients below it, and
    a count."""
    id_width = max([len("ID")] + [len(r["id"]) for r in rows])
    size_width = max([len("SIZE")] + [len(str(r["size"])) for r in rows])
    lines = [f"{'ID':<{id_width}}  {'AGE':>6}  {'SIZE':>{size_width}}  SENDER"]
    for row in rows:
        held = "  (held)" if row["held"] else ""
        lines.append(f"{row['id']:<{id_width}}  {format_age(row['age']):>6}  "
                     f"{row['size']:>{size_width}}  {_sender(row['sender'])}{held}")
        lines.extend(_recipient_line(r) for r in row["recipients"])
    lines.append(f"{len(rows)} message{'' if len(rows) == 1 else 's'}")
    return "\n".join(lines) + "\n"


def render_show(d: dict[str, Any]) -> str:
    """``queue show``: the envelope, each recipient's history, then headers or message."""
    params = " ".join(k if v is None else f"{k}={v}" for k, v in d["params"].items())
    client = d["client_ip"] and f"{d['helo'] or '-'} [{d['client_ip']}]:{d['client_port']}"
    lines = [
        f"id:         {d['id']}",
        f"arrived:    {d['arrived']} ({format_age(d['age'])} ago)",
        f"size:       {d['size']} bytes",
        f"sender:     {_sender(d['sender'])}",
        f"client:     {client or '- (generated here)'}",
        f"tls:        {d['tls'] or 'none'}",
        f"auth:       {d['auth_user'] or '-'}",
        f"params:     {params or '-'}",
        f"held:       {'yes' if d['held'] else 'no'}",
        "recipients:",
    ]
    for r in d["recipients"]:
        attempts = f"{r['attempts']} attempt{'' if r['attempts'] == 1 else 's'}"
        facts = [r["state"], attempts]
        if r["next_attempt"]:
            facts.append(f"next {r['next_attempt']}")
        if r["route"]:
            facts.append(f"route {r['route']}")
        lines.append(f"  {r['address']}: {', '.join(facts)}")
        if r["last_attempt"]:
            host = f" at {r['remote_host']}" if r["remote_host"] else ""
            lines.append(f"    last attempt {r['last_attempt']}{host}: {r['last_reply'] or '-'}")
    text = d["message"] if d["message"] is not None else d["headers"]
    lines.append("message:" if d["message"] is not None else "headers:")
    body = text.replace("\r\n", "\n")
    out = "\n".join(lines) + "\n" + body
    return out if out.endswith("\n") else out + "\n"
