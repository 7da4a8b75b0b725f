"""Inbound relay policy: may this client hand us mail for this recipient? Pure, no I/O."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from relaygw.address import Address, domain_matches
from relaygw.smtp.replies import RELAY_DENIED, Reply

__all__ = [
    "ROUTING_CHARACTERS_DENIED",
    "ClientInfo",
    "RelayDecision",
    "is_trusted",
    "relay_decision",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ROUTING_CHARACTERS_DENIED = Reply(554, "5.7.1", "Routing characters in local part not allowed")

# "%" (percent hack), "!" (UUCP bang path) and a quoted "@" can make a downstream host route
# the mail somewhere other than the domain we checked (Postfix allow_untrusted_routing = no).
_ROUTING_CHARACTERS = re.compile(r"[%!@]")


@dataclass(frozen=True)
class ClientInfo:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    authenticated_user: str | None = None
    tls: bool = False


@dataclass(frozen=True)
class RelayDecision:
    allowed: bool
    reason: str  # trusted | authenticated | postmaster | relay_domain | denied | routing_characters
    reply: Reply | None  # None when allowed


_TRUSTED = RelayDecision(True, "trusted", None)
_AUTHENTICATED = RelayDecision(True, "authenticated", None)
_POSTMASTER = RelayDecision(True, "postmaster", None)
_RELAY_DOMAIN = RelayDecision(True, "relay_domain", None)
_ROUTING = RelayDecision(False, "routing_characters", ROUTING_CHARACTERS_DENIED)
_DENIED = RelayDecision(False, "denied", RELAY_DENIED)


def is_trusted(ip: IPAddress, trusted_networks: Iterable[IPNetwork]) -> bool:
    """Whether ``ip`` lies in one of ``trusted_networks``.

    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``, what a dual-stack listener reports for
    IPv4 clients) is the IPv4 host it maps, so it matches IPv4 networks too.
    """
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    # "in" is False across address families, so each network is tried with both forms.
    return any(ip in net or (mapped is not None and mapped in net) for net in trusted_networks)


def _is_local_postmaster(recipient: Address, local_domains: Iterable[str]) -> bool:
    if recipient.local.lower() != "postmaster":
        return False
    if recipient.domain.startswith("["):
        # postmaster@[our address] (RFC 5321 §4.1.3) only if that literal is configured as ours.
        return recipient.domain.lower() in (d.lower() for d in local_domains)
    return any(domain_matches(recipient.domain, d) for d in local_domains)


def relay_decision(
    client: ClientInfo,
    recipient: Address,
    trusted_networks: Iterable[IPNetwork],
    relay_domains: Iterable[str],
    local_domains: Iterable[str] = (),
) -> RelayDecision:
    """Decide whether ``client`` may send to ``recipient``; first match wins.

    Trusted networks, then authenticated users, then our own postmaster, then configured relay
    domains (``domain_matches`` patterns). The domain looked at is always the parsed final
    domain, never anything inside the local part.
    """
    if is_trusted(client.ip, trusted_networks):
        return _TRUSTED
    if client.authenticated_user is not None:
        return _AUTHENTICATED
    if _is_local_postmaster(recipient, local_domains):
        return _POSTMASTER
    # Address literals name a host, not a configured domain: never a relay domain for strangers.
    if not recipient.domain.startswith("[") and any(
        domain_matches(recipient.domain, pattern) for pattern in relay_domains
    ):
        if _ROUTING_CHARACTERS.search(recipient.local):
            return _ROUTING
        return _RELAY_DOMAIN
    return _DENIED
