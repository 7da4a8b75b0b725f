"""Tests for relaygw.smtp.tls, including real TLS handshakes over loopback."""

from __future__ import annotations

import datetime
import stat
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from relaygw.smtp.tls import (
    TLSSetupError,
    ensure_self_signed,
    server_tls_options,
    tls_session_info,
)

HOST = "mx.example.test"
TIMEOUT = 10  # seconds; a wedged handshake fails the test instead of hanging it


@pytest.fixture
def reactor():
    # The global reactor, which pytest-twisted installed before any test ran.
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(directory: Path, leaf: trustme.LeafCert) -> tuple[Path, Path]:
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_path.write_bytes(leaf.private_key_pem.bytes())
    return cert_path, key_path


def client_options(ca: trustme.CA, hostname: str = HOST) -> IOpenSSLClientConnectionCreator:
    return optionsForClientTLS(hostname, trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))


# ---------------------------------------------------------------------------
# server_tls_options: errors


def test_options_for_a_valid_pair(tmp_path: Path, ca: trustme.CA) -> None:
    cert_path, key_path = write_pair(tmp_path, ca.issue_cert(HOST))
    options = server_tls_options(cert_path, key_path)
    assert isinstance(options, CertificateOptions)
    # set_options(0) changes nothing and returns the current option bits.
    assert options.getContext().set_options(0) & SSL.OP_NO_COMPRESSION


def test_missing_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    _, key_path = write_pair(tmp_path, ca.issue_cert(HOST))
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSSetupError) as info:
        server_tls_options(missing, key_path)
    assert str(info.value) == f"tls.certificate: cannot read {missing}: No such file or directory"


def test_missing_key(tmp_path: Path, ca: trustme.CA) -> None:
    cert_path, _ = write_pair(tmp_path, ca.issue_cert(HOST))
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSSetupError) as info:
        server_tls_options(cert_path, missing)
    assert str(info.value) == f"tls.private_key: cannot read {missing}: No such file or directory"


@pytest.mark.parametrize("content", [b"", b"hello\n", b"-----BEGIN CERTIFICATE-----\nxx\n"])
def test_not_a_pem_certificate(tmp_path: Path, ca: trustme.CA, content: bytes) -> None:
    _, key_path = write_pair(tmp_path, ca.issue_cert(HOST))
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    with pytest.raises(TLSSetupError) as info:
        server_tls_options(bad, key_path)
    assert str(info.value) == "tls.certificate: not a PEM certificate"


def test_key_given_as_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    _, key_path = write_pair(tmp_path, ca.issue_cert(HOST))
    with pytest.raises(TLSSetupError) as info:
        server_tls_options(key_path, key_path)
    assert str(info.value) == "tls.certificate: not a PEM certificate"


def test_certificate_given_as_key(tmp_path: Path, ca: trustme.CA) -> None:
    cert_path, _ = write_pair(tmp_path, ca.issue_cert(HOST))
    with pytest.raises(TLSSetupError) as info:
        server_tls_options(cert_path, cert_path)
    assert str(info.value) == "tls.private_key: not a PEM private key"


def test_encrypted_key(tmp_path: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert(HOST)
    cert_path, key_path = write_pair(tmp_path, leaf)
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(TLSSetupError) as info:
        server_tls_options(cert_path, key_path)
    assert str(info.value) == "tls.private_key: encrypted private keys are not supported"


def test_mismatched_key(tmp_path: Path, ca: trustme.CA) -> None:
    cert_path, _ = write_pair(tmp_path, ca.issue_cert(HOST))
    other_key = tmp_path / "other-key.pem"
    other_key.write_bytes(ca.issue_cert(HOST).private_key_pem.bytes())
    with pytest.raises(TLSSetupError) as info:
        server_tls_options(cert_path, other_key)
    assert str(info.value) == "tls.private_key: does not match tls.certificate"


def test_key_of_an_intermediate_does_not_match_the_leaf(tmp_path: Path, ca: trustme.CA) -> None:
    # The first certificate in the file is the leaf; a key matching a later one is wrong.
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert(HOST)
    cert_path, key_path = write_pair(tmp_path, leaf)
    key_path.write_bytes(intermediate.private_key_pem.bytes())
    with pytest.raises(TLSSetupError) as info:
        server_tls_options(cert_path, key_path)
    assert str(info.value) == "tls.private_key: does not match tls.certificate"


# ---------------------------------------------------------------------------
# Loopback helpers


class Peer(Protocol):
    """Sends ``greeting`` on connect, answers with ``answer``, records what it saw."""

    greeting = b""
    answer = b""

    def __init__(self) -> None:
        self.received: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.info: tuple[str, str] | None = None

    def connectionMade(self) -> None:
        if self.greeting:
            # Written before the handshake: the TLS layer holds it until TLS is up.
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        if self.received.called:
            return
        self.info = tls_session_info(self.transport)
        if self.answer:
            self.transport.write(self.answer)
        else:
            self.transport.loseConnection()
        self.received.callback(data)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.lost.callback(None)  # not the Failure itself, which would errback


class EchoServer(Peer):
    answer = b"pong"


class PingClient(Peer):
    greeting = b"ping"


class Recorder(Factory):
    """A factory that remembers the protocols it built."""

    def __init__(self, protocol: type[Protocol]) -> None:
        self.protocol = protocol
        self.built: list[Any] = []

    def buildProtocol(self, addr: Any) -> Protocol | None:
        proto = super().buildProtocol(addr)
        self.built.append(proto)
        return proto


def with_timeout(d: defer.Deferred[Any], reactor: Any) -> defer.Deferred[Any]:
    return d.addTimeout(TIMEOUT, reactor)


@defer.inlineCallbacks
def settle(reactor: Any, peers: list[Any]) -> Generator[defer.Deferred[Any], Any, None]:
    """Abort every peer still connected and wait until all are gone (no dirty reactor)."""
    for peer in peers:
        if not peer.lost.called and peer.transport is not None:
            peer.transport.abortConnection()
    for peer in peers:
        yield with_timeout(peer.lost, reactor)


@defer.inlineCallbacks
def implicit_tls_exchange(
    reactor: Any, server_options: Any, client_creator: Any
) -> Generator[defer.Deferred[Any], Any, tuple[Peer, Peer]]:
    """Listen with implicit TLS on 127.0.0.1 and connect once; return (server, client).

    The client sends "ping" and the server answers "pong"; if the handshake fails,
    both sides just lose the connection. Everything is closed before returning.
    """
    servers = Recorder(EchoServer)
    endpoint = SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1")
    port = yield endpoint.listen(servers)
    clients = Recorder(PingClient)
    try:
        client_endpoint = wrapClientTLS(
            client_creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        )
        client = yield with_timeout(client_endpoint.connect(clients), reactor)
        yield with_timeout(client.lost, reactor)  # the client hangs up once it has "pong"
    finally:
        yield settle(reactor, [*servers.built, *clients.built])
        yield port.stopListening()
    assert len(servers.built) == 1
    return servers.built[0], client


def assert_modern(info: tuple[str, str] | None) -> None:
    assert info is not None
    version, cipher = info
    assert version in ("TLSv1.2", "TLSv1.3")
    assert cipher


# ---------------------------------------------------------------------------
# Loopback handshakes


@pytest_twisted.inlineCallbacks
def test_implicit_tls_handshake(reactor: Any, tmp_path: Path, ca: trustme.CA) -> Generator:
    options = server_tls_options(*write_pair(tmp_path, ca.issue_cert(HOST)))
    server, client = yield implicit_tls_exchange(reactor, options, client_options(ca))
    assert server.received.result == b"ping"
    assert client.received.result == b"pong"
    assert_modern(server.info)
    assert server.info == client.info
    # Once the connection is gone there is no session to report.
    assert tls_session_info(server.transport) is None


@pytest_twisted.inlineCallbacks
def test_certificate_file_with_intermediates(
    reactor: Any, tmp_path: Path, ca: trustme.CA
) -> Generator:
    # The client trusts only the root, so this works only if the server sends the
    # intermediate from the certificate file.
    leaf = ca.create_child_ca().issue_cert(HOST)
    assert len(leaf.cert_chain_pems) == 2
    options = server_tls_options(*write_pair(tmp_path, leaf))
    server, client = yield implicit_tls_exchange(reactor, options, client_options(ca))
    assert client.received.result == b"pong"
    assert_modern(server.info)


@pytest_twisted.inlineCallbacks
def test_tls12_client_is_accepted(reactor: Any, tmp_path: Path, ca: trustme.CA) -> Generator:
    options = server_tls_options(*write_pair(tmp_path, ca.issue_cert(HOST)))
    tls12_client = CertificateOptions(
        trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()),
        lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
    )
    server, client = yield implicit_tls_exchange(reactor, options, tls12_client)
    assert client.received.result == b"pong"
    assert server.info is not None
    assert server.info[0] == "TLSv1.2"


@implementer(IOpenSSLClientConnectionCreator)
class TLS11OnlyClient:
    """A client that offers nothing newer than TLS 1.1.

    ``@SECLEVEL=0`` lets OpenSSL send such a ClientHello at all, so it is the server
    that refuses the handshake, not the client's own library.
    """

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        return connection


@pytest_twisted.inlineCallbacks
def test_tls11_client_is_refused(reactor: Any, tmp_path: Path, ca: trustme.CA) -> Generator:
    options = server_tls_options(*write_pair(tmp_path, ca.issue_cert(HOST)))
    server, client = yield implicit_tls_exchange(reactor, options, TLS11OnlyClient())
    assert not server.received.called
    assert not client.received.called
    assert server.info is None
    reason = server.reason
    assert reason is not None
    assert reason.check(SSL.Error)
    assert "unsupported protocol" in str(reason.value)


class StartTLSServer(LineReceiver):
    """A toy STARTTLS dialogue: "STARTTLS" → "GO" + TLS, then "PING" → "PONG"."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.info_before: Any = "unset"
        self.info_after: Any = "unset"

    def lineReceived(self, line: bytes) -> None:
        if line == b"STARTTLS":
            self.info_before = tls_session_info(self.transport)
            self.sendLine(b"GO")
            self.transport.startTLS(self.options)
        elif line == b"PING":
            self.info_after = tls_session_info(self.transport)
            self.sendLine(b"PONG")

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.lost.callback(None)  # not the Failure itself, which would errback


class StartTLSClient(LineReceiver):
    def __init__(self, creator: Any) -> None:
        self.creator = creator
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None
        self.info: Any = "unset"

    def connectionMade(self) -> None:
        self.sendLine(b"STARTTLS")

    def lineReceived(self, line: bytes) -> None:
        if line == b"GO":
            self.transport.startTLS(self.creator)
            self.sendLine(b"PING")
        elif line == b"PONG":
            self.info = tls_session_info(self.transport)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.lost.callback(None)  # not the Failure itself, which would errback


@pytest_twisted.inlineCallbacks
def test_starttls_on_tcp(reactor: Any, tmp_path: Path, ca: trustme.CA) -> Generator:
    options = server_tls_options(*write_pair(tmp_path, ca.issue_cert(HOST)))
    servers: list[StartTLSServer] = []

    def build_server() -> StartTLSServer:
        servers.append(StartTLSServer(options))
        return servers[-1]

    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = yield endpoint.listen(Factory.forProtocol(build_server))
    client = StartTLSClient(client_options(ca))
    try:
        client_endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield with_timeout(client_endpoint.connect(Factory.forProtocol(lambda: client)), reactor)
        yield with_timeout(client.lost, reactor)
    finally:
        yield settle(reactor, [*servers, client])
        yield port.stopListening()
    (server,) = servers
    assert server.info_before is None  # a plain TCP transport: getHandle() is a socket
    assert_modern(server.info_after)
    assert client.info == server.info_after


class HandleTransport:
    """Just enough of a transport: ``getHandle`` returns a pyOpenSSL Connection."""

    def __init__(self, connection: SSL.Connection) -> None:
        self.connection = connection

    def getHandle(self) -> SSL.Connection:
        return self.connection


def pump(source: SSL.Connection, sink: SSL.Connection) -> None:
    """Advance ``source``'s handshake and deliver whatever it wants to send to ``sink``."""
    try:
        source.do_handshake()
    except SSL.WantReadError:
        pass
    try:
        sink.bio_write(source.bio_read(65536))
    except SSL.WantReadError:
        pass


def test_session_info_only_after_the_handshake_completes(tmp_path: Path, ca: trustme.CA) -> None:
    options = server_tls_options(*write_pair(tmp_path, ca.issue_cert(HOST)))
    server = SSL.Connection(options.getContext(), None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()
    transport = HandleTransport(server)
    assert tls_session_info(transport) is None
    pump(client, server)  # ClientHello
    pump(server, client)  # ServerHello ... server Finished
    # The server has chosen a cipher but the client has not finished: not established.
    assert server.get_cipher_name() is not None
    assert tls_session_info(transport) is None
    pump(client, server)  # client Finished
    pump(server, client)
    assert tls_session_info(transport) == ("TLSv1.3", server.get_cipher_name())


def test_session_info_without_tls() -> None:
    assert tls_session_info(StringTransport()) is None
    assert tls_session_info(object()) is None


# ---------------------------------------------------------------------------
# ensure_self_signed


def test_self_signed_is_generated(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    cert_path, key_path = ensure_self_signed(directory, HOST)
    assert (cert_path, key_path) == (
        directory / "selfsigned-cert.pem",
        directory / "selfsigned-key.pem",
    )
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == [
        "selfsigned-cert.pem",
        "selfsigned-key.pem",
    ]

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == HOST
    assert cert.issuer == cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3651)
    assert isinstance(server_tls_options(cert_path, key_path), CertificateOptions)


def test_self_signed_is_reused(tmp_path: Path) -> None:
    cert_path, key_path = ensure_self_signed(tmp_path, HOST)
    cert, key = cert_path.read_bytes(), key_path.read_bytes()
    assert ensure_self_signed(tmp_path, "other.example.test") == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == (cert, key)


def test_self_signed_is_regenerated_when_half_missing(tmp_path: Path) -> None:
    cert_path, key_path = ensure_self_signed(tmp_path, HOST)
    old_key = key_path.read_bytes()
    key_path.unlink()
    ensure_self_signed(tmp_path, HOST)
    assert key_path.read_bytes() != old_key
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert cert.public_key() == key.public_key()


def test_self_signed_for_a_long_hostname(tmp_path: Path) -> None:
    # Longer than commonName's 64-character limit: the name goes in the SAN only.
    hostname = ("a" * 60 + ".") * 2 + "example.test"
    cert_path, _ = ensure_self_signed(tmp_path, hostname)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [hostname]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []


def test_self_signed_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TLSSetupError) as info:
        ensure_self_signed(blocker / "tls", HOST)
    assert str(info.value).startswith(f"tls: cannot write a self-signed certificate to {blocker}")


@pytest_twisted.inlineCallbacks
def test_self_signed_handshake(reactor: Any, tmp_path: Path) -> Generator:
    # A client that pins the self-signed certificate verifies it, name included.
    cert_path, key_path = ensure_self_signed(tmp_path, HOST)
    creator = optionsForClientTLS(HOST, trustRoot=Certificate.loadPEM(cert_path.read_bytes()))
    server, client = yield implicit_tls_exchange(
        reactor, server_tls_options(cert_path, key_path), creator
    )
    assert client.received.result == b"pong"
    assert_modern(server.info)
