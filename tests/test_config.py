"""Tests for relaygw.config: the example file, every error class, paths, defaults, warnings."""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import tomllib
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from relaygw.config import (
    AliasEntry,
    Config,
    ConfigError,
    DeliveryTimeouts,
    HostPort,
    ListenerConfig,
    LogConfig,
    MetricsConfig,
    default_config,
    load_config,
    parse_config,
)

EXAMPLE = """\
[server]
hostname = "relay.example.net"
spool_dir = "/var/spool/relaygw"
max_message_size = 36700160
max_recipients = 100
max_hops = 50
idle_timeout = 300
max_connections = 1000
max_connections_per_client = 50
bare_newlines = "reject"

[tls]
certificate = "/etc/relaygw/fullchain.pem"
private_key = "/etc/relaygw/privkey.pem"

[[listeners]]
address = "0.0.0.0:25"
tls = "starttls"
require_tls = false
auth = "optional"

[[listeners]]
address = "[::]:465"
tls = "implicit"
auth = "required"

[access]
trusted_networks = ["127.0.0.0/8", "::1/128"]
relay_domains = ["example.org", "*.example.org"]

[auth]
users_file = "/etc/relaygw/users"

[smarthosts.upstream]
hosts = ["smtp1.example.net:587", "smtp2.example.net:587"]
tls = "verify"
username = "relay@example.net"
password_file = "/etc/relaygw/upstream.secret"

[smarthosts.exchange]
hosts = ["10.0.0.5"]
tls = "opportunistic"

[aliases]
"postmaster@example.org" = ["ops@corp.example", "noc@corp.example"]
"@old.example" = "@example.org"

[dns]
nameservers = []
timeout = 5.0

[delivery]
retry_intervals = [300, 900, 1800, 3600]
max_queue_time = 432000
max_connections = 100
max_connections_per_destination = 10
mx_port = 25
tls = "opportunistic"

[[routes]]
recipient_domains = ["example.org", "*.example.org"]
action = "maildir"
maildir = "/var/mail/{domain}/{localpart}"

[[routes]]
recipient_domains = ["corp.example"]
senders = ["*@example.org"]
action = "smarthost"
smarthost = "exchange"

[[routes]]
recipients = ["re:^noreply-"]
action = "reject"
reply = "550 5.1.1 Mailbox unavailable"

[[routes]]
action = "mx"
"""

# The smallest valid file; tests append the tables they exercise.
LISTENER = '[[listeners]]\naddress = "127.0.0.1:2525"\n'
BASE_DIR = Path("/etc/relaygw")



def criteria(route):
    """What a route matches on; all empty: it matches every recipient."""
    return (route.recipient_domains, route.recipients, route.senders, route.client_networks,
            route.authenticated)

def parse(text: str, base_dir: Path = BASE_DIR) -> Config:
    return parse_config(tomllib.loads(text), base_dir)


def problems(text: str, base_dir: Path = BASE_DIR) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, base_dir)
    return info.value.problems


@pytest.fixture(autouse=True)
def fully_qualified_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's name may have no dot; the tests that mean it say so."""
    monkeypatch.setattr(socket, "gethostname", lambda: "relay.test")


@pytest.fixture
def example(tmp_path: Path) -> Config:
    path = tmp_path / "relaygw.toml"
    path.write_text(EXAMPLE)
    return load_config(path)


# -- the example file ------------------------------------------------------------------------

def test_example_server_and_tls(example: Config, tmp_path: Path) -> None:
    server = example.server
    assert server.hostname == "relay.example.net"
    assert server.spool_dir == Path("/var/spool/relaygw")
    assert (server.max_message_size, server.max_recipients, server.max_hops) == (36700160, 100, 50)
    assert server.idle_timeout == 300.0 and isinstance(server.idle_timeout, float)
    assert (server.max_connections, server.max_connections_per_client) == (1000, 50)
    assert server.bare_newlines == "reject"
    assert server.max_errors == 20
    assert server.min_free_space == 2 * 36700160
    assert example.tls.certificate == Path("/etc/relaygw/fullchain.pem")
    assert example.tls.private_key == Path("/etc/relaygw/privkey.pem")
    assert example.base_dir == tmp_path
    assert example.source_path == tmp_path / "relaygw.toml"
    assert example.warnings == ()


def test_example_listeners_access_auth(example: Config) -> None:
    assert example.listeners == (
        ListenerConfig("0.0.0.0:25", "0.0.0.0", 25, "starttls", False, "optional"),
        ListenerConfig("[::]:465", "::", 465, "implicit", False, "required"),
    )
    assert example.access.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert example.access.relay_domains == ("example.org", "*.example.org")
    assert example.auth.users_file == Path("/etc/relaygw/users")


def test_example_smarthosts(example: Config) -> None:
    assert [s.name for s in example.smarthosts] == ["upstream", "exchange"]
    upstream = example.smarthost("upstream")
    assert upstream.hosts == (
        HostPort("smtp1.example.net", 587), HostPort("smtp2.example.net", 587))
    assert upstream.tls == "verify"
    assert upstream.ca_file is None
    assert upstream.username == "relay@example.net"
    assert upstream.password_file == Path("/etc/relaygw/upstream.secret")
    exchange = example.smarthost("exchange")
    assert exchange.hosts == (HostPort("10.0.0.5", 25),)
    assert exchange.tls == "opportunistic"
    assert (exchange.username, exchange.password_file) == (None, None)
    with pytest.raises(KeyError):
        example.smarthost("nope")


def test_example_aliases_dns_delivery(example: Config) -> None:
    assert example.aliases == (
        AliasEntry("postmaster@example.org", ("ops@corp.example", "noc@corp.example")),
        AliasEntry("@old.example", ("@example.org",)),
    )
    assert example.dns.nameservers == ()
    assert example.dns.timeout == 5.0
    delivery = example.delivery
    assert delivery.retry_intervals == (300, 900, 1800, 3600)
    assert delivery.max_queue_time == 432000
    assert (delivery.max_connections, delivery.max_connections_per_destination) == (100, 10)
    assert delivery.mx_port == 25
    assert delivery.tls == "opportunistic"
    assert delivery.ca_file is None
    assert delivery.timeouts == DeliveryTimeouts()
    assert delivery.timeouts.data_done == 600.0 and delivery.timeouts.connect == 30.0


def test_example_routes(example: Config) -> None:
    maildir, smarthost, reject, mx = example.routes
    assert [r.index for r in example.routes] == [0, 1, 2, 3]
    assert [r.action for r in example.routes] == ["maildir", "smarthost", "reject", "mx"]
    assert maildir.recipient_domains == ("example.org", "*.example.org")
    assert maildir.maildir == "/var/mail/{domain}/{localpart}"
    assert maildir.source == (
        '[[routes]]\n'
        'recipient_domains = ["example.org", "*.example.org"]\n'
        'action = "maildir"\n'
        'maildir = "/var/mail/{domain}/{localpart}"')
    assert smarthost.smarthost == "exchange"
    assert [p.text for p in smarthost.senders] == ["*@example.org"]
    assert smarthost.maildir is None and smarthost.reply_code is None
    assert (reject.reply_code, reject.reply_enhanced, reject.reply_text) == (
        550, "5.1.1", "Mailbox unavailable")
    assert [p.text for p in reject.recipients] == ["re:^noreply-"]
    assert mx.source == '[[routes]]\naction = "mx"'
    assert criteria(mx) == ((), (), (), (), None) and criteria(reject)[1] != ()
    assert mx.authenticated is None and mx.client_networks == ()


def test_example_is_frozen_and_hashable(example: Config) -> None:
    assert hash(example) == hash(load_config(example.source_path))
    assert example == load_config(example.source_path)
    with pytest.raises(FrozenInstanceError):
        example.server.max_hops = 1  # type: ignore[misc]


# -- load_config: files ----------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert info.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nhostname = \n")
    with pytest.raises(tomllib.TOMLDecodeError) as toml_error:
        tomllib.loads(path.read_text())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: {toml_error.value}"]
    assert "line 2" in str(info.value)


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "certs").mkdir(parents=True)
    (conf_dir / "certs" / "ca.pem").write_text("")
    (conf_dir / "relaygw.toml").write_text(LISTENER + """
[server]
spool_dir = "spool"
[tls]
certificate = "certs/cert.pem"
private_key = "certs/key.pem"
[auth]
users_file = "users"
[smarthosts.up]
hosts = ["smtp.example.net"]
ca_file = "certs/ca.pem"
username = "u"
password_file = "secret"
[delivery]
ca_file = "certs/ca.pem"
[[routes]]
action = "maildir"
maildir = "mail/{domain}/{localpart}"
""")
    config = load_config(conf_dir / "relaygw.toml")
    assert config.server.spool_dir == conf_dir / "spool"
    assert config.tls.certificate == conf_dir / "certs" / "cert.pem"
    assert config.tls.private_key == conf_dir / "certs" / "key.pem"
    assert config.auth.users_file == conf_dir / "users"
    assert config.smarthost("up").ca_file == conf_dir / "certs" / "ca.pem"
    assert config.smarthost("up").password_file == conf_dir / "secret"
    assert config.delivery.ca_file == conf_dir / "certs" / "ca.pem"
    assert config.routes[0].maildir == f"{conf_dir}/mail/{{domain}}/{{localpart}}"


def test_relative_config_path_gives_absolute_base_dir(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "relaygw.toml").write_text(LISTENER)
    monkeypatch.chdir(tmp_path)
    config = load_config("relaygw.toml")
    assert config.base_dir == tmp_path
    assert config.server.spool_dir == tmp_path / "relaygw-data" / "spool"


# -- defaults --------------------------------------------------------------------------------

def test_minimal_file_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "Relay-1.Test")

    def no_dns(*args: object) -> str:
        raise AssertionError("getfqdn must not be called")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    config = parse(LISTENER)
    assert config.server.hostname == "relay-1.test"
    assert config.server.spool_dir == BASE_DIR / "relaygw-data" / "spool"
    assert config.listeners == (ListenerConfig("127.0.0.1:2525", "127.0.0.1", 2525),)
    assert config.listeners[0].tls == "starttls" and config.listeners[0].auth == "optional"
    assert config.access.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.access.relay_domains == ()
    assert config.smarthosts == () and config.aliases == ()
    assert config.delivery.retry_intervals == (300, 900, 1800, 3600)
    assert config.delivery.tls == "opportunistic" and config.delivery.mx_port == 25
    assert [(r.index, r.action, r.source) for r in config.routes] == [
        (0, "mx", '[[routes]]\naction = "mx"')]
    assert config.source_path is None and config.warnings == ()


def test_min_free_space_follows_max_message_size() -> None:
    config = parse(LISTENER + "[server]\nmax_message_size = 2048\n")
    assert config.server.min_free_space == 4096
    config = parse(LISTENER + "[server]\nmax_message_size = 2048\nmin_free_space = 0\n")
    assert config.server.min_free_space == 0


def test_long_lines_are_accepted_up_to_a_mebibyte_by_default() -> None:
    server = parse(LISTENER).server
    assert (server.long_lines, server.max_line_length) == ("accept", 1048576)
    server = parse(LISTENER + '[server]\nlong_lines = "reject"\n').server
    assert server.long_lines == "reject"
    server = parse(LISTENER + "[server]\nmax_line_length = 1000\n").server
    assert server.max_line_length == 1000


def test_long_line_settings_are_checked_by_key() -> None:
    assert problems(LISTENER + """
[server]
long_lines = "fold"
max_line_length = 999
""") == [
        'server.long_lines: must be one of accept, reject (got "fold")',
        "server.max_line_length: must be >= 1000 (got 999)",
    ]
    assert problems(LISTENER + '[server]\nmax_line_length = "1M"\n') == [
        'server.max_line_length: must be an integer (got "1M")']


def test_max_line_length_with_reject_is_a_warning() -> None:
    config = parse(LISTENER + '[server]\nlong_lines = "reject"\nmax_line_length = 65536\n')
    assert config.warnings == (
        'server.max_line_length: has no effect with server.long_lines = "reject"',)


def test_default_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "MX1.Example.NET")
    data_dir = tmp_path / "relaygw-data"
    config = default_config(data_dir)
    assert config.server.hostname == "mx1.example.net"
    assert config.server.spool_dir == data_dir / "spool"
    assert config.listeners == (
        ListenerConfig("127.0.0.1:2525", "127.0.0.1", 2525, "starttls", False, "optional"),)
    assert config.access.trusted_networks == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.access.relay_domains == ()
    assert len(config.routes) == 1
    route = config.routes[0]
    assert route.action == "maildir" and criteria(route) == ((), (), (), (), None)
    assert route.maildir == str(data_dir / "maildir" / "{domain}" / "{localpart}")
    assert config.base_dir == tmp_path
    assert config.source_path is None
    assert config.warnings == ()


# -- unknown keys ----------------------------------------------------------------------------

def test_unknown_keys_at_every_level(tmp_path: Path) -> None:
    assert problems("""
foo = 1
[server]
max_mesage_size = 1
[tls]
cert = "x"
[[listeners]]
address = "127.0.0.1:25"
port = 25
[access]
relay = []
[auth]
users = "x"
[smarthosts.up]
hosts = ["a.example"]
host = "b.example"
[dns]
servers = []
[delivery]
retries = []
[delivery.timeouts]
connect = 10
data = 10
[[routes]]
action = "mx"
domains = []
[bar]
""") == [
        "foo: unknown key",
        "bar: unknown key",
        "server.max_mesage_size: unknown key",
        "tls.cert: unknown key",
        "access.relay: unknown key",
        "auth.users: unknown key",
        "listeners[0].port: unknown key",
        "smarthosts.up.host: unknown key",
        "dns.servers: unknown key",
        "delivery.retries: unknown key",
        "delivery.timeouts.data: unknown key",
        "routes[0].domains: unknown key",
    ]


# -- types and ranges ------------------------------------------------------------------------

def test_type_errors_name_the_key_and_show_the_value() -> None:
    assert problems(LISTENER + """
[server]
max_recipients = "abc"
max_hops = true
idle_timeout = "slow"
max_errors = 2.5
hostname = 7
bare_newlines = "fix"
""") == [
        "server.hostname: must be a string (got 7)",
        "server.max_recipients: must be an integer (got \"abc\")",
        "server.max_hops: must be an integer (got true)",
        "server.idle_timeout: must be a number > 0 (got \"slow\")",
        "server.bare_newlines: must be one of reject, normalize (got \"fix\")",
        "server.max_errors: must be an integer (got 2.5)",
    ]


def test_range_errors() -> None:
    assert problems(LISTENER + """
[server]
max_message_size = 1023
max_recipients = 0
idle_timeout = 0
min_free_space = -1
[dns]
timeout = -1.5
[delivery]
mx_port = 0
max_queue_time = 0
[delivery.timeouts]
data_done = 0
""") == [
        "server.max_message_size: must be >= 1024 (got 1023)",
        "server.max_recipients: must be >= 1 (got 0)",
        "server.idle_timeout: must be a number > 0 (got 0)",
        "server.min_free_space: must be >= 0 (got -1)",
        "dns.timeout: must be a number > 0 (got -1.5)",
        "delivery.max_queue_time: must be >= 1 (got 0)",
        "delivery.mx_port: must be between 1 and 65535 (got 0)",
        "delivery.timeouts.data_done: must be a number > 0 (got 0)",
    ]


def test_floats_accept_integers_and_reject_infinity() -> None:
    config = parse(LISTENER + "[server]\nidle_timeout = 1.5\n[delivery.timeouts]\nconnect = 5\n")
    assert config.server.idle_timeout == 1.5
    assert config.delivery.timeouts.connect == 5.0
    assert problems(LISTENER + "[dns]\ntimeout = inf\n") == [
        "dns.timeout: must be a number > 0 (got inf)"]


def test_tables_of_the_wrong_type() -> None:
    assert problems('server = 5\nlisteners = {address = "x"}\nroutes = ["mx"]\n') == [
        "server: must be a table (got 5)",
        "listeners: must be an array of tables (got {address = \"x\"})",
        "routes[0]: must be a table (got \"mx\")",
    ]


def test_hostname_validation() -> None:
    assert parse(LISTENER + '[server]\nhostname = "MX-1.Example.NET"\n').server.hostname == (
        "mx-1.example.net")
    long_label = "a" * 64
    assert problems(LISTENER + f"""[server]\nhostname = "{long_label}.example"\n""") == [
        f'server.hostname: invalid hostname (got "{long_label}.example")']
    for bad in ("bad_host.example", "a..b", "example.org.", "", "a b"):
        assert problems(LISTENER + f'[server]\nhostname = "{bad}"\n') == [
            f'server.hostname: invalid hostname (got "{bad}")']
    too_long = ".".join(["a" * 63] * 4)  # 255 characters
    assert problems(LISTENER + f'[server]\nhostname = "{too_long}"\n') == [
        f'server.hostname: invalid hostname (got "{too_long}")']


# -- tls -------------------------------------------------------------------------------------

def test_tls_certificate_and_key_come_together() -> None:
    assert problems(LISTENER + '[tls]\ncertificate = "c.pem"\n') == [
        "tls.private_key: required when tls.certificate is set"]
    assert problems(LISTENER + '[tls]\nprivate_key = "k.pem"\n') == [
        "tls.certificate: required when tls.private_key is set"]
    assert parse(LISTENER).tls.certificate is None


# -- listeners -------------------------------------------------------------------------------

def test_listener_addresses() -> None:
    config = parse("""
[[listeners]]
address = "[::1]:0"
tls = "none"
auth = "none"
[[listeners]]
address = "192.0.2.1:587"
tls = "starttls"
require_tls = true
""")
    assert [(lst.address, lst.host, lst.port) for lst in config.listeners] == [
        ("[::1]:0", "::1", 0), ("192.0.2.1:587", "192.0.2.1", 587)]
    assert config.listeners[1].require_tls is True


def test_listener_errors() -> None:
    assert problems("""
[[listeners]]
address = "localhost:25"
[[listeners]]
address = "0.0.0.0"
tls = "startls"
[[listeners]]
address = "::1:25"
[[listeners]]
address = "0.0.0.0:70000"
[[listeners]]
tls = "none"
auth = "required"
require_tls = true
[[listeners]]
address = "[10.0.0.1]:25"
""") == [
        'listeners[0].address: host must be an IP address (got "localhost")',
        'listeners[1].address: must be "host:port" or "[v6]:port" (got "0.0.0.0")',
        'listeners[1].tls: must be one of none, starttls, implicit (got "startls")',
        'listeners[2].address: IPv6 addresses need brackets: must be "host:port" or '
        '"[v6]:port" (got "::1:25")',
        'listeners[3].address: port must be between 0 and 65535 (got "70000")',
        "listeners[4].address: required",
        'listeners[4].auth: "required" needs tls = starttls or implicit '
        "(AUTH is only offered over TLS)",
        "listeners[4].require_tls: true needs tls = starttls or implicit",
        'listeners[4].auth: "required" needs auth.users_file',
        'listeners[5].address: invalid IPv6 address (got "10.0.0.1")',
    ]


def test_at_least_one_listener() -> None:
    assert problems("") == ["listeners: at least one listener is required"]
    assert problems("listeners = []\n") == ["listeners: at least one listener is required"]


def test_duplicate_listener() -> None:
    assert problems("""
[[listeners]]
address = "127.0.0.1:25"
[[listeners]]
address = "[::1]:25"
[[listeners]]
address = "127.0.0.1:25"
""") == ["listeners[2].address: duplicate of listeners[0].address (127.0.0.1:25)"]
    # Port 0 asks for a fresh ephemeral port each time, so it is never a duplicate.
    assert len(parse('listeners = [{address = "127.0.0.1:0"}, {address = "127.0.0.1:0"}]')
               .listeners) == 2


def test_auth_required_needs_users_file() -> None:
    text = '[[listeners]]\naddress = "127.0.0.1:465"\ntls = "implicit"\nauth = "required"\n'
    assert problems(text) == ['listeners[0].auth: "required" needs auth.users_file']
    config = parse(text + '[auth]\nusers_file = "users"\n')
    assert config.auth.users_file == BASE_DIR / "users"


def test_auth_senders_bind_users_to_address_patterns() -> None:
    config = parse(LISTENER + r"""
[auth]
users_file = "users"
[auth.senders]
alice = ["alice@example.org", 're:^alice\+.*@example\.org$']
"bob@example.org" = ["*@example.org"]
""")
    alice = config.auth.allowed_senders("alice")
    assert alice is not None
    assert [p.text for p in alice] == ["alice@example.org", r"re:^alice\+.*@example\.org$"]
    assert alice[0].matches("Alice@Example.ORG") and not alice[0].matches("bob@example.org")
    assert [p.text for p in config.auth.allowed_senders("bob@example.org") or ()] == [
        "*@example.org"]
    assert config.auth.allowed_senders("carol") is None  # not listed: any sender
    assert parse(LISTENER).auth.senders == ()
    assert config.warnings == ()


def test_auth_senders_errors_name_the_key() -> None:
    assert problems(LISTENER + """
[auth]
users_file = "users"
[auth.senders]
alice = ["", "re:(", 5]
bob = "bob@example.org"
carol = []
"d:ave" = ["*"]
"e ve" = ["*"]
""") == [
        "auth.senders.alice[0]: must not be empty",
        "auth.senders.alice[1]: invalid regular expression: missing ), unterminated "
        "subpattern at position 0",
        "auth.senders.alice[2]: must be a string (got 5)",
        'auth.senders.bob: must be a list of strings (got "bob@example.org")',
        "auth.senders.carol: must not be empty",
        'auth.senders."d:ave": not a user name the users file can hold',
        'auth.senders."e ve": not a user name the users file can hold',
    ]
    assert problems(LISTENER + '[auth]\nsenders = ["alice"]\n') == [
        'auth.senders: must be a table (got ["alice"])']


def test_auth_senders_without_a_users_file_warns() -> None:
    config = parse(LISTENER + '[auth.senders]\nalice = ["alice@example.org"]\n')
    assert config.warnings == ("auth.senders: has no effect without auth.users_file",)


# -- access ----------------------------------------------------------------------------------

def test_access_values() -> None:
    config = parse(LISTENER + """
[access]
trusted_networks = ["10.1.2.3/8", "2001:db8::1/32", "192.0.2.7"]
relay_domains = ["Example.ORG", "*.Sub.Example.org", "bücher.example", "*.bücher.example"]
""")
    assert config.access.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.7/32"))
    assert config.access.relay_domains == (
        "example.org", "*.sub.example.org", "xn--bcher-kva.example", "*.xn--bcher-kva.example")
    assert parse(LISTENER + "[access]\ntrusted_networks = []\n").access.trusted_networks == ()


def test_access_errors() -> None:
    assert problems(LISTENER + """
[access]
trusted_networks = ["10.0.0.0/33", "nope", 10]
relay_domains = ["exa mple.org", "*.", "**.example", "example..org", "-", 5]
""") == [
        'access.trusted_networks[0]: invalid network (got "10.0.0.0/33")',
        'access.trusted_networks[1]: invalid network (got "nope")',
        "access.trusted_networks[2]: must be a string (got 10)",
        'access.relay_domains[0]: invalid domain (got "exa mple.org")',
        'access.relay_domains[2]: invalid domain (got "**.example")',
        'access.relay_domains[3]: invalid domain (got "example..org")',
        "access.relay_domains[5]: must be a string (got 5)",
    ]


# -- smarthosts ------------------------------------------------------------------------------

def test_smarthost_hosts_and_default_ports(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    config = parse(LISTENER + """
[smarthosts.implicit]
hosts = ["Mail.Example.NET", "[2001:db8::25]:2525", "192.0.2.25", "2001:db8::26"]
tls = "implicit"
ca_file = "ca.pem"
[smarthosts."with space"]
hosts = ["mail.example.net"]
""", tmp_path)
    implicit = config.smarthost("implicit")
    assert implicit.hosts == (
        HostPort("mail.example.net", 465), HostPort("2001:db8::25", 2525),
        HostPort("192.0.2.25", 465), HostPort("2001:db8::26", 465))
    assert [str(h) for h in implicit.hosts] == [
        "mail.example.net:465", "[2001:db8::25]:2525", "192.0.2.25:465", "[2001:db8::26]:465"]
    assert implicit.ca_file == tmp_path / "ca.pem"
    assert config.smarthost("with space").hosts == (HostPort("mail.example.net", 25),)
    assert config.smarthost("with space").tls == "verify"


def test_smarthost_errors(tmp_path: Path) -> None:
    assert problems(LISTENER + """
[smarthosts.a]
hosts = []
tls = "tls"
[smarthosts.b]
username = "u"
ca_file = "missing-ca.pem"
[smarthosts.c]
hosts = ["bad_host:25", "mail.example:0", "[::1"]
password_file = "secret"
[smarthosts."d e"]
hosts = "mail.example"
[smarthosts]
f = 1
""", tmp_path) == [
        'smarthosts.a.tls: must be one of none, opportunistic, require, verify, implicit '
        '(got "tls")',
        "smarthosts.a.hosts: must not be empty",
        "smarthosts.b.hosts: required",
        "smarthosts.b.password_file: required when smarthosts.b.username is set",
        f"smarthosts.b.ca_file: file not found: {tmp_path / 'missing-ca.pem'}",
        'smarthosts.c.hosts[0]: invalid domain (got "bad_host")',
        'smarthosts.c.hosts[1]: port must be between 1 and 65535 (got "0")',
        'smarthosts.c.hosts[2]: must be "host:port" or "[v6]:port" (got "[::1")',
        "smarthosts.c.username: required when smarthosts.c.password_file is set",
        'smarthosts."d e".hosts: must be a list of strings (got "mail.example")',
        "smarthosts.f: must be a table (got 1)",
    ]


# -- aliases ---------------------------------------------------------------------------------

def test_alias_values() -> None:
    config = parse(LISTENER + """
[aliases]
"Postmaster@Example.ORG" = "ops@Corp.Example"
"abuse@bücher.example" = ["a@example.org"]
"@Old.Example" = ["@New.Example"]
""")
    assert config.aliases == (
        AliasEntry("Postmaster@example.org", ("ops@corp.example",)),
        AliasEntry("abuse@xn--bcher-kva.example", ("a@example.org",)),
        AliasEntry("@old.example", ("@new.example",)),
    )


def test_alias_errors() -> None:
    assert problems(LISTENER + """
[aliases]
"empty@example.org" = []
"nodomain" = "a@example.org"
"bad@domain..org" = "a@example.org"
"list@example.org" = ["ok@example.org", "no-at", "sp ace@example.org", "x@"]
"@old.example" = "someone@example.org"
"@older.example" = ["@a.example", "@b.example"]
"@oldest.example" = "@bad_domain"
"number@example.org" = 5
"mixed@example.org" = ["a@example.org", 5]
""") == [
        'aliases."empty@example.org": must not be empty',
        'aliases.nodomain: key must be "local@domain" or "@domain"',
        'aliases."bad@domain..org": key must be "local@domain" or "@domain"',
        'aliases."list@example.org"[1]: must be an address local@domain (got "no-at")',
        'aliases."list@example.org"[2]: must be an address local@domain '
        '(got "sp ace@example.org")',
        'aliases."list@example.org"[3]: must be an address local@domain (got "x@")',
        'aliases."@old.example": must be one "@domain" string (got "someone@example.org")',
        'aliases."@older.example": must be one "@domain" string '
        '(got ["@a.example", "@b.example"])',
        'aliases."@oldest.example": must be an address local@domain (got "@bad_domain")',
        'aliases."number@example.org": must be an address or a list of addresses (got 5)',
        'aliases."mixed@example.org": must be an address or a list of addresses '
        '(got ["a@example.org", 5])',
    ]


def test_duplicate_alias_after_normalisation() -> None:
    assert problems(LISTENER + """
[aliases]
"a@example.org" = "b@example.org"
"a@EXAMPLE.org" = "c@example.org"
""") == ['aliases."a@EXAMPLE.org": duplicate alias for a@example.org']


# -- dns and delivery ------------------------------------------------------------------------

def test_dns_nameservers() -> None:
    config = parse(LISTENER + """
[dns]
nameservers = ["192.0.2.53", "192.0.2.54:5353", "[2001:db8::53]:53", "2001:db8::54"]
timeout = 2
""")
    assert config.dns.nameservers == (
        HostPort("192.0.2.53", 53), HostPort("192.0.2.54", 5353),
        HostPort("2001:db8::53", 53), HostPort("2001:db8::54", 53))
    assert config.dns.timeout == 2.0
    assert problems(LISTENER + '[dns]\nnameservers = ["ns1.example", "192.0.2.1:x"]\n') == [
        'dns.nameservers[0]: host must be an IP address (got "ns1.example")',
        'dns.nameservers[1]: port must be between 1 and 65535 (got "x")',
    ]


def test_delivery_values_and_errors(tmp_path: Path) -> None:
    config = parse(LISTENER + """
[delivery]
retry_intervals = [60]
tls = "verify"
[delivery.timeouts]
connect = 10
quit = 5.5
""")
    assert config.delivery.retry_intervals == (60,)
    assert config.delivery.tls == "verify" and config.delivery.ca_file is None
    assert config.delivery.timeouts == DeliveryTimeouts(connect=10.0, quit=5.5)
    assert problems(LISTENER + """
[delivery]
retry_intervals = []
tls = "implicit"
ca_file = "/nonexistent/ca.pem"
""") == [
        "delivery.retry_intervals: must be a non-empty list of integers (got [])",
        "delivery.tls: must be one of none, opportunistic, require, verify (got \"implicit\")",
        "delivery.ca_file: file not found: /nonexistent/ca.pem",
    ]
    assert problems(LISTENER + "[delivery]\nretry_intervals = [60, 0, true, \"x\"]\n") == [
        "delivery.retry_intervals[1]: must be an integer >= 1 (got 0)",
        "delivery.retry_intervals[2]: must be an integer >= 1 (got true)",
        'delivery.retry_intervals[3]: must be an integer >= 1 (got "x")',
    ]


def test_delay_warning_time_default_range_and_errors() -> None:
    assert parse(LISTENER).delivery.delay_warning_time == 14400
    assert parse(LISTENER + "[delivery]\ndelay_warning_time = 0\n").delivery.delay_warning_time == 0
    config = parse(LISTENER + "[delivery]\ndelay_warning_time = 3600\n")
    assert config.delivery.delay_warning_time == 3600 and config.warnings == ()
    assert problems(LISTENER + "[delivery]\ndelay_warning_time = -1\n") == [
        "delivery.delay_warning_time: must be >= 0 (got -1)"]
    assert problems(LISTENER + '[delivery]\ndelay_warning_time = "4h"\n') == [
        'delivery.delay_warning_time: must be an integer (got "4h")']
    assert problems(LISTENER + "[delivery]\ndelay_warning_time = 1.5\n") == [
        "delivery.delay_warning_time: must be an integer (got 1.5)"]


def test_delay_warning_time_not_below_max_queue_time_is_a_warning() -> None:
    config = parse(LISTENER + "[delivery]\nmax_queue_time = 3600\ndelay_warning_time = 3600\n")
    assert config.warnings == (
        "delivery.delay_warning_time: never reached: not below delivery.max_queue_time (3600)",)
    # The default is not a setting of the administrator's: no warning for it.
    assert parse(LISTENER + "[delivery]\nmax_queue_time = 3600\n").warnings == ()


# -- routes ----------------------------------------------------------------------------------

def test_route_match_keys() -> None:
    config = parse(LISTENER + """
[[routes]]
recipient_domains = ["Example.org"]
recipients = ["*-bounces@*", "re:^noreply-"]
senders = ["alice@example.org"]
client_networks = ["192.0.2.0/24"]
authenticated = true
action = "mx"
""")
    route = config.routes[0]
    assert route.recipient_domains == ("example.org",)
    assert route.client_networks == (ipaddress.ip_network("192.0.2.0/24"),)
    assert route.authenticated is True
    glob, regex = route.recipients
    assert glob.matches("list-bounces@example.org")
    assert glob.matches("LIST-BOUNCES@EXAMPLE.ORG")
    assert glob.matches("list-bounces@lists.example.org")  # "*" also spans dots
    assert not glob.matches("xlist-bouncesx@example.org")
    assert regex.matches("NoReply-1@example.org")
    assert not regex.matches("x-noreply-1@example.org")
    sender = route.senders[0]
    assert sender.matches("Alice@Example.org")
    assert not sender.matches("malice@example.org")  # globs cover the whole address
    assert not sender.matches("alice@example.org.evil")
    assert criteria(route) != ((), (), (), (), None)
    literal = parse(LISTENER + '[[routes]]\nrecipients = ["(a)+@example.org"]\naction = "mx"\n')
    assert literal.routes[0].recipients[0].matches("(A)+@example.org")  # globs are not regexes
    assert not literal.routes[0].recipients[0].matches("aa@example.org")


def test_route_errors() -> None:
    assert problems(LISTENER + """
[smarthosts.upstream]
hosts = ["smtp.example.net"]
[[routes]]
recipient_domains = []
[[routes]]
action = "smarthost"
smarthost = "exchange"
[[routes]]
action = "deliver"
[[routes]]
action = "maildir"
reply = "550 5.1.1 No"
[[routes]]
action = "mx"
maildir = "/var/mail/{domain}"
smarthost = "upstream"
[[routes]]
action = "smarthost"
[[routes]]
recipients = ["(unclosed", "re:(unclosed", ""]
senders = "a@example.org"
authenticated = "yes"
client_networks = ["10.0.0.0/40"]
action = "mx"
""") == [
        "routes[0].action: required",
        "routes[0].recipient_domains: must not be empty",
        "routes[1].smarthost: no [smarthosts.exchange] table",
        'routes[2].action: must be one of maildir, smarthost, mx, reject (got "deliver")',
        'routes[3].maildir: required when action = "maildir"',
        'routes[3].reply: only allowed with action = "reject"',
        'routes[4].maildir: only allowed with action = "maildir"',
        'routes[4].smarthost: only allowed with action = "smarthost"',
        'routes[5].smarthost: required when action = "smarthost"',
        "routes[6].recipients[1]: invalid regular expression: "
        "missing ), unterminated subpattern at position 0",
        "routes[6].recipients[2]: must not be empty",
        'routes[6].senders: must be a list of strings (got "a@example.org")',
        'routes[6].client_networks[0]: invalid network (got "10.0.0.0/40")',
        'routes[6].authenticated: must be true or false (got "yes")',
    ]


def test_route_maildir_templates(tmp_path: Path) -> None:
    config = parse(LISTENER + """
[[routes]]
action = "maildir"
maildir = "mail/{domain}/{localpart}/{{literal}}"
""", tmp_path)
    assert config.routes[0].maildir == f"{tmp_path}/mail/{{domain}}/{{localpart}}/{{{{literal}}}}"
    assert problems(LISTENER + """
[[routes]]
action = "maildir"
maildir = "/var/mail/{user}"
[[routes]]
action = "maildir"
maildir = "/var/mail/{domain!r}"
[[routes]]
action = "maildir"
maildir = "/var/mail/{domain"
[[routes]]
action = "maildir"
maildir = ""
""") == [
        "routes[0].maildir: unknown placeholder {user} (allowed: {domain}, {localpart})",
        "routes[1].maildir: unknown placeholder {domain!r} (allowed: {domain}, {localpart})",
        "routes[2].maildir: invalid template: expected '}' before end of string",
        "routes[3].maildir: must not be empty",
    ]


def test_route_reply() -> None:
    config = parse(LISTENER + """
[[routes]]
action = "reject"
[[routes]]
action = "reject"
reply = "450 4.7.1 Try again later"
""")
    assert [(r.reply_code, r.reply_enhanced, r.reply_text) for r in config.routes] == [
        (550, "5.1.1", "Mailbox unavailable"), (450, "4.7.1", "Try again later")]
    assert problems(LISTENER + """
[[routes]]
action = "reject"
reply = "250 2.0.0 OK"
[[routes]]
action = "reject"
reply = "550 4.1.1 Mismatch"
[[routes]]
action = "reject"
reply = "550 Mailbox unavailable"
""") == [
        "routes[0].reply: reply code must be between 400 and 599 (got 250)",
        "routes[1].reply: enhanced code 4.1.1 does not match reply code 550",
        'routes[2].reply: must be "CODE X.Y.Z text", e.g. "550 5.1.1 Mailbox unavailable" '
        '(got "550 Mailbox unavailable")',
    ]


def test_route_source_quotes_values_as_toml() -> None:
    route = parse(LISTENER + """
[[routes]]
senders = ['a"b@example.org']
authenticated = false
client_networks = ["10.0.0.0/8"]
action = "reject"
reply = "550 5.7.1 Go away"
""").routes[0]
    assert route.source == (
        '[[routes]]\n'
        'senders = ["a\\"b@example.org"]\n'
        'authenticated = false\n'
        'client_networks = ["10.0.0.0/8"]\n'
        'action = "reject"\n'
        'reply = "550 5.7.1 Go away"')
    assert tomllib.loads(route.source)["routes"][0]["senders"] == ['a"b@example.org']


# -- metrics and log -------------------------------------------------------------------------

def test_metrics_and_log_defaults(example: Config) -> None:
    for config in (example, parse(LISTENER), default_config(Path("/srv/relaygw-data"))):
        assert config.metrics == MetricsConfig(None, None, None)
        assert config.log == LogConfig("text")


def test_metrics_address() -> None:
    config = parse(LISTENER + '[metrics]\naddress = "127.0.0.1:9325"\n[log]\nformat = "json"\n')
    assert config.metrics == MetricsConfig("127.0.0.1:9325", "127.0.0.1", 9325)
    assert config.log == LogConfig("json")
    assert parse(LISTENER + '[metrics]\naddress = "[::1]:0"\n').metrics == (
        MetricsConfig("[::1]:0", "::1", 0))
    assert parse(LISTENER + "[metrics]\n").metrics == MetricsConfig()
    assert parse(LISTENER + '[log]\nformat = "text"\n').log == LogConfig()


def test_metrics_and_log_errors() -> None:
    assert problems(LISTENER + """
[metrics]
address = "localhost:9325"
port = 9325
[log]
format = "xml"
level = "debug"
""") == [
        "metrics.port: unknown key",
        'metrics.address: host must be an IP address (got "localhost")',
        "log.level: unknown key",
        'log.format: must be one of text, json (got "xml")',
    ]
    for address, message in (
            ('"127.0.0.1"', 'must be "host:port" or "[v6]:port" (got "127.0.0.1")'),
            ('"::1:9325"', 'IPv6 addresses need brackets: must be "host:port" or "[v6]:port" '
                           '(got "::1:9325")'),
            ('"127.0.0.1:65536"', 'port must be between 0 and 65535 (got "65536")'),
            ('""', 'host must be an IP address (got "")'),
            ("9325", "must be a string (got 9325)"),
            ('"127.0.0.1:2525"', 'same address as the listener "127.0.0.1:2525"')):
        assert problems(LISTENER + f"[metrics]\naddress = {address}\n") == [
            f"metrics.address: {message}"]
    assert problems('metrics = "127.0.0.1:9325"\nlog = "json"\n' + LISTENER) == [
        'metrics: must be a table (got "127.0.0.1:9325")',
        'log: must be a table (got "json")',
    ]
    assert problems(LISTENER + "[log]\nformat = true\n") == [
        "log.format: must be a string (got true)"]


def test_metrics_port_zero_may_repeat_a_listener_port_zero() -> None:
    config = parse('[[listeners]]\naddress = "127.0.0.1:0"\n[metrics]\naddress = "127.0.0.1:0"\n')
    assert config.metrics.port == 0


# -- warnings --------------------------------------------------------------------------------

def test_warnings() -> None:
    config = parse("""
[[listeners]]
address = "0.0.0.0:25"
tls = "none"
[[listeners]]
address = "0.0.0.0:26"
tls = "none"
auth = "none"
[access]
trusted_networks = ["0.0.0.0/0", "::/0", "10.0.0.0/8"]
relay_domains = ["*"]
[[routes]]
recipient_domains = ["example.org"]
action = "mx"
[[routes]]
action = "mx"
[[routes]]
action = "reject"
[[routes]]
senders = ["*"]
action = "reject"
""")
    assert config.warnings == (
        "access.trusted_networks: 0.0.0.0/0 makes relaygw an open relay",
        "access.trusted_networks: ::/0 makes relaygw an open relay",
        'access.relay_domains: "*" makes relaygw an open relay',
        "listeners[0].auth: AUTH is never offered without TLS on this listener",
        "routes[2]: never matches (routes[1] matches everything before it)",
        "routes[3]: never matches (routes[1] matches everything before it)",
    )
    assert config.access.relay_domains == ("*",)


def test_a_hostname_that_is_not_fully_qualified_is_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse(LISTENER + '[server]\nhostname = "mailhub"\n')
    assert config.server.hostname == "mailhub"
    assert config.warnings == (
        'server.hostname: "mailhub" is not a fully qualified domain name: peers may refuse '
        "it in EHLO",)
    monkeypatch.setattr(socket, "gethostname", lambda: "VM")
    assert parse(LISTENER).warnings == (
        'server.hostname: not set, and this host\'s name "vm" is not a fully qualified domain '
        "name: peers may refuse it in EHLO; set it",)
    monkeypatch.setattr(socket, "gethostname", lambda: "vm.example.net")
    assert parse(LISTENER).warnings == ()
    assert parse(LISTENER + '[server]\nhostname = "mx.example.net"\n').warnings == ()


def test_catch_all_relay_domain_spelled_with_a_dot() -> None:
    config = parse(LISTENER + '[access]\nrelay_domains = ["*."]\n')
    assert config.access.relay_domains == ("*",)
    assert config.warnings == ('access.relay_domains: "*" makes relaygw an open relay',)


# -- several problems at once ----------------------------------------------------------------

def test_all_problems_are_reported_together() -> None:
    text = """
[server]
max_recipients = "abc"
[[listeners]]
address = "localhost:25"
tls = "startls"
[[routes]]
action = "smarthost"
smarthost = "exchange"
"""
    with pytest.raises(ConfigError) as info:
        parse(text)
    expected = [
        'server.max_recipients: must be an integer (got "abc")',
        'listeners[0].address: host must be an IP address (got "localhost")',
        'listeners[0].tls: must be one of none, starttls, implicit (got "startls")',
        "routes[0].smarthost: no [smarthosts.exchange] table",
    ]
    assert info.value.problems == expected
    assert str(info.value) == "\n".join(expected)


def test_import_has_no_twisted_and_no_side_effects() -> None:
    code = ("import socket, sys\n"
            "socket.gethostname = socket.getfqdn = None  # any call at import would fail\n"
            "import relaygw.config\n"
            "assert not any(m.startswith('twisted') for m in sys.modules), 'twisted imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_shutdown_grace_is_configurable(tmp_path):
    config = parse_config({"server": {"shutdown_grace": 5},
                           "listeners": [{"address": "127.0.0.1:0"}]}, tmp_path)
    assert config.server.shutdown_grace == 5.0
    with pytest.raises(ConfigError) as e:
        parse_config({"server": {"shutdown_grace": "soon"},
                      "listeners": [{"address": "127.0.0.1:0"}]}, tmp_path)
    assert e.value.problems == ['server.shutdown_grace: must be a number > 0 (got "soon")']


def test_verify_without_any_trust_store_warns(tmp_path, monkeypatch):
    import ssl

    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: ssl.DefaultVerifyPaths(
        None, None, "/nonexistent/ca.pem", "", "/nonexistent/certs", ""))
    config = parse_config({"listeners": [{"address": "127.0.0.1:0"}],
                           "smarthosts": {"up": {"hosts": ["192.0.2.1"]}}}, tmp_path)
    assert config.warnings == (
        'smarthosts.up.tls: "verify" needs a trust store: set ca_file (no system CA store found)',)


def test_workers_default_is_one_per_usable_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert parse(LISTENER).server.workers == 3
    assert parse(LISTENER + '[server]\nworkers = "auto"\n').server.workers == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert parse(LISTENER).server.workers == 0  # one core: everything in one process
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(100)))
    assert parse(LISTENER).server.workers == 64


def test_workers_explicit_counts_and_errors() -> None:
    assert parse(LISTENER + "[server]\nworkers = 0\n").server.workers == 0
    assert parse(LISTENER + "[server]\nworkers = 5\n").server.workers == 5
    assert problems(LISTENER + '[server]\nworkers = "many"\n') == [
        'server.workers: must be an integer or "auto" (got "many")']
    assert problems(LISTENER + "[server]\nworkers = 65\n") == [
        "server.workers: must be between 0 and 64 (got 65)"]
    assert problems(LISTENER + "[server]\nworkers = true\n") == [
        "server.workers: must be an integer (got true)"]
