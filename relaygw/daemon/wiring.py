"""The SMTP front end: what every process that serves sessions builds from the config.

Used by the single-process daemon (``tap.RelayService``) and by each SMTP worker
process (``relaygw.daemon.workers.process``), so both serve exactly the same sessions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from relaygw.config import Config, ListenerConfig, default_config, load_config
from relaygw.smtp.auth import UsersFileError, load_users
from relaygw.smtp.server import ServerSettings
from relaygw.smtp.tls import TLSSetupError, ensure_self_signed, server_tls_options

# The namespace log lines have always carried: operators grep for it.
log = Logger(namespace="relaygw.daemon.wiring")


class StartupError(Exception):
    """relaygw cannot start; the message says why, naming the config key."""


def load(path: str | None) -> Config:
    """The config at path, or the embedded default under ./relaygw-data."""
    if path is None:
        return default_config(Path.cwd() / "relaygw-data")
    return load_config(path)


class ConfigHolder:
    """The configuration in force; reload replaces ``current``."""

    def __init__(self, config: Config) -> None:
        self.current = config

    def __call__(self) -> Config:
        return self.current


def tls_options(config: Config, announce: bool = True) -> Any:
    if not any(listener.tls != "none" for listener in config.listeners):
        return None
    try:
        if config.tls.certificate is not None:
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


def prepare(config: Config, announce: bool = True) -> tuple[dict[str, str] | None, Any]:
    """The file work a configuration needs (users, TLS keys): blocking, so at start-up
    or in a thread, never on the reactor thread of a running daemon."""
    return users(config), tls_options(config, announce)


def settings(config: Config, listener: ListenerConfig, tls: Any) -> ServerSettings:
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


def outer_factory(factory: Any, listener: ListenerConfig, tls: Any) -> Any:
    """What the socket talks to: the session factory, inside TLS on an implicit-TLS port."""
    outer: Any = factory
    if listener.tls == "implicit":
        outer = TLSMemoryBIOFactory(tls, False, factory)
    outer.noisy = factory.noisy = False
    return outer
