"""The one place where a validated Config becomes objects.

The main process (``relaygw.daemon.service``), each SMTP worker process
(``relaygw.daemon.workers.process``), a reload and the command-line tools all
build what they need here, so every process serves exactly the same sessions:

- ``prepare``: the file work a configuration needs (users file, TLS keys), blocking;
- ``build_sessions``: per listener, the SMTP session factory and what the socket
  talks to (the factory, inside TLS on an implicit-TLS port);
- ``build_cleanup``: the receive stage and its transforms;
- ``build_core``: the main process's spool, queue, couriers and metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from relaygw.config import Config, ListenerConfig
from relaygw.delivery.courier import Courier
from relaygw.delivery.dns import Resolver
from relaygw.delivery.local import MaildirCourier
from relaygw.delivery.relay import RelayCourier
from relaygw.queue.manager import QueueManager
from relaygw.queue.store import Spool, StoredMessage
from relaygw.receive.cleanup import Cleanup, ReceiveMetrics
from relaygw.receive.policy import ConfiguredPolicy
from relaygw.receive.transforms import MessageTransform, ReceivedHeader
from relaygw.smtp.auth import Authenticator, UsersFileError, load_users
from relaygw.smtp.server import (
    ConnectionCounter,
    MessageSink,
    ServerSettings,
    SessionMetrics,
    SMTPServerFactory,
)
from relaygw.smtp.tls import TLSSetupError, ensure_self_signed, server_tls_options

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.front")


class StartupError(Exception):
    """relaygw cannot start; the message says why, naming the config key."""


class ConfigHolder:
    """The configuration in force; reload replaces ``current``."""

    def __init__(self, config: Config) -> None:
        self.current = config

    def __call__(self) -> Config:
        return self.current


@dataclass(frozen=True)
class Prepared:
    """What a configuration needs read from files before it can serve."""

    users: dict[str, str] | None  # user -> password hash; None without [auth] users_file
    tls: Any  # the server TLS options (CertificateOptions), or None without a TLS listener


def tls_options(config: Config, announce: bool = True) -> Any:
    if not any(listener.tls != "none" for listener in config.listeners):
        return None
    try:
        if config.tls.certificate is not None:
            assert config.tls.private_key is not None  # config requires both or neither
            return server_tls_options(config.tls.certificate, config.tls.private_key)
        cert, key = ensure_self_signed(config.server.spool_dir / "tls", config.server.hostname)
        if announce:
            log.warn("tls: no [tls] certificate configured; using self-signed {cert}",
                     cert=str(cert))
        return server_tls_options(cert, key)
    except TLSSetupError as e:
        raise StartupError(str(e)) from e
    except OSError as e:
        raise StartupError(f"server.spool_dir: cannot create TLS files: {e}") from e


def users(config: Config) -> dict[str, str] | None:
    if config.auth.users_file is None:
        return None
    try:
        return load_users(config.auth.users_file)
    except UsersFileError as e:
        raise StartupError("\n".join(f"auth.users_file: {p}" for p in e.problems)) from e
    except OSError as e:
        raise StartupError(f"auth.users_file: cannot read {config.auth.users_file}: "
                           f"{e.strerror}") from e


def prepare(config: Config, announce: bool = True) -> Prepared:
    """The file work a configuration needs (users, TLS keys): blocking, so at start-up
    or in a thread, never on the reactor thread of a running daemon."""
    return Prepared(users(config), tls_options(config, announce))


def server_settings(config: Config, listener: ListenerConfig, tls: Any) -> ServerSettings:
    return ServerSettings(
        hostname=config.server.hostname,
        max_message_size=config.server.max_message_size,
        max_recipients=config.server.max_recipients,
        max_hops=config.server.max_hops,
        idle_timeout=config.server.idle_timeout,
        max_errors=config.server.max_errors,
        normalize_bare_newlines=config.server.bare_newlines == "normalize",
        tls_mode=listener.tls,
        require_tls=listener.require_tls,
        auth_mode=listener.auth,
        tls_options=tls if listener.tls != "none" else None,
    )


def outer_factory(factory: SMTPServerFactory, listener: ListenerConfig,
                  tls: Any) -> IProtocolFactory:
    """What the socket talks to: the session factory, inside TLS on an implicit-TLS port."""
    factory.noisy = False
    if listener.tls != "implicit":
        return factory
    outer = TLSMemoryBIOFactory(tls, False, factory)
    outer.noisy = False
    return outer


def authenticator(prepared: Prepared, auth_pool: ThreadPool, reactor: Any,
                  ) -> Authenticator | None:
    if prepared.users is None:
        return None
    return Authenticator(prepared.users, auth_pool, reactor)


@dataclass
class Sessions:
    """One listener's sessions: the factory and what its socket talks to."""

    factory: SMTPServerFactory
    outer: IProtocolFactory


def build_sessions(config: Config, prepared: Prepared,
                   listeners: Sequence[ListenerConfig] | None = None, *,
                   policy: ConfiguredPolicy,
                   sink: MessageSink, auth: Authenticator | None, reactor: Any,
                   counter: ConnectionCounter, metrics: SessionMetrics,
                   on_session_end: Callable[[object], None] | None = None,
                   ) -> dict[ListenerConfig, Sessions]:
    """Session factories for ``listeners`` (all of the config's by default)."""
    built = {}
    for listener in config.listeners if listeners is None else listeners:
        factory = SMTPServerFactory(
            server_settings(config, listener, prepared.tls), policy, sink, auth, reactor,
            counter=counter, metrics=metrics, listener=listener.address,
            on_session_end=on_session_end)
        built[listener] = Sessions(factory, outer_factory(factory, listener, prepared.tls))
    return built


def transforms(config: Config) -> Sequence[MessageTransform]:
    """The receive stage's transforms, in the order they apply."""
    return (ReceivedHeader(config.server.hostname),)


def build_cleanup(spool: Spool, hand_off: Callable[[StoredMessage], None],
                  config_source: Callable[[], Config], metrics: ReceiveMetrics) -> Cleanup:
    return Cleanup(spool, hand_off, config_source, transforms, metrics)


def resolver(config: Config, reactor: Any, dns_pool: ThreadPool) -> Resolver:
    return Resolver(reactor, dns_pool, config.dns.nameservers, config.dns.timeout)


@dataclass
class Core:
    """The main process's mail path, below the sessions."""

    spool: Spool
    spool_pool: ThreadPool
    auth_pool: ThreadPool
    dns_pool: ThreadPool
    relay: RelayCourier
    manager: QueueManager
    policy: ConfiguredPolicy


def build_core(config: Config, holder: ConfigHolder, reactor: Any, metrics: Any) -> Core:
    spool_pool = ThreadPool(minthreads=2, maxthreads=16, name="relaygw-spool")
    spool = Spool(config.server.spool_dir, reactor, spool_pool)
    auth_pool = ThreadPool(minthreads=0, maxthreads=4, name="relaygw-auth")
    dns_pool = ThreadPool(minthreads=0, maxthreads=10, name="relaygw-dns")
    relay = RelayCourier(reactor, resolver(config, reactor, dns_pool), holder, spool.run)
    couriers: dict[str, Courier] = {
        "maildir": MaildirCourier(spool.run, lambda: holder().server.hostname),
        "smarthost": relay,
        "mx": relay,
    }
    manager = QueueManager(spool, holder, couriers, reactor,
                           grace=config.server.shutdown_grace,
                           on_grace_over=relay.abort_all, metrics=metrics)
    return Core(spool, spool_pool, auth_pool, dns_pool, relay, manager,
                ConfiguredPolicy(holder, spool))
