"""The line protocol between the main process and its SMTP workers: shared pieces.

A UNIX stream socket per worker, one message a line (``<kind> <payload>``):

    main -> worker   ``K <base64 pickle>`` first: the configuration (and users) to serve,
                     the main process's, not the file on disk, which may have changed
                     ``C <id> <listener> <family>`` with the client socket attached
                     ``R`` retire (after a reload): take no more, exit when the
                     sessions have ended; ``D`` drain (shutdown): finish the
                     transactions within the grace, then exit
    worker -> main   ``H <pid>`` ready; ``A <id>`` adopted (the main process closes its
                     copy); ``X <id>`` that connection ended; ``Q <stored message>`` a
                     message is durably queued (``StoredMessage.encode``); ``m <json>``
                     a metrics event; ``L <json>`` a log event; ``F <reason>`` the
                     worker cannot start for a configuration reason (it then exits
                     with EXIT_CONFIG, and the main process stops the daemon).

``relaygw.daemon.workers.pool`` is the main process's end, ``...process`` the worker's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Protocol

EXIT_CONFIG = 2  # a worker's exit status when it cannot start for a configuration reason
MAX_LINE = 4 * 1024 * 1024  # an envelope with many long recipients, a traceback
# Inbound metrics events a worker reports; the main process counts them in /metrics.
METRIC_EVENTS = frozenset(("message_accepted", "message_rejected", "tls_inbound"))


class ChannelFactory:
    """What ``adoptStreamConnection`` needs for a channel socket: one protocol, made
    by ``build``; a factory's start and stop hooks have nothing to do here."""

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self._build = build

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._build()
