"""TLS for the SMTP protocols: server contexts from PEM files, a self-signed bootstrap,
and the facts of an established session (both directions report them).

Everything that can go wrong with the configured files is found when the options are
built (at start-up), not at the first client's handshake.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)

from relaygw.fileio import write_atomically

__all__ = [
    "TLSSetupError",
    "ensure_self_signed",
    "server_tls_options",
    "server_tls_options_from_pem",
    "tls_session_info",
    "trust_root_from_pem",
]

_CERT_KEY = "tls.certificate"
_KEY_KEY = "tls.private_key"
_SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)


class TLSSetupError(Exception):
    """TLS cannot be configured; the message starts with the config key at fault."""


# ---------------------------------------------------------------------------
# Server contexts


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSSetupError(f"{key}: cannot read {path}: {e.strerror or e}") from e


def _load_chain(data: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSSetupError(f"{_CERT_KEY}: not a PEM certificate") from e
    if not chain:
        raise TLSSetupError(f"{_CERT_KEY}: not a PEM certificate")
    return chain


def _load_key(data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # cryptography's way of saying "this key is encrypted"
        raise TLSSetupError(f"{_KEY_KEY}: encrypted private keys are not supported") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSSetupError(f"{_KEY_KEY}: not a PEM private key") from e


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def server_tls_options(cert_path: Path, key_path: Path) -> CertificateOptions:
    """Options for STARTTLS and implicit-TLS listeners.

    ``cert_path`` holds the leaf certificate, optionally followed by intermediates, all
    of which are sent to clients. TLS 1.2 is the minimum; ciphers are Twisted's secure
    defaults, and Twisted always disables TLS compression.
    """
    return server_tls_options_from_pem(_read(cert_path, _CERT_KEY), _read(key_path, _KEY_KEY))


def server_tls_options_from_pem(chain_pem: bytes, key_pem: bytes) -> CertificateOptions:
    """``server_tls_options`` for the files' contents, read earlier (while privileged, or
    by the main process for a worker that may not read the key itself)."""
    chain = _load_chain(chain_pem)
    key = _load_key(key_pem)
    leaf, intermediates = chain[0], chain[1:]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TLSSetupError(f"{_KEY_KEY}: does not match {_CERT_KEY}")
    # cryptography objects rather than pyOpenSSL X509/PKey: Twisted hands them straight to
    # pyOpenSSL's Context, which accepts both and deprecates the pyOpenSSL types. Twisted's
    # annotations still name only the pyOpenSSL types, hence the ignores.
    options = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        extraCertChain=intermediates,  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    try:
        # Build the context now so OpenSSL's own objections surface at start-up.
        options.getContext()
    except SSL.Error as e:
        raise TLSSetupError(f"{_CERT_KEY}: rejected by OpenSSL: {e}") from e
    return options


def trust_root_from_pem(data: bytes) -> Any:
    """A CA bundle (PEM certificates) as a trust root for verifying peers; ValueError
    when it holds no certificate, so a junk file is found when it is read, not at
    every delivery as a verification failure."""
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise ValueError("no PEM certificate in it")
    return trustRootFromCertificates([
        Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certificates])


# ---------------------------------------------------------------------------
# Self-signed bootstrap


def _san(hostname: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        return x509.DNSName(hostname.encode("idna").decode("ascii"))


def _self_signed(hostname: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    # RFC 5280 caps commonName at 64 characters; the SAN is what clients check anyway.
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, hostname)] if len(hostname) <= 64 else []
    )
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate client clock skew
        .not_valid_after(now + _SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([_san(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return (cert, key) paths in ``directory``, generating a pair if either is missing.

    For running before a real certificate exists: opportunistic STARTTLS from other MTAs
    does not verify certificates, and a self-signed one still encrypts.
    """
    cert_path = directory / "selfsigned-cert.pem"
    key_path = directory / "selfsigned-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    cert_pem, key_pem = _self_signed(hostname)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Key first: a crash in between leaves no certificate, so the next start regenerates.
        write_atomically(key_path, key_pem, mode=0o600)
        write_atomically(cert_path, cert_pem, mode=0o644)
    except OSError as e:
        raise TLSSetupError(
            f"tls: cannot write a self-signed certificate to {directory}: {e.strerror or e}"
        ) from e
    return cert_path, key_path


# ---------------------------------------------------------------------------
# Session facts


def tls_session_info(transport: object) -> tuple[str, str] | None:
    """(protocol version, cipher) once a TLS handshake has completed, else None.

    In Twisted 26.10 both kinds of TLS transport expose the pyOpenSSL ``Connection``
    through ``getHandle()``: after STARTTLS, ``twisted.internet._newtls.startTLS``
    replaces the TCP transport's ``getHandle`` with the TLS layer's; with implicit TLS
    the protocol's transport is the ``TLSMemoryBIOProtocol`` itself. A plain TCP
    transport's ``getHandle()`` returns its socket instead.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
    except AttributeError:  # a TLSMemoryBIOProtocol not yet connected has no Connection
        return None
    if not isinstance(handle, SSL.Connection):
        return None
    # Both Finished messages exchanged means the handshake is complete; a negotiated
    # cipher alone is not enough, since a server picks one before the client finishes.
    if handle.get_finished() is None or handle.get_peer_finished() is None:
        return None
    cipher = handle.get_cipher_name()
    if cipher is None:
        return None
    return handle.get_protocol_version_name(), cipher
