"""The `relaygw` command: run, check-config, passwd."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from relaygw.ops.config_loading import load_or_report
from relaygw.ops.queue_commands import add_commands as add_queue_commands
from relaygw.ops.route_commands import add_commands as add_route_commands


def _run(args: argparse.Namespace) -> int:
    from twisted.application.service import ServiceMaker
    from twisted.scripts import twistd

    maker = ServiceMaker("relaygw", "relaygw.daemon.tap", "SMTP relay and forwarding gateway",
                         "relaygw")

    class Options(twistd.ServerOptions):
        # Name our own plugin rather than scanning for it, so `relaygw run`
        # works even where Twisted's plugin cache cannot be written.
        def _getPlugins(self, interface: Any, package: Any = None) -> Any:  # noqa: N802
            return [maker]

    argv = ["--nodaemon", "--pidfile=", "relaygw"]
    if args.config:
        argv += ["--config", args.config]
    if args.log_format:
        argv += ["--log-format", args.log_format]
    config = Options()
    try:
        config.parseOptions(argv)
    except SystemExit:
        raise
    except Exception as e:
        print(f"relaygw: {e}", file=sys.stderr)
        return 2
    twistd.runApp(config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    if load_or_report(args.config) is None:
        return 1
    source = args.config or "built-in default"
    print(f"{source}: configuration is valid")
    return 0


def _passwd(args: argparse.Namespace) -> int:
    from relaygw.smtp.auth import UsersFileError, set_password

    if sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.name}: ")
        if getpass.getpass("Again: ") != password:
            print("relaygw passwd: passwords do not match", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relaygw passwd: empty password refused", file=sys.stderr)
        return 1
    try:
        set_password(Path(args.file), args.name, password)
    except (UsersFileError, ValueError) as e:
        print(f"relaygw passwd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"relaygw passwd: {args.file}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"{args.file}: password set for {args.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaygw",
                                     description="SMTP relay and forwarding gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run in the foreground (twistd -n relaygw)")
    run.add_argument("-c", "--config", help="TOML configuration file (default: built-in)")
    run.add_argument("--log-format", choices=["text", "json"],
                     help="log lines as text or JSON (default: [log] format)")
    run.set_defaults(func=_run)
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("-c", "--config", help="TOML configuration file (default: built-in)")
    check.set_defaults(func=_check_config)
    passwd = sub.add_parser("passwd", help="set a user's password in a users file")
    passwd.add_argument("--file", required=True, help="the users file ([auth] users_file)")
    passwd.add_argument("name", help="user name")
    passwd.set_defaults(func=_passwd)
    add_route_commands(sub)
    add_queue_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
