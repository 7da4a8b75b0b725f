"""The inbound policy the SMTP protocol consults: relaying and storage checks.

Built from the configuration by tap.py; the decisions themselves are the pure
functions of relaygw.policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relaygw.address import MailArgs, RcptArgs
from relaygw.policy import ClientInfo, relay_decision
from relaygw.smtp.replies import INSUFFICIENT_STORAGE, Reply
from relaygw.smtp.server import Session


class ConfiguredPolicy:
    def __init__(self, *, trusted_networks: Sequence[Any], relay_domains: Sequence[str],
                 local_domains: Sequence[str], spool: Any, min_free_space: int) -> None:
        self.trusted_networks = tuple(trusted_networks)
        self.relay_domains = tuple(relay_domains)
        self.local_domains = tuple(local_domains)
        self.spool = spool
        self.min_free_space = min_free_space

    def check_mail(self, session: Session, mail: MailArgs) -> Reply | None:
        free = self.spool.free_bytes
        declared = int(mail.params.get("SIZE") or 0)
        if free is not None and free - declared < self.min_free_space:
            return INSUFFICIENT_STORAGE
        return None

    def check_rcpt(self, session: Session, mail: MailArgs, rcpt: RcptArgs) -> Reply | None:
        client = ClientInfo(session.client_ip, session.auth_user, session.tls)
        decision = relay_decision(client, rcpt.address, self.trusted_networks,
                                  self.relay_domains, self.local_domains)
        return decision.reply
