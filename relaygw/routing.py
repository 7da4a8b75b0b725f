"""Routing: alias expansion and which action and next hop each recipient gets. Pure, no I/O.

Like Postfix's trivial-rewrite, the router gives one answer per recipient, a ``RouteDecision``
(action, next hop, final recipient), and delivery acts on it without deciding again: the
``[[routes]]`` are tried in order and the first route whose every given key matches wins.
``expand_aliases`` turns a recipient into its final ones; the receive stage applies it once, as a
message is accepted, so the envelope holds final recipients. ``route_recipient`` runs at RCPT
time (on the expansion, so an unroutable recipient is refused at once) and again at every
delivery attempt (so a changed config applies to mail already queued); the queue manager groups
the decisions into transactions.

Addresses are plain ``local@domain`` strings as the SMTP parser writes them (``str(Address)``):
the domain is everything after the last "@", and a quoted local part (``"john smith"@x``) is
unquoted where its value matters (alias lookup, mailbox names).
"""

from __future__ import annotations

import ipaddress
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from relaygw.address import domain_matches
from relaygw.config import AliasEntry, Config, RouteConfig
from relaygw.results import DeliveryResult, permanent

__all__ = [
    "MAILDIR",
    "MX",
    "REJECT",
    "SMARTHOST",
    "RouteContext",
    "RouteDecision",
    "expand_aliases",
    "maildir_path",
    "route_recipient",
]

MAILDIR = "maildir"
SMARTHOST = "smarthost"
MX = "mx"
REJECT = "reject"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NO_ROUTE_ENHANCED = "5.1.2"
INVALID_MAILBOX = (550, "5.1.3", "Invalid mailbox name")
NO_DOMAIN = (550, "5.1.3", "Recipient address has no domain")

MAX_ALIAS_DEPTH = 10
# Work bound for alias expansion: a config whose aliases form a wide, deep graph (every alias
# pointing at several others, ten levels down) would otherwise take exponential time.
MAX_ALIAS_LOOKUPS = 10_000

_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
# Characters never allowed in a mailbox path component: C0/C1 controls and DEL (Cc), lone
# surrogates (Cs, which cannot be encoded as a file name) and the Unicode line and paragraph
# separators (Zl, Zp), which break log lines as CR/LF do.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


@dataclass(frozen=True)
class RouteContext:
    """What routing may look at besides the recipient."""

    sender: str  # "" for the null reverse-path <>
    client_ip: IPAddress | None  # None for locally generated mail (bounces)
    authenticated: bool


@dataclass(frozen=True)
class RouteDecision:
    """The router's single answer for one recipient."""

    action: str  # MAILDIR | SMARTHOST | MX | REJECT
    recipient: str  # the final (alias-expanded) address this decision is for
    route_index: int | None  # index into config.routes; None when no route matched
    # Grouping key: maildir → the mailbox path; smarthost → "smarthost:NAME";
    # mx → "mx:DOMAIN" (lowercase); reject → "".
    nexthop: str
    maildir: Path | None = None
    smarthost: str | None = None
    domain: str = ""  # the recipient's domain, lowercase
    reply: tuple[int, str, str] | None = None  # (code, enhanced, text) for rejects only
    original: str = ""  # the recipient as given before alias expansion

    @property
    def route_label(self) -> str:
        """``routes[2]``, or ``none`` when no route matched; for logs."""
        return "none" if self.route_index is None else f"routes[{self.route_index}]"

    @property
    def is_reject(self) -> bool:
        return self.action == REJECT

    def as_delivery_result(self) -> DeliveryResult | None:
        """For a reject found at delivery time: the permanent failure to record; else None."""
        if self.reply is None:
            return None
        code, enhanced, text = self.reply
        return permanent(enhanced, text, code=code)


# ---------------------------------------------------------------------------------------------
# Addresses


def _split(address: str) -> tuple[str, str]:
    """``(local, domain)``; the domain follows the last "@" (a quoted local part may hold "@")."""
    local, at, domain = address.rpartition("@")
    return (local, domain) if at else (address, "")


def _unquote(local: str) -> str:
    """The value of a local part: ``"john smith"`` → ``john smith``, quoted-pairs resolved."""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return local


def _normalise_domain(domain: str) -> str:
    name = domain.lower().removesuffix(".")
    if not name.isascii() and not name.startswith("["):
        try:
            name = name.encode("idna").decode("ascii").lower()
        except UnicodeError:
            pass
    return name


def _alias_key(address: str) -> str:
    """Aliases compare the whole address case-insensitively, local part included."""
    local, domain = _split(address)
    return f"{_unquote(local).lower()}@{_normalise_domain(domain)}"


def _identity(address: str) -> str:
    """What makes two final recipients the same mailbox: the local part keeps its case."""
    local, domain = _split(address)
    return f"{_unquote(local)}@{_normalise_domain(domain)}"


# ---------------------------------------------------------------------------------------------
# Aliases


def _alias_table(aliases: Sequence[AliasEntry]) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for entry in aliases:
        key = _alias_key(entry.source)  # "@domain" keys become "@domain" too
        table.setdefault(key, entry.targets)
    return table


def _lookup(address: str, table: Mapping[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    """The exact entry first, then the domain rewrite; None when no alias applies."""
    targets = table.get(_alias_key(address))
    if targets is not None:
        return targets
    local, domain = _split(address)
    rewrite = table.get(f"@{_normalise_domain(domain)}")
    if not rewrite:
        return None
    return tuple(f"{local}@{target[1:]}" if target.startswith("@") else target
                 for target in rewrite)


def _expand(address: str, table: Mapping[str, tuple[str, ...]], max_depth: int,
            max_lookups: int) -> list[str]:
    out: dict[str, str] = {}  # identity → address, in order of first appearance
    lookups = 0
    # Depth-first, iteratively; each entry carries the alias keys of its ancestors.
    stack: list[tuple[str, frozenset[str], int]] = [(address, frozenset(), 0)]
    while stack:
        current, ancestors, depth = stack.pop()
        key = _alias_key(current)
        targets = None
        # A loop (the address reappears in its own expansion), the depth limit or the work
        # bound stops expansion here: the address is delivered as it is, never dropped.
        if key not in ancestors and depth < max_depth and lookups < max_lookups:
            lookups += 1
            targets = _lookup(current, table)
        if not targets:
            out.setdefault(_identity(current), current)
            continue
        below = ancestors | {key}
        stack.extend((target, below, depth + 1) for target in reversed(targets))
    return list(out.values())


def expand_aliases(address: str, aliases: Sequence[AliasEntry], max_depth: int = MAX_ALIAS_DEPTH, *,
                   max_lookups: int = MAX_ALIAS_LOOKUPS) -> list[str]:
    """The final recipients for ``address`` after ``[aliases]``, in order, without duplicates.

    An exact ``local@domain`` entry is replaced by its targets; failing that, an ``@domain``
    entry rewrites the domain and keeps the local part. Targets are expanded again. Alias lookup
    ignores case in the domain and in the local part (as most MTAs do for aliases); duplicates
    are removed by mailbox, where the local part keeps its case.

    Expansion stops at an address, which is then delivered as it is, when the address reappears
    in its own expansion (a loop; an alias that includes itself keeps a copy there), after
    ``max_depth`` rewrites along one chain, or after ``max_lookups`` lookups in all.
    """
    return _expand(address, _alias_table(aliases), max_depth, max_lookups)


# ---------------------------------------------------------------------------------------------
# Maildir paths


def _safe_component(text: str) -> bool:
    """No path separators, NUL or other controls, not empty, no leading "." (so not "..")."""
    return bool(text) and not text.startswith(".") and not any(
        c in "/\\" or unicodedata.category(c) in _UNSAFE_CATEGORIES for c in text)


def _components(path: str) -> list[str]:
    return [part for part in path.split(os.sep) if part not in ("", os.curdir)]


def _within_prefix(path: str, prefix: str) -> bool:
    """Whether normalised ``path`` lies strictly below the fixed text ``prefix``.

    ``prefix`` is a directory plus the start of a name in it ("/var/mail/user-"): the path must
    be below that directory, its first component below it must start with that name, and no
    ".." may remain after the directory.
    """
    directory, stub = os.path.split(prefix)
    directory = os.path.normpath(directory) if directory else ""
    if os.path.isabs(path) != os.path.isabs(directory):
        return False
    parts, base = _components(path), _components(directory)
    return (len(parts) > len(base) and parts[:len(base)] == base
            and ".." not in parts[len(base):] and parts[len(base)].startswith(stub))


def maildir_path(template: str, address: str) -> Path | None:
    """The mailbox for ``address`` from a template with ``{domain}`` and ``{localpart}``.

    None when the address cannot name a mailbox safely: a local part or domain that is empty,
    starts with "." (so also "." and ".."), or holds "/", "\\", NUL or another control
    character. A quoted local part is unquoted first, so ``"john smith"@x`` is the mailbox
    "john smith". The domain is lowercased (IDNA A-label form, checked after conversion, since
    IDNA maps some characters to "/" or "."); the local part keeps its case. As a second guard
    the normalised result must lie inside the template's fixed prefix (the text before the
    first "{"). Symbolic links are not looked at: this function does no I/O.
    """
    local, domain = _split(address)
    local, domain = _unquote(local), _normalise_domain(domain)
    if not (_safe_component(local) and _safe_component(domain)):
        return None
    filled = os.path.normpath(template.format(domain=domain, localpart=local))
    if "{" in template and not _within_prefix(filled, template.partition("{")[0]):
        return None
    return Path(filled)


# ---------------------------------------------------------------------------------------------
# Routes


def _client_matches(client_ip: IPAddress | None, route: RouteConfig) -> bool:
    if client_ip is None:
        return False
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; match them as IPv4 too.
    mapped = client_ip.ipv4_mapped if isinstance(client_ip, ipaddress.IPv6Address) else None
    return any(client_ip in network or (mapped is not None and mapped in network)
               for network in route.client_networks)


def _route_matches(route: RouteConfig, recipient: str, domain: str,
                   context: RouteContext) -> bool:
    """Every key the route gives must match; a route that gives none matches everything."""
    if route.recipient_domains and not any(pattern == "*" or domain_matches(domain, pattern)
                                           for pattern in route.recipient_domains):
        return False
    if route.recipients and not any(p.matches(recipient) for p in route.recipients):
        return False
    # The null sender "" meets only a pattern that matches the empty string ("*", "re:^$").
    if route.senders and not any(p.matches(context.sender) for p in route.senders):
        return False
    if route.client_networks and not _client_matches(context.client_ip, route):
        return False
    return route.authenticated is None or route.authenticated == context.authenticated


def _reject(recipient: str, domain: str, index: int | None, reply: tuple[int, str, str],
            original: str) -> RouteDecision:
    return RouteDecision(REJECT, recipient, index, "", domain=domain, reply=reply,
                         original=original)


def _decide(route: RouteConfig, recipient: str, domain: str, original: str) -> RouteDecision:
    if route.action == MAILDIR:
        assert route.maildir is not None  # config requires it with action = "maildir"
        path = maildir_path(route.maildir, recipient)
        if path is None:
            return _reject(recipient, domain, route.index, INVALID_MAILBOX, original)
        return RouteDecision(MAILDIR, recipient, route.index, str(path), maildir=path,
                             domain=domain, original=original)
    if route.action == SMARTHOST:
        return RouteDecision(SMARTHOST, recipient, route.index, f"smarthost:{route.smarthost}",
                             smarthost=route.smarthost, domain=domain, original=original)
    if route.action == MX:
        if not domain:
            return _reject(recipient, domain, route.index, NO_DOMAIN, original)
        return RouteDecision(MX, recipient, route.index, f"mx:{domain}", domain=domain,
                             original=original)
    if route.action == REJECT:
        assert route.reply_code is not None and route.reply_enhanced is not None
        reply = (route.reply_code, route.reply_enhanced, route.reply_text or "")
        return _reject(recipient, domain, route.index, reply, original)
    raise ValueError(f"routes[{route.index}]: unknown action {route.action!r}")


def route_recipient(recipient: str, context: RouteContext, config: Config, *,
                    original: str | None = None) -> RouteDecision:
    """The decision for one final recipient: the first route whose every given key matches.

    No aliases are applied here (see ``expand_aliases``). When no route matches, the decision is
    a reject with ``550 5.1.2``; a maildir route whose mailbox name is unsafe rejects with
    ``550 5.1.3``.
    """
    domain = _normalise_domain(_split(recipient)[1])
    original = recipient if original is None else original
    for route in config.routes:
        if _route_matches(route, recipient, domain, context):
            return _decide(route, recipient, domain, original)
    reply = (550, NO_ROUTE_ENHANCED, f"No route to destination for <{recipient}>")
    return _reject(recipient, domain, None, reply, original)

