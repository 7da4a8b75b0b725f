"""The inbound policy the SMTP protocol consults at MAIL and RCPT: sender binding,
relaying, routability and storage checks.

Built by the wiring (relaygw.daemon.wiring); the decisions themselves are the pure
functions of relaygw.receive.senders and relaygw.receive.relay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from relaygw.address import MailArgs, RcptArgs
from relaygw.config import Config
from relaygw.receive.relay import ClientInfo, relay_decision
from relaygw.receive.senders import sender_decision
from relaygw.routing import RouteContext, expand_aliases, route_recipient
from relaygw.smtp.replies import INSUFFICIENT_STORAGE, Reply
from relaygw.smtp.server import Session


class FreeSpace(Protocol):
    """The spool, as far as MAIL asks it: the free space it last measured."""

    @property
    def free_bytes(self) -> int | None: ...


class ConfiguredPolicy:
    """Sender/login binding, relay rules, routability at RCPT, alias expansion, spool space.

    ``config_source`` returns the current Config, so a reload applies to the
    next command of every session.
    """

    def __init__(self, config_source: Callable[[], Config], spool: FreeSpace) -> None:
        self.config_source = config_source
        self.spool = spool

    def check_mail(self, session: Session, mail: MailArgs) -> Reply | None:
        config = self.config_source()
        if session.auth_user is not None:
            sender = sender_decision(session.auth_user,
                                     str(mail.address) if mail.address else "",
                                     config.auth.allowed_senders(session.auth_user))
            if sender.reply is not None:
                return sender.reply
        free = self.spool.free_bytes
        declared = int(mail.params.get("SIZE") or 0)
        if free is not None and free - declared < config.server.min_free_space:
            return INSUFFICIENT_STORAGE
        return None

    def check_rcpt(self, session: Session, mail: MailArgs, rcpt: RcptArgs) -> Reply | None:
        config = self.config_source()
        client = ClientInfo(session.client_ip, session.auth_user, session.tls)
        decision = relay_decision(client, rcpt.address, config.access.trusted_networks,
                                  config.access.relay_domains, (config.server.hostname,))
        if decision.reply is not None:
            return decision.reply
        # Refuse now what could never be delivered, so the client learns it at once
        # instead of a bounce later. With aliases, one routable target is enough:
        # the others bounce at delivery.
        context = RouteContext(sender=str(mail.address) if mail.address else "",
                               client_ip=session.client_ip,
                               authenticated=session.auth_user is not None)
        first_reject: tuple[int, str, str] | None = None
        address = str(rcpt.address)
        # Without aliases the expansion is the address itself: skip the table build.
        targets = expand_aliases(address, config.aliases) if config.aliases else [address]
        for target in targets:
            route = route_recipient(target, context, config)
            if not route.is_reject:
                return None
            first_reject = first_reject or route.reply
        # Every target was a reject, and a reject always carries its reply.
        assert first_reject is not None
        code, enhanced, text = first_reject
        return Reply(code, enhanced, text)
