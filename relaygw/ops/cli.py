"""The `relaygw` command: run, check-config, passwd."""

from __future__ import annotations

import argparse
import getpass
import grp
import os
import pwd
import sys
from pathlib import Path
from typing import Any

from relaygw import __version__
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

    argv = ["--nodaemon", "--pidfile="]
    problem = _privilege_problem(args.user, args.group)
    if problem is not None:
        print(f"relaygw run: {problem}", file=sys.stderr)
        return 2
    if args.logfile is not None:
        argv.append(f"--logfile={args.logfile}")
    if args.user is not None:
        argv += ["--uid", args.user]
    if args.group is not None:
        argv += ["--gid", args.group]
    argv.append("relaygw")
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
    from relaygw.daemon.tap import exit_status

    return exit_status()


def _privilege_problem(user: str | None, group: str | None) -> str | None:
    """Why ``--user``/``--group`` cannot work, found before anything starts."""
    wanted: list[tuple[str, int, int]] = []  # option, id, the id relaygw has now
    if user is not None:
        try:
            uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        except KeyError:
            return f"--user: no such user: {user}"
        wanted.append(("--user", uid, os.geteuid()))
    if group is not None:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            return f"--group: no such group: {group}"
        wanted.append(("--group", gid, os.getegid()))
    if os.geteuid() != 0:
        for option, wanted_id, current in wanted:
            if wanted_id != current:
                return f"{option} needs root (relaygw runs as uid {os.geteuid()})"
    return None


def _check_config(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 1
    # The same file work the daemon does at start-up and reload: every file the
    # configuration names is read and checked (nothing is created).
    from relaygw.daemon.wiring import StartupError, prepare

    try:
        prepare(config, announce=False, create=False)
    except StartupError as e:
        for problem in str(e).splitlines():
            print(problem, file=sys.stderr)
        return 1
    source = config.source_path or "built-in default"
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


CONFIG_HELP = ("TOML configuration file (default: $RELAYGW_CONFIG, else "
               "/etc/relaygw/relaygw.toml when it exists, else built-in)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaygw",
                                     description="SMTP relay and forwarding gateway")
    parser.add_argument("--version", action="version", version=f"relaygw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run in the foreground (twistd -n relaygw)")
    run.add_argument("-c", "--config", help=CONFIG_HELP)
    run.add_argument("--log-format", choices=["text", "json"],
                     help="log lines as text or JSON (default: [log] format)")
    run.add_argument("--logfile", metavar="PATH",
                     help="write the log to PATH instead of standard output; SIGUSR1 "
                          "reopens it (for logrotate)")
    run.add_argument("-u", "--user", metavar="USER",
                     help="after binding the ports and reading the secrets as root, run as "
                          "this user (name or uid; twistd -u)")
    run.add_argument("-g", "--group", metavar="GROUP",
                     help="and this group (name or gid; default: the user's group; twistd -g)")
    run.set_defaults(func=_run)
    check = sub.add_parser(
        "check-config", help="validate a configuration file and every file it names",
        description="Check the configuration as the daemon does at start-up and reload: "
                    "the file, then every file it names (TLS certificate and key, users "
                    "file, smarthost password and CA files). Exit status 0: valid; 1: "
                    "each problem printed on stderr, naming its key.")
    check.add_argument("-c", "--config", help=CONFIG_HELP)
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
