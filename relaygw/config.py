"""Configuration: a TOML file becomes validated, frozen dataclasses.

Validation collects every problem before raising, so one ``check-config`` run
shows them all. Nothing here resolves names or opens sockets: a relay that
waits for DNS at startup fails in confusing ways.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import socket
import ssl
import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, overload

T = TypeVar("T")
D = TypeVar("D")  # a read's default, returned when the value is absent or bad
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER_TLS = ("none", "starttls", "implicit")
LISTENER_AUTH = ("none", "optional", "required")
SMARTHOST_TLS = ("none", "opportunistic", "require", "verify", "implicit")
DELIVERY_TLS = ("none", "opportunistic", "require", "verify")
BARE_NEWLINES = ("reject", "normalize")
LONG_LINES = ("accept", "reject")
ROUTE_ACTIONS = ("maildir", "smarthost", "mx", "reject")
MATCH_KEYS = ("recipient_domains", "recipients", "senders", "client_networks", "authenticated")
MAILDIR_PLACEHOLDERS = ("domain", "localpart")
DEFAULT_REJECT = (550, "5.1.1", "Mailbox unavailable")
LOG_FORMATS = ("text", "json")
# Where the configuration is without --config (the environment variable wins).
DEFAULT_PATH = Path("/etc/relaygw/relaygw.toml")
CONFIG_ENV = "RELAYGW_CONFIG"

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_LABEL = re.compile(r"[a-z0-9-]{1,63}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_PORT = re.compile(r"[0-9]{1,5}")
_HOSTPORT = re.compile(r"(?:\[(?P<v6>[^]]*)\]|(?P<host>[^:\[\]]*))(?::(?P<port>.*))?")
_REPLY = re.compile(r"([0-9]{3}) ([0-9]\.[0-9]{1,3}\.[0-9]{1,3}) ([\x20-\x7e]+)")
_CONTROL_OR_SPACE = re.compile(r"[\s\x00-\x1f\x7f]")


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds each as "key.path: message"."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class HostPort:
    host: str  # IPv6 literals without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Pattern:
    """An address pattern: "re:<regex>" is searched; anything else globs the whole address."""

    text: str
    regex: re.Pattern[str]

    def matches(self, address: str) -> bool:
        return self.regex.search(address) is not None


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    spool_dir: Path
    max_message_size: int = 36700160
    max_recipients: int = 100
    max_hops: int = 50
    idle_timeout: float = 300.0
    max_connections: int = 1000
    max_connections_per_client: int = 50
    bare_newlines: str = "reject"
    # "accept": DATA lines up to max_line_length octets (CRLF included) are taken and
    # re-encoded or folded to 998 in the receive stage; "reject": over 1000 is refused.
    long_lines: str = "accept"
    max_line_length: int = 1048576
    max_errors: int = 20  # protocol errors in one session before 421 4.7.0 and close
    min_free_space: int = 2 * 36700160  # bytes kept free on the spool's filesystem
    shutdown_grace: float = 30.0  # seconds for sessions and deliveries to finish on SIGTERM
    # SMTP session processes beside the main one; 0: sessions run in the main process.
    # The config file's default is "auto" (one per core); see _workers.
    workers: int = 0


MAX_WORKERS = 64


def _workers(r: _Reader, t: dict[str, Any]) -> int:
    """``workers``: a count, or "auto" for one per CPU core (0 on a single core)."""
    value = t.get("workers", "auto")
    if value == "auto":
        # The cores this process may run on (a container's cpuset), not the machine's.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
        return 0 if cores < 2 else min(cores, MAX_WORKERS)
    if isinstance(value, str):
        r.bad("server.workers", 'an integer or "auto"', value)
        return 0
    return r.integer(t, "workers", "server", 0, 0, MAX_WORKERS)


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None = None  # neither set: a self-signed certificate is made at startup
    private_key: Path | None = None


@dataclass(frozen=True)
class ListenerConfig:
    address: str  # as written in the file
    host: str
    port: int  # 0 = ephemeral
    tls: str = "starttls"
    require_tls: bool = False
    auth: str = "optional"


@dataclass(frozen=True)
class AccessConfig:
    trusted_networks: tuple[Network, ...] = _LOOPBACK
    relay_domains: tuple[str, ...] = ()  # "example.org", "*.example.org" or "*"


@dataclass(frozen=True)
class AuthConfig:
    users_file: Path | None = None
    # user -> the sender address patterns that user may use at MAIL FROM; a user not
    # listed may use any. Pairs, not a dict, so that the Config stays hashable.
    senders: tuple[tuple[str, tuple[Pattern, ...]], ...] = ()

    def allowed_senders(self, user: str) -> tuple[Pattern, ...] | None:
        """The patterns ``[auth] senders`` binds ``user`` to; None when it binds none."""
        for name, patterns in self.senders:
            if name == user:
                return patterns
        return None


@dataclass(frozen=True)
class SmarthostConfig:
    name: str
    hosts: tuple[HostPort, ...]
    tls: str = "verify"
    ca_file: Path | None = None  # None: the system trust store
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class AliasEntry:
    source: str  # "local@domain" or "@domain"
    targets: tuple[str, ...]  # addresses, or one "@domain" for a domain rewrite


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[HostPort, ...] = ()  # empty: the system resolver configuration
    timeout: float = 5.0


@dataclass(frozen=True)
class DeliveryTimeouts:
    """Seconds per SMTP client step; defaults are the RFC 5321 4.5.3.2 minimums."""

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0
    starttls: float = 120.0
    auth: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_done: float = 600.0
    quit: float = 60.0


@dataclass(frozen=True)
class DeliveryConfig:
    retry_intervals: tuple[int, ...] = (300, 900, 1800, 3600)
    max_queue_time: int = 432000
    delay_warning_time: int = 14400  # seconds; 0: no delay warnings (RFC 3461 NOTIFY=DELAY)
    max_connections: int = 100
    max_connections_per_destination: int = 10
    mx_port: int = 25
    tls: str = "opportunistic"
    ca_file: Path | None = None  # for tls = "verify"; None: the system trust store
    timeouts: DeliveryTimeouts = DeliveryTimeouts()


@dataclass(frozen=True)
class RouteConfig:
    index: int
    action: str
    source: str  # the route as TOML, for `route explain`
    recipient_domains: tuple[str, ...] = ()
    recipients: tuple[Pattern, ...] = ()
    senders: tuple[Pattern, ...] = ()
    client_networks: tuple[Network, ...] = ()
    authenticated: bool | None = None
    maildir: str | None = None  # str.format template using only {domain} and {localpart}
    smarthost: str | None = None
    reply_code: int | None = None
    reply_enhanced: str | None = None
    reply_text: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus /metrics and /healthz endpoint; address None: not served."""

    address: str | None = None  # as written in the file
    host: str | None = None  # an IP literal; IPv6 without brackets
    port: int | None = None  # 0 = ephemeral


@dataclass(frozen=True)
class LogConfig:
    format: str = "text"  # text | json (JSON lines)


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    tls: TLSConfig
    listeners: tuple[ListenerConfig, ...]
    access: AccessConfig
    auth: AuthConfig
    smarthosts: tuple[SmarthostConfig, ...]  # a tuple, not a dict, so Config stays hashable
    aliases: tuple[AliasEntry, ...]
    dns: DNSConfig
    delivery: DeliveryConfig
    routes: tuple[RouteConfig, ...]
    base_dir: Path
    source_path: Path | None = None
    warnings: tuple[str, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()

    def smarthost(self, name: str) -> SmarthostConfig:
        for smarthost in self.smarthosts:
            if smarthost.name == name:
                return smarthost
        raise KeyError(name)


def load_config(path: str | os.PathLike[str]) -> Config:
    shown = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([f"{shown}: cannot read: {e.strerror or e}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError([f"{shown}: not UTF-8: {e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{shown}: {e}"]) from None
    absolute = Path(path).absolute()
    return parse_config(data, absolute.parent, source_path=absolute)


def default_config(data_dir: Path) -> Config:
    """The configuration used without --config: local delivery of everything into data_dir."""
    # Absolute, because twistd may change directory before paths are used.
    data_dir = Path(data_dir).absolute()
    data = {
        "server": {"spool_dir": str(data_dir / "spool")},
        "listeners": [{"address": "127.0.0.1:2525", "tls": "starttls", "auth": "optional"}],
        "routes": [{"action": "maildir",
                    "maildir": str(data_dir / "maildir" / "{domain}" / "{localpart}")}],
    }
    return parse_config(data, data_dir.parent)


def parse_config(data: dict[str, Any], base_dir: Path, *,
                 source_path: Path | None = None) -> Config:
    r = _Reader(Path(base_dir))
    r.keys(data, "", ("server", "tls", "listeners", "access", "auth", "smarthosts", "aliases",
                      "dns", "delivery", "routes", "metrics", "log"))
    server = _server(r, r.table(data, "server", ""))
    tls = _tls(r, r.table(data, "tls", ""))
    access = _access(r, r.table(data, "access", ""))
    auth = _auth(r, r.table(data, "auth", ""))
    listeners = _listeners(r, data, auth)
    smarthosts = _smarthosts(r, r.table(data, "smarthosts", ""))
    aliases = _aliases(r, r.table(data, "aliases", ""))
    dns_table = r.table(data, "dns", "")
    r.keys(dns_table, "dns", ("nameservers", "timeout"))
    dns = DNSConfig(r.each(dns_table, "nameservers", "dns",
                           partial(_hostport, default_port=53, ip_only=True)) or (),
                    r.seconds(dns_table, "timeout", "dns", 5.0))
    delivery = _delivery(r, r.table(data, "delivery", ""))
    routes = _routes(r, data, {s.name for s in smarthosts})
    metrics = _metrics(r, r.table(data, "metrics", ""), listeners)
    log_table = r.table(data, "log", "")
    r.keys(log_table, "log", ("format",))
    log = LogConfig(r.choice(log_table, "format", "log", LOG_FORMATS, "text"))
    if r.problems:
        raise ConfigError(r.problems)
    return Config(server, tls, listeners, access, auth, smarthosts, aliases, dns, delivery, routes,
                  Path(base_dir), source_path, tuple(r.warnings), metrics=metrics, log=log)


class _Reader:
    """Typed reads that record a problem and return the default, so checking goes on.

    ``path`` is always the dotted path of the table holding ``key``.
    """

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{where}: {message}")

    def bad(self, where: str, expected: str, value: object) -> None:
        self.error(where, f"must be {expected} (got {_toml(value)})")

    def keys(self, table: dict[str, Any], path: str, allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                self.error(_sub(path, key), "unknown key")

    def table(self, parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
        value = parent.get(key, {})
        if isinstance(value, dict):
            return value
        self.bad(_sub(path, key), "a table", value)
        return {}

    def tables(self, parent: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
        value = parent.get(key, [])
        if not isinstance(value, list):
            self.bad(key, "an array of tables", value)
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                out.append((f"{key}[{i}]", item))
            else:
                self.bad(f"{key}[{i}]", "a table", item)
        return out

    def integer(self, table: dict[str, Any], key: str, path: str, default: int,
                minimum: int, maximum: int | None = None) -> int:
        value = table.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):  # bool is an int subclass
            self.bad(_sub(path, key), "an integer", value)
        elif not minimum <= value <= (maximum if maximum is not None else value):
            self.bad(_sub(path, key), f"between {minimum} and {maximum}" if maximum is not None
                     else f">= {minimum}", value)
        else:
            return value
        return default

    def seconds(self, table: dict[str, Any], key: str, path: str, default: float) -> float:
        value = table.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e12:
            self.bad(_sub(path, key), "a number > 0", value)  # the bound also rejects inf, nan
            return default
        return float(value)

    def boolean(self, table: dict[str, Any], key: str, path: str,
                default: bool | None) -> bool | None:
        value = table.get(key)
        if value is None or isinstance(value, bool):
            return default if value is None else value
        self.bad(_sub(path, key), "true or false", value)
        return default

    @overload
    def string(self, table: dict[str, Any], key: str, path: str, default: D) -> str | D: ...

    @overload
    def string(self, table: dict[str, Any], key: str, path: str, default: D,
               convert: Callable[[str], T]) -> T | D: ...

    def string(self, table: dict[str, Any], key: str, path: str, default: object,
               convert: Callable[[str], object] | None = None) -> object:
        """A string, optionally converted; ``convert`` raises ValueError with the message."""
        value = table.get(key)
        return default if value is None else self.check(_sub(path, key), value, default, convert)

    @overload
    def check(self, where: str, value: object, default: D) -> str | D: ...

    @overload
    def check(self, where: str, value: object, default: D,
              convert: Callable[[str], T] | None) -> T | D: ...

    def check(self, where: str, value: object, default: object,
              convert: Callable[[str], object] | None = None) -> object:
        if not isinstance(value, str):
            self.bad(where, "a string", value)
            return default
        try:
            return convert(value) if convert else value
        except ValueError as e:
            self.error(where, str(e))
            return default

    def choice(self, table: dict[str, Any], key: str, path: str, choices: tuple[str, ...],
               default: D) -> str | D:
        def check(value: str) -> str:
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(choices)} (got {_toml(value)})")
            return value
        return self.string(table, key, path, default, check)

    def path(self, value: str) -> Path:
        if not value:
            raise ValueError("must not be empty")
        return self.base_dir / value

    def existing_file(self, table: dict[str, Any], key: str, path: str) -> Path | None:
        found = self.string(table, key, path, None, self.path)
        if found is not None and not found.is_file():
            self.error(_sub(path, key), f"file not found: {found}")
        return found

    def each(self, table: dict[str, Any], key: str, path: str, convert: Callable[[str], T],
             nonempty: bool = False) -> tuple[T, ...] | None:
        """A list of strings, each converted; None when the key is absent."""
        value = table.get(key)
        where = _sub(path, key)
        if value is None:
            return None
        if not isinstance(value, list):
            self.bad(where, "a list of strings", value)
            return ()
        if nonempty and not value:
            self.error(where, "must not be empty")
        out = []
        for i, item in enumerate(value):
            converted = self.check(f"{where}[{i}]", item, None, convert)
            if converted is not None:
                out.append(converted)
        return tuple(out)


def _server(r: _Reader, t: dict[str, Any]) -> ServerConfig:
    r.keys(t, "server", tuple(f.name for f in fields(ServerConfig)))
    defaults = ServerConfig(hostname="", spool_dir=Path())

    def integer(key: str, minimum: int) -> int:
        return r.integer(t, key, "server", getattr(defaults, key), minimum)

    size = integer("max_message_size", 1024)
    long_lines = r.choice(t, "long_lines", "server", LONG_LINES, defaults.long_lines)
    if long_lines == "reject" and "max_line_length" in t:
        r.warn("server.max_line_length", 'has no effect with server.long_lines = "reject"')
    # gethostname, never getfqdn: getfqdn blocks on DNS.
    hostname = r.string(t, "hostname", "server", None, _hostname)
    if hostname is None:
        hostname = socket.gethostname().lower()
        if "." not in hostname:
            r.warn("server.hostname", f'not set, and this host\'s name "{hostname}" is not '
                   "a fully qualified domain name: peers may refuse it in EHLO; set it")
    elif "." not in hostname:
        r.warn("server.hostname", f'"{hostname}" is not a fully qualified domain name: '
               "peers may refuse it in EHLO")
    return ServerConfig(
        hostname=hostname,
        spool_dir=r.string(t, "spool_dir", "server", r.base_dir / "relaygw-data" / "spool", r.path),
        max_message_size=size,
        max_recipients=integer("max_recipients", 1),
        max_hops=integer("max_hops", 1),
        idle_timeout=r.seconds(t, "idle_timeout", "server", defaults.idle_timeout),
        max_connections=integer("max_connections", 1),
        max_connections_per_client=integer("max_connections_per_client", 1),
        bare_newlines=r.choice(t, "bare_newlines", "server", BARE_NEWLINES, defaults.bare_newlines),
        long_lines=long_lines,
        max_line_length=integer("max_line_length", 1000),
        max_errors=integer("max_errors", 1),
        min_free_space=r.integer(t, "min_free_space", "server", 2 * size, 0),
        shutdown_grace=r.seconds(t, "shutdown_grace", "server", defaults.shutdown_grace),
        workers=_workers(r, t),
    )


def _tls(r: _Reader, t: dict[str, Any]) -> TLSConfig:
    r.keys(t, "tls", ("certificate", "private_key"))
    _both_or_neither(r, t, "tls", "certificate", "private_key")
    return TLSConfig(r.string(t, "certificate", "tls", None, r.path),
                     r.string(t, "private_key", "tls", None, r.path))


def _both_or_neither(r: _Reader, t: dict[str, Any], path: str, first: str, second: str) -> None:
    if (first in t) != (second in t):
        given, missing = (first, second) if first in t else (second, first)
        r.error(_sub(path, missing), f"required when {_sub(path, given)} is set")


def _auth(r: _Reader, t: dict[str, Any]) -> AuthConfig:
    r.keys(t, "auth", ("users_file", "senders"))
    users_file = r.string(t, "users_file", "auth", None, r.path)
    table = r.table(t, "senders", "auth")
    senders = []
    for user in table:
        where = _sub("auth.senders", user)
        if not user or _CONTROL_OR_SPACE.search(user) or ":" in user:
            r.error(where, "not a user name the users file can hold")
            continue
        patterns = r.each(table, user, "auth.senders", _pattern, nonempty=True)
        senders.append((user, patterns or ()))
    if senders and users_file is None:
        r.warn("auth.senders", "has no effect without auth.users_file")
    return AuthConfig(users_file, tuple(senders))


def _listeners(r: _Reader, data: dict[str, Any], auth: AuthConfig) -> tuple[ListenerConfig, ...]:
    if not data.get("listeners"):
        r.error("listeners", "at least one listener is required")
    out: list[ListenerConfig] = []
    seen: dict[HostPort, str] = {}
    for where, t in r.tables(data, "listeners"):
        r.keys(t, where, ("address", "tls", "require_tls", "auth"))
        if "address" not in t:
            r.error(f"{where}.address", "required")
        hostport = r.string(t, "address", where, None,
                            partial(_hostport, default_port=None, ip_only=True, min_port=0))
        tls = r.choice(t, "tls", where, LISTENER_TLS, "starttls")
        require_tls = r.boolean(t, "require_tls", where, False)
        auth_mode = r.choice(t, "auth", where, LISTENER_AUTH, "optional")
        if tls == "none" and auth_mode == "required":
            r.error(f"{where}.auth", '"required" needs tls = starttls or implicit '
                                     "(AUTH is only offered over TLS)")
        elif tls == "none" and auth_mode == "optional":
            r.warn(f"{where}.auth", "AUTH is never offered without TLS on this listener")
        if tls == "none" and require_tls:
            r.error(f"{where}.require_tls", "true needs tls = starttls or implicit")
        if auth_mode == "required" and auth.users_file is None:
            r.error(f"{where}.auth", '"required" needs auth.users_file')
        if hostport is None:
            continue
        if hostport.port and hostport in seen:  # port 0 asks for a fresh port each time
            r.error(f"{where}.address", f"duplicate of {seen[hostport]} ({hostport})")
        seen.setdefault(hostport, f"{where}.address")
        out.append(ListenerConfig(t["address"], hostport.host, hostport.port, tls,
                                  bool(require_tls), auth_mode))
    return tuple(out)


def _metrics(r: _Reader, t: dict[str, Any],
             listeners: tuple[ListenerConfig, ...]) -> MetricsConfig:
    r.keys(t, "metrics", ("address",))
    hostport = r.string(t, "address", "metrics", None,
                        partial(_hostport, default_port=None, ip_only=True, min_port=0))
    if hostport is None:
        return MetricsConfig()
    for listener in listeners:  # port 0 asks for a fresh port each time
        if hostport.port and (listener.host, listener.port) == (hostport.host, hostport.port):
            r.error("metrics.address", f"same address as the listener {_toml(listener.address)}")
            break
    return MetricsConfig(t["address"], hostport.host, hostport.port)


def _access(r: _Reader, t: dict[str, Any]) -> AccessConfig:
    r.keys(t, "access", ("trusted_networks", "relay_domains"))
    networks = r.each(t, "trusted_networks", "access", _network)
    networks = _LOOPBACK if networks is None else networks
    for network in networks:
        if network.prefixlen == 0:
            r.warn("access.trusted_networks", f"{network} makes relaygw an open relay")
    domains = r.each(t, "relay_domains", "access", _domain_pattern) or ()
    if "*" in domains:
        r.warn("access.relay_domains", '"*" makes relaygw an open relay')
    return AccessConfig(networks, domains)


def _smarthosts(r: _Reader, table: dict[str, Any]) -> tuple[SmarthostConfig, ...]:
    out = []
    for name, t in table.items():
        where = _sub("smarthosts", name)
        if not isinstance(t, dict):
            r.bad(where, "a table", t)
            continue
        r.keys(t, where, tuple(f.name for f in fields(SmarthostConfig) if f.name != "name"))
        tls = r.choice(t, "tls", where, SMARTHOST_TLS, "verify")
        port = 465 if tls == "implicit" else 25
        if "hosts" not in t:
            r.error(f"{where}.hosts", "required")
        hosts = r.each(t, "hosts", where, partial(_hostport, default_port=port, ip_only=False),
                       nonempty=True)
        _both_or_neither(r, t, where, "username", "password_file")
        ca_file = r.existing_file(t, "ca_file", where)
        if tls in ("verify", "implicit"):
            _warn_without_trust_store(r, f"{where}.tls", ca_file)
        out.append(SmarthostConfig(name, hosts or (), tls, ca_file,
                                   r.string(t, "username", where, None),
                                   r.string(t, "password_file", where, None, r.path)))
    return tuple(out)


def _warn_without_trust_store(r: _Reader, where: str, ca_file: Path | None) -> None:
    """``verify`` with neither a ca_file nor a system trust store can never succeed."""
    if ca_file is not None:
        return
    paths = ssl.get_default_verify_paths()
    if not any(p and os.path.exists(p) for p in (paths.cafile, paths.capath,
                                                  paths.openssl_cafile, paths.openssl_capath)):
        r.warn(where, '"verify" needs a trust store: set ca_file (no system CA store found)')


def _aliases(r: _Reader, table: dict[str, Any]) -> tuple[AliasEntry, ...]:
    out: list[AliasEntry] = []
    for key, value in table.items():
        where = _sub("aliases", key)
        if isinstance(value, str):
            items = [(where, value)]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        else:
            r.bad(where, "an address or a list of addresses", value)
            continue
        try:
            source = _address(key, allow_empty_local=True)
        except ValueError:
            r.error(where, 'key must be "local@domain" or "@domain"')
            continue
        if not items:
            r.error(where, "must not be empty")
            continue
        if any(entry.source == source for entry in out):
            r.error(where, f"duplicate alias for {source}")
        if source.startswith("@"):  # a domain rewrite maps to exactly one domain
            if len(items) != 1 or not items[0][1].startswith("@"):
                r.bad(where, 'one "@domain" string', value)
                continue
            targets = [r.check(where, items[0][1], None, partial(_address, allow_empty_local=True))]
        else:
            targets = [r.check(at, v, None, _address) for at, v in items]
        out.append(AliasEntry(source, tuple(t for t in targets if t)))
    return tuple(out)


def _delivery_ca_file(r: _Reader, t: dict[str, Any]) -> Path | None:
    ca_file = r.existing_file(t, "ca_file", "delivery")
    if t.get("tls") == "verify":
        _warn_without_trust_store(r, "delivery.tls", ca_file)
    return ca_file


def _delivery(r: _Reader, t: dict[str, Any]) -> DeliveryConfig:
    r.keys(t, "delivery", tuple(f.name for f in fields(DeliveryConfig)))
    defaults = DeliveryConfig()
    intervals = t.get("retry_intervals", defaults.retry_intervals)
    where = "delivery.retry_intervals"
    if not isinstance(intervals, list | tuple) or not intervals:
        r.bad(where, "a non-empty list of integers", intervals)
        intervals = defaults.retry_intervals
    for i, value in enumerate(intervals):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            r.bad(f"{where}[{i}]", "an integer >= 1", value)
    timeouts = r.table(t, "timeouts", "delivery")

    def integer(key: str, maximum: int | None = None) -> int:
        return r.integer(t, key, "delivery", getattr(defaults, key), 1, maximum)

    r.keys(timeouts, "delivery.timeouts", tuple(f.name for f in fields(DeliveryTimeouts)))
    max_queue_time = integer("max_queue_time")
    delay_warning_time = r.integer(t, "delay_warning_time", "delivery",
                                   defaults.delay_warning_time, 0)
    if "delay_warning_time" in t and delay_warning_time and delay_warning_time >= max_queue_time:
        r.warn("delivery.delay_warning_time",
               f"never reached: not below delivery.max_queue_time ({max_queue_time})")
    return DeliveryConfig(
        retry_intervals=tuple(intervals),
        max_queue_time=max_queue_time,
        delay_warning_time=delay_warning_time,
        max_connections=integer("max_connections"),
        max_connections_per_destination=integer("max_connections_per_destination"),
        mx_port=integer("mx_port", 65535),
        tls=r.choice(t, "tls", "delivery", DELIVERY_TLS, defaults.tls),
        ca_file=_delivery_ca_file(r, t),
        timeouts=DeliveryTimeouts(**{
            f.name: r.seconds(timeouts, f.name, "delivery.timeouts",
                              getattr(defaults.timeouts, f.name))
            for f in fields(DeliveryTimeouts)}),
    )


def _routes(r: _Reader, data: dict[str, Any], smarthosts: set[str]) -> tuple[RouteConfig, ...]:
    tables = r.tables(data, "routes")
    if data.get("routes", []) == []:
        tables = [("routes[0]", {"action": "mx"})]
    out = []
    catch_all = None
    for index, (where, t) in enumerate(tables):
        r.keys(t, where, (*MATCH_KEYS, "action", "maildir", "smarthost", "reply"))
        if "action" not in t:
            r.error(f"{where}.action", "required")
        action = r.choice(t, "action", where, ROUTE_ACTIONS, None)
        for key, owner in (("maildir", "maildir"), ("smarthost", "smarthost"), ("reply", "reject")):
            if action and key in t and action != owner:
                r.error(f"{where}.{key}", f'only allowed with action = "{owner}"')
            elif action == owner and key not in t and key != "reply":
                r.error(f"{where}.{key}", f'required when action = "{owner}"')
        smarthost = r.string(t, "smarthost", where, None)
        if smarthost is not None and smarthost not in smarthosts:
            r.error(f"{where}.smarthost", f"no [{_sub('smarthosts', smarthost)}] table")
        reply = r.string(t, "reply", where, DEFAULT_REJECT, _reply)
        code, enhanced, text = reply if action == "reject" else (None, None, None)
        route = RouteConfig(
            index=index,
            action=action or "",
            source="\n".join(["[[routes]]", *(f"{_sub('', k)} = {_toml(v)}"
                                              for k, v in t.items())]),
            recipient_domains=r.each(t, "recipient_domains", where, _domain_pattern,
                                     nonempty=True) or (),
            recipients=r.each(t, "recipients", where, _pattern, nonempty=True) or (),
            senders=r.each(t, "senders", where, _pattern, nonempty=True) or (),
            client_networks=r.each(t, "client_networks", where, _network, nonempty=True) or (),
            authenticated=r.boolean(t, "authenticated", where, None),
            maildir=r.string(t, "maildir", where, None, lambda v: _maildir(r.base_dir, v)),
            smarthost=smarthost,
            reply_code=code,
            reply_enhanced=enhanced,
            reply_text=text,
        )
        if catch_all is not None:
            r.warn(where, f"never matches ({catch_all} matches everything before it)")
        elif not any(key in t for key in MATCH_KEYS):
            catch_all = where
        out.append(route)
    return tuple(out)


def _sub(path: str, key: str) -> str:
    """The dotted path of ``key`` inside ``path``, quoting keys that TOML would quote."""
    key = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{key}" if path else key


def _toml(value: object) -> str:
    """A value as TOML would write it, for messages and route sources."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_sub('', k)} = {_toml(v)}" for k, v in value.items()) + "}"
    isoformat = getattr(value, "isoformat", None)  # TOML dates and times
    return isoformat() if isoformat else repr(value)


def _is_hostname(name: str) -> bool:
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _hostname(text: str) -> str:
    if not _is_hostname(text.lower()):
        raise ValueError(f"invalid hostname (got {_toml(text)})")
    return text.lower()


def _domain(text: str) -> str:
    """The lowercase A-label form of a domain name."""
    try:
        name = text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        name = ""
    if not _is_hostname(name):
        raise ValueError(f"invalid domain (got {_toml(text)})")
    return name


def _domain_pattern(text: str) -> str:
    if text in ("*", "*."):
        return "*"
    try:
        return "*." + _domain(text[2:]) if text.startswith("*.") else _domain(text)
    except ValueError:
        raise ValueError(f"invalid domain (got {_toml(text)})") from None


def _address(text: str, allow_empty_local: bool = False) -> str:
    """"local@domain" with the domain normalised; "@domain" too if allowed."""
    local, at, domain = text.rpartition("@")
    try:
        if not at or _CONTROL_OR_SPACE.search(local) or not (local or allow_empty_local):
            raise ValueError
        return f"{local}@{_domain(domain)}"
    except ValueError:
        raise ValueError(f"must be an address local@domain (got {_toml(text)})") from None


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"invalid network (got {_toml(text)})") from None


def _hostport(text: str, default_port: int | None, ip_only: bool, min_port: int = 1) -> HostPort:
    """Parse "host:port" or "[v6]:port"; with a default port also "host" and a bare IP."""
    usage = f'must be "host:port" or "[v6]:port" (got {_toml(text)})'
    if text.count(":") > 1 and not text.startswith("["):
        if default_port is None or not _is_ip(text):
            raise ValueError(f"IPv6 addresses need brackets: {usage}")
        return HostPort(str(ipaddress.ip_address(text)), default_port)
    match = _HOSTPORT.fullmatch(text)
    if not match:
        raise ValueError(usage)
    v6, host, port = match["v6"], match["host"], match["port"]
    if v6 is not None:
        if ":" not in v6 or not _is_ip(v6):
            raise ValueError(f"invalid IPv6 address (got {_toml(v6)})")
        host = str(ipaddress.ip_address(v6))
    elif _is_ip(host):
        host = str(ipaddress.ip_address(host))
    elif ip_only:
        raise ValueError(f"host must be an IP address (got {_toml(host)})")
    else:
        host = _domain(host)
    if port is None:
        if default_port is None:
            raise ValueError(usage)
        return HostPort(host, default_port)
    if not _PORT.fullmatch(port) or not min_port <= int(port) <= 65535:
        raise ValueError(f"port must be between {min_port} and 65535 (got {_toml(port)})")
    return HostPort(host, int(port))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _pattern(text: str) -> Pattern:
    if not text:
        raise ValueError("must not be empty")
    if text.startswith("re:"):
        try:
            return Pattern(text, re.compile(text[3:], re.IGNORECASE))
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
    # \A plus translate()'s \Z: the glob must cover the whole address even under search().
    return Pattern(text, re.compile(r"\A" + fnmatch.translate(text), re.IGNORECASE))


def _maildir(base_dir: Path, text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"invalid template: {e}") from None
    for _, name, spec, conversion in parsed:
        if name is not None and (name not in MAILDIR_PLACEHOLDERS or spec or conversion):
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"unknown placeholder {{{shown}}} "
                             "(allowed: {domain}, {localpart})")
    return str(base_dir / text)


def _reply(text: str) -> tuple[int, str, str]:
    match = _REPLY.fullmatch(text)
    if not match:
        raise ValueError('must be "CODE X.Y.Z text", e.g. "550 5.1.1 Mailbox unavailable" '
                         f"(got {_toml(text)})")
    code, enhanced, reply_text = int(match[1]), match[2], match[3]
    if not 400 <= code <= 599:
        raise ValueError(f"reply code must be between 400 and 599 (got {code})")
    if enhanced[0] != match[1][0]:
        raise ValueError(f"enhanced code {enhanced} does not match reply code {code}")
    return code, enhanced, reply_text


def default_path() -> Path | None:
    """The configuration file used without --config: ``$RELAYGW_CONFIG`` when set (it
    need not exist: then that is the error), else DEFAULT_PATH when it exists; None:
    the embedded default."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def load(path: str | os.PathLike[str] | None) -> Config:
    """The config at ``path``; without one, the file ``default_path`` names, else the
    embedded default under ./relaygw-data."""
    if path is None:
        path = default_path()
    if path is None:
        return default_config(Path.cwd() / "relaygw-data")
    return load_config(path)
