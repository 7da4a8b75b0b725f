"""``relaygw route explain``: what the daemon does with one recipient, and why.

:func:`explain` answers from the functions the daemon itself calls for MAIL and RCPT
(``parse_mail_from``, ``parse_rcpt_to``, ``relay_decision``, ``expand_aliases``,
``route_recipient``), combined the way ``ConfiguredPolicy.check_rcpt`` combines them, so the
RCPT reply it reports is the one a client gets. It is pure: no I/O, no Twisted.

:func:`resolve` adds what DNS says about the next hops (MX hosts, addresses). It blocks, and
imports :mod:`relaygw.delivery.dns` (and so Twisted) only when called.

The result is a JSON-able dict whose keys are always present (``None`` where a step was not
reached); :func:`render_text` turns it into the report an administrator reads.
"""

from __future__ import annotations

import copy
import ipaddress
import textwrap
from typing import Any

from relaygw.address import Address, MailArgs, RcptArgs, domain_matches
from relaygw.config import Config
from relaygw.receive.relay import ClientInfo, RelayDecision, is_trusted, relay_decision
from relaygw.receive.senders import sender_decision
from relaygw.routing import (
    MAILDIR,
    MX,
    REJECT,
    SMARTHOST,
    RouteContext,
    RouteDecision,
    expand_aliases,
    route_recipient,
)
from relaygw.smtp.arguments import parse_mail_from, parse_rcpt_to
from relaygw.smtp.replies import Reply

__all__ = ["DEFAULT_CLIENT_IP", "explain", "render_text", "resolve"]

DEFAULT_CLIENT_IP = "127.0.0.1"

# What happens to a final recipient.
DELIVER = "deliver"  # accepted at RCPT, then delivered by its route
REFUSE = "refuse"  # the whole recipient is refused at RCPT
BOUNCE = "bounce"  # accepted at RCPT (another alias target is routable); bounces at delivery


# ---------------------------------------------------------------------------------------------
# explain


def explain(config: Config, sender: str, recipient: str, client_ip: str | None = None,
            auth_user: str | None = None, tls: bool = True) -> dict[str, Any]:
    """Explain how the daemon running ``config`` treats ``MAIL FROM:<sender>`` then
    ``RCPT TO:<recipient>`` from ``client_ip``, optionally authenticated as ``auth_user``.

    Addresses may be given with or without angle brackets; ``""`` or ``"<>"`` is the null
    sender. ``client_ip`` None means 127.0.0.1, and the result says it was a default (a
    trusted network in the default configuration). ``ValueError`` if ``client_ip`` is not an
    IP address. Non-ASCII addresses are explained as if the client sent ``SMTPUTF8``.
    """
    ip = ipaddress.ip_address(DEFAULT_CLIENT_IP if client_ip is None else client_ip)
    smtputf8 = not (sender + recipient).isascii()
    result: dict[str, Any] = {
        "input": {"from": sender, "to": recipient, "client_ip": str(ip),
                  "client_ip_default": client_ip is None, "auth_user": auth_user, "tls": tls,
                  "smtputf8": smtputf8},
        "sender_syntax": None,
        "mail_reply": None,
        "recipient_syntax": None,
        "relay": None,
        "aliases": None,
        "routes": None,
        "accepted": False,
        "rcpt_reply": None,
        "dns": None,
        "notes": [],
    }
    notes: list[str] = result["notes"]

    # MAIL FROM, as SMTPServerProtocol.do_mail parses it (after EHLO).
    mail = parse_mail_from(f"FROM:{_path(sender)}" + (" SMTPUTF8" if smtputf8 else ""),
                           smtputf8_offered=True)
    result["sender_syntax"] = _syntax(mail.address if isinstance(mail, MailArgs) else mail)
    if isinstance(mail, Reply):
        result["mail_reply"] = _reply(mail)
    else:
        canonical_sender = str(mail.address) if mail.address else ""
        result["mail_reply"] = _reply(Reply(250, "2.1.0", f"Sender <{canonical_sender}> OK"))
        # The sender/login binding, exactly as ConfiguredPolicy.check_mail asks for it.
        allowed = None if auth_user is None else config.auth.allowed_senders(auth_user)
        binding = sender_decision(auth_user, canonical_sender, allowed)
        if binding.reply is not None:
            assert allowed is not None  # only a bound user is ever refused
            result["mail_reply"] = _reply(binding.reply)
            notes.append(f"auth.senders binds {auth_user!r} to "
                         f"{', '.join(p.text for p in allowed)}; <{canonical_sender}> "
                         "matches none of them.")
            mail = binding.reply

    # RCPT TO, as do_rcpt parses it: a bare <postmaster> is ours.
    rcpt = parse_rcpt_to(f"TO:{_path(recipient)}", smtputf8=smtputf8,
                         default_domain=config.server.hostname)
    result["recipient_syntax"] = _syntax(rcpt.address if isinstance(rcpt, RcptArgs) else rcpt)
    if isinstance(mail, Reply):
        notes.append("MAIL FROM is refused, so the client never gets to RCPT TO.")
        _listener_notes(config, auth_user, notes)
        return result
    if isinstance(rcpt, Reply):
        result["rcpt_reply"] = _reply(rcpt)
        _listener_notes(config, auth_user, notes)
        return result

    # The relay decision, exactly as ConfiguredPolicy.check_rcpt asks for it.
    client = ClientInfo(ip, auth_user, tls)
    decision = relay_decision(client, rcpt.address, config.access.trusted_networks,
                              config.access.relay_domains, (config.server.hostname,))
    result["relay"] = {
        "allowed": decision.allowed,
        "reason": decision.reason,
        "reply": None if decision.reply is None else _reply(decision.reply),
        "detail": _relay_detail(decision, client, rcpt.address, config),
    }
    _client_notes(config, client, client_ip is None, notes)
    _listener_notes(config, auth_user, notes)
    if decision.reply is not None:
        result["rcpt_reply"] = _reply(decision.reply)
        notes.append("Aliases and routes are not consulted: the relay check refuses the "
                     "recipient first.")
        return result

    # Aliases, then one route per final recipient; one routable target is enough at RCPT.
    context = RouteContext(sender=str(mail.address) if mail.address else "", client_ip=ip,
                           authenticated=auth_user is not None)
    address = str(rcpt.address)
    targets = expand_aliases(address, config.aliases)
    decisions = [route_recipient(target, context, config) for target in targets]
    accepted = any(not d.is_reject for d in decisions)
    result["aliases"] = {"expanded": targets, "rewritten": targets != [address]}
    result["routes"] = [_route(config, d, accepted) for d in decisions]
    result["accepted"] = accepted
    if accepted:
        result["rcpt_reply"] = _reply(Reply(250, "2.1.5", f"Recipient <{rcpt.address}> OK"))
    else:
        first_reject = next(d.reply for d in decisions if d.reply is not None)
        result["rcpt_reply"] = _reply(Reply(*first_reject))
    if accepted and any(d.is_reject for d in decisions):
        notes.append("One routable alias target is enough to accept the recipient at RCPT; "
                     "the targets whose route rejects bounce at delivery.")
    if any(d.action == MX for d in decisions):
        notes.append("The mx action looks up DNS at delivery, not at RCPT: a DNS problem "
                     "bounces or defers the message after it was accepted (--resolve shows "
                     "what DNS answers now).")
    return result


def _path(text: str) -> str:
    """The SMTP path for an address given with or without angle brackets."""
    text = text.strip()
    return text if text.startswith("<") else f"<{text}>"


def _reply(reply: Reply) -> str:
    return str(reply)


def _syntax(parsed: Address | Reply | None) -> dict[str, Any]:
    """``address`` is the canonical form the daemon uses ("" for the null sender)."""
    if isinstance(parsed, Reply):
        return {"ok": False, "address": None, "reply": _reply(parsed)}
    return {"ok": True, "address": "" if parsed is None else str(parsed), "reply": None}


def _relay_detail(decision: RelayDecision, client: ClientInfo, recipient: Address,
                  config: Config) -> str:
    """Which configured item made the decision (the decision itself is relay_decision's)."""
    networks = config.access.trusted_networks
    domains = config.access.relay_domains
    if decision.reason == "trusted":
        network = next(n for n in networks if is_trusted(client.ip, [n]))
        return f"client {client.ip} is in access.trusted_networks ({network})"
    if decision.reason == "authenticated":
        return f"the client authenticated as {client.authenticated_user!r} (SMTP AUTH)"
    if decision.reason == "postmaster":
        return (f"{recipient} is this server's postmaster (server.hostname = "
                f"{config.server.hostname!r}), which any client may write to")
    matched = [d for d in domains if domain_matches(recipient.domain, d)]
    if decision.reason == "relay_domain":
        return f"{recipient.domain} matches access.relay_domains ({matched[0]})"
    if decision.reason == "routing_characters":
        return (f"{recipient.domain} is a relay domain ({matched[0]}), but the local part "
                f"{recipient.local!r} holds %, ! or @, which could make the next hop route "
                "the mail elsewhere; only trusted or authenticated clients may send that")
    shown_networks = ", ".join(str(n) for n in networks) or "none"
    shown_domains = ", ".join(domains) or "none"
    where = ("an address literal, never a relay domain" if recipient.domain.startswith("[")
             else f"not in access.relay_domains ({shown_domains})")
    return (f"client {client.ip} is not in access.trusted_networks ({shown_networks}), "
            f"is not authenticated, and {recipient.domain} is {where}")


def _client_notes(config: Config, client: ClientInfo, defaulted: bool,
                  notes: list[str]) -> None:
    trusted = is_trusted(client.ip, config.access.trusted_networks)
    if defaulted and trusted:
        notes.append(f"--client-ip not given: explained for {client.ip}, which is in "
                     "access.trusted_networks, so relaying to any domain is allowed. Pass "
                     "--client-ip to see what a remote client is answered.")
    elif defaulted:
        notes.append(f"--client-ip not given: explained for {client.ip} (not a trusted "
                     "network in this configuration).")
    if trusted and client.authenticated_user is not None:
        notes.append("--auth makes no difference to relaying here: the client's network is "
                     "already trusted (routes with `authenticated` still see it).")


def _listener_notes(config: Config, auth_user: str | None, notes: list[str]) -> None:
    if auth_user is not None:
        if config.auth.users_file is None:
            notes.append(f"--auth {auth_user}: no [auth] users_file is configured, so no "
                         "client can authenticate; this explains a session that cannot happen.")
        elif not any(lc.auth != "none" and lc.tls != "none" for lc in config.listeners):
            notes.append(f"--auth {auth_user}: no listener offers AUTH (it needs tls and "
                         "auth other than \"none\"), so no client can authenticate.")
    else:
        for listener in config.listeners:
            if listener.auth == "required":
                notes.append(f"Listener {listener.address} requires AUTH: there, a client "
                             "that has not authenticated is refused at MAIL FROM with "
                             "530 5.7.0 Authentication required.")


def _route(config: Config, decision: RouteDecision, accepted: bool) -> dict[str, Any]:
    route = None if decision.route_index is None else config.routes[decision.route_index]
    entry: dict[str, Any] = {
        "recipient": decision.recipient,
        "route_index": decision.route_index,
        "route_source": None if route is None else route.source,
        "action": decision.action,
        "nexthop": decision.nexthop,
        "maildir": None,
        "smarthost": None,
        "mx": None,
        "reply": None,
        "outcome": DELIVER if not decision.is_reject else BOUNCE if accepted else REFUSE,
        "note": None,
        "dns": None,
    }
    if decision.action == MAILDIR:
        entry["maildir"] = str(decision.maildir)
    elif decision.action == SMARTHOST:
        assert decision.smarthost is not None
        smarthost = config.smarthost(decision.smarthost)
        entry["smarthost"] = {
            "name": smarthost.name,
            "hosts": [str(hp) for hp in smarthost.hosts],
            "tls": smarthost.tls,
            "ca_file": _str(smarthost.ca_file),
            "username": smarthost.username,
            "password_file": _str(smarthost.password_file),  # the path; never the secret
        }
    elif decision.action == MX:
        entry["mx"] = {"domain": decision.domain, "port": config.delivery.mx_port,
                       "tls": config.delivery.tls, "ca_file": _str(config.delivery.ca_file)}
    elif decision.action == REJECT:
        assert decision.reply is not None
        entry["reply"] = _reply(Reply(*decision.reply))
        if route is not None and route.action != REJECT:
            entry["note"] = (f'routes[{route.index}] has action = "{route.action}", but '
                             f"{decision.recipient} cannot be delivered that way")
        elif route is None:
            entry["note"] = "no [[routes]] entry matches this recipient"
    return entry


def _str(value: object) -> str | None:
    return None if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# resolve


def resolve(config: Config, result: dict[str, Any], *, rng: Any = None) -> dict[str, Any]:
    """A copy of ``result`` whose mx and smarthost routes carry what DNS answers now.

    Blocking, with the configuration's ``[dns]`` servers and timeout (none: the system
    resolver). Failures are classified by :mod:`relaygw.delivery.dns` as delivery would see them:
    permanent (the message bounces) or transient (delivery is retried).
    """
    from relaygw.delivery.dns import blocking_resolver  # Twisted comes with it: only when asked

    out = copy.deepcopy(result)
    out["dns"] = {"nameservers": [str(hp) for hp in config.dns.nameservers],
                  "timeout": config.dns.timeout}
    resolver = None
    for entry in out["routes"] or ():
        if entry["mx"] is None and entry["smarthost"] is None:
            continue
        if resolver is None:  # only when there is something to ask
            resolver = blocking_resolver(config.dns.nameservers, config.dns.timeout, rng)
        if entry["mx"] is not None:
            entry["dns"] = _resolve_mx(resolver, config, entry["mx"])
        elif entry["smarthost"] is not None:
            smarthost = config.smarthost(entry["smarthost"]["name"])
            hosts = [_resolve_host(resolver, hp.host, hp.port, None) for hp in smarthost.hosts]
            entry["dns"] = {"implicit": None, "hosts": hosts, "error": _all_hosts_failed(hosts)}
    return out


def _failure(result: Any, effect: str | None = None) -> dict[str, Any]:
    """A DNSFailure's DeliveryResult; ``effect`` is what delivery does about it."""
    if effect is None:
        effect = "bounce" if result.status == "permanent" else "retry"
    return {"status": result.status, "enhanced": result.enhanced, "text": result.text,
            "effect": effect}


def _resolve_host(resolver: Any, host: str, port: int, preference: int | None) -> dict[str, Any]:
    from relaygw.delivery.dns import DNSFailure, blocking_result

    entry: dict[str, Any] = {"host": host, "preference": preference, "port": port,
                             "addresses": [], "error": None}
    try:
        entry["addresses"] = blocking_result(resolver.host_addresses(host))
    except DNSFailure as e:
        entry["error"] = _failure(e.result, "skip")  # delivery tries the next host
    return entry


def _all_hosts_failed(hosts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """RelayCourier: a host without addresses is skipped; when none is left, the attempt
    ends transient 4.4.3 with the last lookup's text, and delivery is retried."""
    if not hosts or any(h["error"] is None for h in hosts):
        return None
    return {"status": "transient", "enhanced": "4.4.3", "text": hosts[-1]["error"]["text"],
            "effect": "retry"}


def _resolve_mx(resolver: Any, config: Config, mx: dict[str, Any]) -> dict[str, Any]:
    from relaygw.delivery.dns import DNSFailure, blocking_result

    domain = mx["domain"]
    try:
        answer = blocking_result(resolver.mx_hosts(domain))
    except DNSFailure as e:
        return {"implicit": None, "hosts": [], "error": _failure(e.result)}
    # Shown in a fixed order; delivery shuffles hosts of equal preference on each attempt.
    ordered = sorted(answer.hosts, key=lambda h: (h.preference, h.host))
    hosts = [_resolve_host(resolver, h.host, mx["port"], h.preference) for h in ordered]
    error = _all_hosts_failed(hosts)
    for h in ordered:  # RelayCourier._mx_targets refuses these before connecting anywhere
        if h.host == config.server.hostname:
            error = {"status": "permanent", "enhanced": "5.4.6",
                     "text": f"mail for {domain} loops back to myself (MX {h.host})",
                     "effect": "bounce"}
            break
    return {"implicit": answer.implicit, "hosts": hosts, "error": error}


# ---------------------------------------------------------------------------------------------
# text

_WIDTH = 13  # label column
_LINE = 96  # prose is wrapped to this width; addresses, paths and TOML never are

_RELAY_REASONS = {
    "trusted": "trusted network",
    "authenticated": "authenticated client",
    "postmaster": "this server's postmaster",
    "relay_domain": "relay domain",
    "routing_characters": "routing characters in the local part",
    "denied": "not trusted, not authenticated, not a relay domain",
}


def _row(label: str, value: str, indent: int = 2, wrap: bool = False) -> list[str]:
    """``label`` padded to the value column; continuation lines aligned under the value."""
    pad = " " * (indent + _WIDTH)
    if wrap:
        value = "\n".join(textwrap.wrap(value, _LINE - len(pad), break_on_hyphens=False))
    first, *rest = value.split("\n") if value else [""]
    return [f"{' ' * indent}{label:<{_WIDTH}}{first}".rstrip(), *(pad + line for line in rest)]


def render_text(result: dict[str, Any]) -> str:
    """The report for humans: one section per step, in the order the daemon takes them."""
    given = result["input"]
    lines: list[str] = []
    if result["rcpt_reply"] is None:
        lines += [f"REFUSED at MAIL FROM: {result['mail_reply']}", ""]
    else:
        lines += [f"{'ACCEPTED' if result['accepted'] else 'REFUSED'}: {result['rcpt_reply']}",
                  ""]

    lines.append("Envelope")
    sender = result["sender_syntax"]
    shown_sender = f"<{sender['address']}>" if sender["ok"] else repr(given["from"])
    lines += _row("MAIL FROM", shown_sender)
    lines += _row("", result["mail_reply"])
    recipient = result["recipient_syntax"]
    lines += _row("RCPT TO", f"<{recipient['address']}>" if recipient["ok"]
                  else repr(given["to"]))
    if not recipient["ok"]:
        lines += _row("", f"syntax error: {recipient['reply']}")
    client = given["client_ip"] + (" (default)" if given["client_ip_default"] else "")
    lines += _row("client", client)
    lines += _row("auth user", given["auth_user"] or "(not authenticated)")
    if given["smtputf8"]:
        lines += _row("SMTPUTF8", "yes (a non-ASCII address needs it)")

    relay = result["relay"]
    if relay is not None:
        lines += ["", "Relay"]
        reason = _RELAY_REASONS.get(relay["reason"], relay["reason"])
        lines += _row("decision", ("allowed" if relay["allowed"] else "DENIED") + f": {reason}")
        lines += _row("why", relay["detail"], wrap=True)
        if relay["reply"]:
            lines += _row("reply", relay["reply"])

    aliases = result["aliases"]
    if aliases is not None:
        lines += ["", "Aliases"]
        if aliases["rewritten"]:
            lines += _row(f"{len(aliases['expanded'])} target(s)",
                          "\n".join(aliases["expanded"]))
        else:
            lines += _row("none", f"no [aliases] entry applies to {recipient['address']}")

    if result["dns"] is not None and any(r["dns"] for r in result["routes"] or ()):
        lines += ["", "DNS (--resolve)"]
        lines += _row("servers", ", ".join(result["dns"]["nameservers"])
                      or "the system resolver (no [dns] nameservers)")
        lines += _row("timeout", f"{result['dns']['timeout']:g}s per lookup")
        lines += _row("note", "DNS is consulted at delivery, not at RCPT: its answers never "
                              "change the RCPT reply.", wrap=True)

    routes = result["routes"] or []
    for entry in routes:
        lines += ["", f"Route for {entry['recipient']}"]
        lines += _render_route(entry)

    lines += ["", "Answer at RCPT"]
    lines += _row("reply", result["rcpt_reply"] or "none: MAIL FROM is refused first")
    lines += _row("accepted", "yes" if result["accepted"] else "no")


    if result["notes"]:
        lines += ["", "Notes"]
        for note in result["notes"]:
            lines += textwrap.wrap(note, _LINE, initial_indent="  - ", subsequent_indent="    ",
                                   break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def _render_route(entry: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if entry["route_index"] is None:
        lines += _row("route", "none matched")
    else:
        lines += _row("route", f"routes[{entry['route_index']}]")
        lines += _row("source", entry["route_source"])
    action = entry["action"]
    lines += _row("action", action)
    if entry["nexthop"] and entry["maildir"] is None:  # a maildir's next hop is its path
        lines += _row("next hop", entry["nexthop"])
    if entry["maildir"] is not None:
        lines += _row("maildir", entry["maildir"])
    smarthost = entry["smarthost"]
    if smarthost is not None:
        lines += _row("smarthost", smarthost["name"])
        lines += _row("hosts", ", ".join(smarthost["hosts"]) + "  (tried in this order)")
        lines += _row("tls", _tls_text(smarthost["tls"], smarthost["ca_file"]))
        if smarthost["username"] is not None:
            lines += _row("username", smarthost["username"])
            lines += _row("password", f"from {smarthost['password_file']} (never shown)")
        else:
            lines += _row("credentials", "none (no AUTH)")
    mx = entry["mx"]
    if mx is not None:
        lines += _row("domain", mx["domain"])
        lines += _row("port", str(mx["port"]))
        lines += _row("tls", _tls_text(mx["tls"], mx["ca_file"], "delivery.tls"))
    if entry["reply"] is not None:
        lines += _row("reply", entry["reply"])
    if entry["note"]:
        lines += _row("note", entry["note"], wrap=True)
    outcome = {DELIVER: "accepted at RCPT, then delivered by this route",
               BOUNCE: "accepted at RCPT (another alias target is routable), then bounced "
                       "with the reply above",
               REFUSE: "refused at RCPT"}[entry["outcome"]]
    dns = entry["dns"]
    if dns is not None:
        lines += _render_dns(dns, mx is not None)
        if entry["outcome"] == DELIVER and dns["error"] is not None:
            outcome = {"bounce": "accepted at RCPT, then bounced: see the DNS result",
                       "retry": "accepted at RCPT, then retried while DNS fails: see the DNS "
                                "result"}[dns["error"]["effect"]]
    lines += _row("outcome", outcome, wrap=True)
    return lines


_TLS_MODES = {
    "none": "plaintext",
    "opportunistic": "STARTTLS when offered, certificate not verified",
    "require": "STARTTLS or no delivery, certificate not verified",
    "verify": "STARTTLS or no delivery, certificate verified",
    "implicit": "TLS from the first byte, certificate verified",
}


def _tls_text(mode: str, ca_file: str | None, key: str | None = None) -> str:
    text = mode + (f" ({key})" if key else "") + f": {_TLS_MODES.get(mode, '?')}"
    if mode in ("verify", "implicit"):
        text += f"\nCA: {ca_file or 'the system trust store'}"
    return text


def _render_failure(failure: dict[str, Any]) -> str:
    effect = {"bounce": "delivery bounces the message", "retry": "delivery is retried later",
              "skip": "delivery skips this host"}[failure["effect"]]
    return f"{failure['status']} {failure['enhanced']} {failure['text']}: {effect}"


def _render_dns(dns: dict[str, Any], is_mx: bool) -> list[str]:
    lines: list[str] = []
    if is_mx and dns["implicit"]:
        lines += _row("MX", "no MX records: the domain's own address is used (implicit MX)")
    hosts = dns["hosts"]
    preferences = [h["preference"] for h in hosts]
    for host in hosts:
        label, name = "host", f"{host['host']}:{host['port']}"
        if is_mx:
            label = "MX" if dns["implicit"] else f"MX {host['preference']}"
            if preferences.count(host["preference"]) > 1:
                name += "  (equal preference: random order at each attempt)"
        found = (", ".join(host["addresses"]) if host["error"] is None
                 else _render_failure(host["error"]))
        lines += _row(label, f"{name}\n  {found}")
    if dns["error"] is not None:
        lines += _row("DNS result", _render_failure(dns["error"]))
    elif hosts:
        lines += _row("DNS result", "ok: delivery tries these hosts in order")
    return lines
