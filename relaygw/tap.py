"""twistd plugin entry: the one module that turns configuration into objects."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from relaygw.config import Config, ConfigError, ListenerConfig, default_config, load_config
from relaygw.delivery.local import MaildirCourier
from relaygw.delivery.relay import RelayCourier
from relaygw.dns import Resolver
from relaygw.inbound import ConfiguredPolicy
from relaygw.listener import ListenerService
from relaygw.queue.manager import QueueManager
from relaygw.queue.service import SpoolService
from relaygw.queue.store import Spool
from relaygw.smtp.auth import Authenticator, UsersFileError, load_users
from relaygw.smtp.server import ConnectionCounter, ServerSettings, SMTPServerFactory
from relaygw.smtp.tls import TLSSetupError, ensure_self_signed, server_tls_options

log = Logger()


class StartupError(Exception):
    """relaygw cannot start; the message says why, naming the config key."""


def load(path: str | None) -> Config:
    """The config at path, or the embedded default under ./relaygw-data."""
    if path is None:
        return default_config(Path.cwd() / "relaygw-data")
    return load_config(path)


class Options(usage.Options):
    synopsis = "[--config PATH]"
    optParameters = [  # noqa: N815 - Twisted's name
        ["config", "c", None,
         "TOML configuration file (default: built-in, data in ./relaygw-data)"],
    ]

    def postOptions(self) -> None:
        try:
            self.config = load(self["config"])
        except ConfigError as e:
            _refuse_to_start(e.problems)


def _refuse_to_start(problems: list[str]) -> None:
    print("relaygw: invalid configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    raise SystemExit(1)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    try:
        return build_service(options.config, reactor)
    except StartupError as e:
        _refuse_to_start(str(e).splitlines())
        raise  # not reached


def _tls_options(config: Config) -> Any:
    if not any(listener.tls != "none" for listener in config.listeners):
        return None
    try:
        if config.tls.certificate is not None:
            return server_tls_options(config.tls.certificate, config.tls.private_key)
        cert, key = ensure_self_signed(config.server.spool_dir / "tls", config.server.hostname)
        log.warn("tls: no [tls] certificate configured; using self-signed {cert}", cert=str(cert))
        return server_tls_options(cert, key)
    except TLSSetupError as e:
        raise StartupError(str(e)) from e
    except OSError as e:
        raise StartupError(f"server.spool_dir: cannot create TLS files: {e}") from e


def _authenticator(config: Config, reactor: Any, pool: ThreadPool) -> Authenticator | None:
    if config.auth.users_file is None:
        return None
    try:
        users = load_users(config.auth.users_file)
    except UsersFileError as e:
        raise StartupError("\n".join(f"auth.users_file: {p}" for p in e.problems)) from e
    except OSError as e:
        raise StartupError(f"auth.users_file: cannot read {config.auth.users_file}: "
                           f"{e.strerror}") from e
    return Authenticator(users, pool, reactor)


def _endpoint(reactor: Any, listener: ListenerConfig) -> Any:
    endpoint_type = TCP6ServerEndpoint if ":" in listener.host else TCP4ServerEndpoint
    return endpoint_type(reactor, listener.port, interface=listener.host, backlog=511)


class _ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class ConfigHolder:
    """The configuration in force; reload replaces ``current``."""

    def __init__(self, config: Config) -> None:
        self.current = config

    def __call__(self) -> Config:
        return self.current


class _QueueStarter(service.Service):
    """Hands the spool's recovered messages to the queue once both run."""

    def __init__(self, spool_service: SpoolService, manager: QueueManager,
                 relay: RelayCourier) -> None:
        self.spool_service = spool_service
        self.manager = manager
        self.relay = relay

    def startService(self) -> None:
        super().startService()
        self.manager.load(self.spool_service.recovered)
        self.spool_service.recovered = []

    def stopService(self) -> None:
        super().stopService()
        self.relay.stop()


def build_service(config: Config, reactor: Any) -> service.MultiService:
    holder = ConfigHolder(config)
    top = service.MultiService()
    spool_pool = ThreadPool(minthreads=2, maxthreads=16, name="relaygw-spool")
    spool = Spool(config.server.spool_dir, reactor, spool_pool)
    spool_service = SpoolService(spool, spool_pool, reactor)
    spool_service.setServiceParent(top)

    auth_pool = ThreadPool(minthreads=0, maxthreads=4, name="relaygw-auth")
    _ThreadPoolService(auth_pool).setServiceParent(top)
    dns_pool = ThreadPool(minthreads=0, maxthreads=10, name="relaygw-dns")
    _ThreadPoolService(dns_pool).setServiceParent(top)

    resolver = Resolver(reactor, dns_pool, config.dns.nameservers, config.dns.timeout)
    relay = RelayCourier(reactor, resolver, holder, spool.run)
    couriers = {
        "maildir": MaildirCourier(spool.run, lambda: holder().server.hostname),
        "smarthost": relay,
        "mx": relay,
    }
    manager = QueueManager(spool, holder, couriers, reactor)
    manager.setServiceParent(top)
    _QueueStarter(spool_service, manager, relay).setServiceParent(top)

    authenticator = _authenticator(config, reactor, auth_pool)
    tls_options = _tls_options(config)
    policy = ConfiguredPolicy(holder, spool)
    counter = ConnectionCounter(config.server.max_connections,
                                config.server.max_connections_per_client)
    for listener in config.listeners:
        settings = ServerSettings(
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
            tls_options=tls_options if listener.tls != "none" else None,
        )
        factory: Any = SMTPServerFactory(
            settings, policy, spool, authenticator, reactor,
            max_connections=config.server.max_connections,
            max_connections_per_client=config.server.max_connections_per_client,
            counter=counter, on_queued=manager.enqueued,
        )
        if listener.tls == "implicit":
            factory = TLSMemoryBIOFactory(tls_options, False, factory)
        factory.noisy = False
        ListenerService(_endpoint(reactor, listener), factory,
                        listener.address).setServiceParent(top)
        log.info("listening on {address} tls={tls} auth={auth}", address=listener.address,
                 tls=listener.tls, auth=listener.auth)
    for route in config.routes:
        if route.action == "maildir":
            log.info("routes[{index}]: maildir delivery under {template}", index=route.index,
                     template=route.maildir)
    return top
