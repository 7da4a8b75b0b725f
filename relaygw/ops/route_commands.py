"""``relaygw route explain``: the command-line face of relaygw.ops.explain.

Exit status: 0 when the recipient would be accepted at RCPT, 1 when it would be refused
(so scripts can test routing), 2 for usage and configuration errors.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Any

from relaygw.ops.config_loading import load_or_report

__all__ = ["EXIT_ACCEPTED", "EXIT_REFUSED", "EXIT_USAGE", "add_commands", "run_explain"]

EXIT_ACCEPTED = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

_DESCRIPTION = """\
Explain what relaygw does with one recipient: the relay decision and why, alias rewriting,
the matching route (its index and TOML source), the action and next hop, and the exact reply
a client gets at RCPT TO. Nothing is sent and nothing is queued."""

_EPILOG = """\
exit status: 0 the recipient is accepted at RCPT, 1 it is refused, 2 usage or configuration
error.

examples:
  relaygw route explain -c relaygw.toml --from alice@example.org --to bob@example.net
  relaygw route explain -c relaygw.toml --from "" --to postmaster --client-ip 192.0.2.7
  relaygw route explain -c relaygw.toml --from a@example.org --to b@example.net --resolve --json"""


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


def add_commands(subparsers: Any) -> None:
    """Add ``route`` (with its ``explain`` subcommand) to the ``relaygw`` subparsers."""
    route = subparsers.add_parser("route", help="explain routing decisions",
                                  description="Routing tools.")
    commands = route.add_subparsers(dest="route_command", required=True, metavar="COMMAND")
    explain = commands.add_parser(
        "explain", help="show how one recipient is relayed, routed and answered",
        description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    explain.add_argument("--from", dest="sender", required=True, metavar="ADDR",
                         help='envelope sender (MAIL FROM); "" or "<>" for the null sender')
    explain.add_argument("--to", dest="recipient", required=True, metavar="ADDR",
                         help="envelope recipient (RCPT TO)")
    explain.add_argument("--client-ip", type=_ip, default=None, metavar="IP",
                         help="address of the connecting client (default: 127.0.0.1, "
                              "which the default access.trusted_networks trusts: give a "
                              "remote client's address to see what it is answered)")
    explain.add_argument("--auth", dest="auth_user", default=None, metavar="USER",
                         help="explain for a client authenticated as USER (no password is "
                              "checked)")
    explain.add_argument("--resolve", action="store_true",
                         help="also look up the next hops in DNS (MX hosts and addresses), "
                              "with the [dns] settings")
    explain.add_argument("-c", "--config",
                         help="TOML configuration file (default: $RELAYGW_CONFIG, else "
                              "/etc/relaygw/relaygw.toml when it exists, else built-in)")
    explain.add_argument("--json", action="store_true",
                         help="print the explanation as JSON instead of text")
    explain.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    """The handler of ``relaygw route explain``; returns the exit status."""
    from relaygw.ops.explain import explain, render_text, resolve

    config = load_or_report(args.config, warnings=sys.stderr)  # stdout may be JSON
    if config is None:
        return EXIT_USAGE
    result = explain(config, args.sender, args.recipient, client_ip=args.client_ip,
                     auth_user=args.auth_user)
    if args.resolve:
        result = resolve(config, result)
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render_text(result))
    return EXIT_ACCEPTED if result["accepted"] else EXIT_REFUSED
