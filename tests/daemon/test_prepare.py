"""wiring.prepare: every file a configuration names, read and checked at once, for
check-config, start-up and reload alike; and the FileReader a reload after the
privilege drop reads them through."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from relaygw.config import Config, load_config
from relaygw.daemon.wiring import FileReader, StartupError, prepare


def write(tmp_path: Path, body: str, tls: str = "starttls") -> Config:
    path = tmp_path / "relaygw.toml"
    path.write_text('[server]\nhostname = "relay.test"\nspool_dir = "spool"\n'
                    f'[[listeners]]\naddress = "127.0.0.1:0"\ntls = "{tls}"\n{body}')
    return load_config(path)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    leaf = trustme.CA().issue_cert("relay.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def test_every_problem_is_reported_at_once_each_naming_its_key(tmp_path, pair):
    cert, _ = pair
    (tmp_path / "empty.secret").write_text("\n")
    config = write(tmp_path, f'[tls]\ncertificate = "{cert}"\nprivate_key = "nokey.pem"\n'
                   '[auth]\nusers_file = "users"\n'
                   '[smarthosts.a]\nhosts = ["192.0.2.1"]\nusername = "u"\n'
                   'password_file = "a.secret"\n'
                   '[smarthosts.b]\nhosts = ["192.0.2.2"]\nusername = "u"\n'
                   'password_file = "empty.secret"\n')
    with pytest.raises(StartupError) as info:
        prepare(config, announce=False)
    assert str(info.value).splitlines() == [
        f"tls.private_key: cannot read {tmp_path / 'nokey.pem'}: No such file or directory",
        f"auth.users_file: cannot read {tmp_path / 'users'}: No such file or directory",
        f"smarthosts.a.password_file: cannot read {tmp_path / 'a.secret'}: "
        "No such file or directory",
        f"smarthosts.b.password_file: {tmp_path / 'empty.secret'} is empty",
    ]


def test_a_configured_pair_is_checked_even_without_a_tls_listener(tmp_path, pair):
    cert, _ = pair
    other = trustme.CA().issue_cert("other.test")
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    config = write(tmp_path, f'[tls]\ncertificate = "{cert}"\nprivate_key = "other-key.pem"\n',
                   tls="none")
    with pytest.raises(StartupError, match=r"^tls.private_key: does not match tls.certificate$"):
        prepare(config, announce=False)


def test_what_is_read_is_what_serves(tmp_path, pair):
    cert, key = pair
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "a.secret").write_text("s3cret\r\n")
    config = write(tmp_path, f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n'
                   '[smarthosts.a]\nhosts = ["192.0.2.1"]\nusername = "u"\n'
                   'password_file = "a.secret"\nca_file = "ca.pem"\n')
    prepared = prepare(config, announce=False)
    assert prepared.tls is not None
    assert prepared.tls_pem == (cert.read_bytes(), key.read_bytes())  # for the workers
    assert dict(prepared.delivery.passwords) == {tmp_path / "a.secret": "s3cret"}
    assert list(prepared.delivery.trust_roots) == [tmp_path / "ca.pem"]
    assert prepared.users is None


def test_checking_makes_no_self_signed_certificate_and_starting_does(tmp_path):
    config = write(tmp_path, "")
    checked = prepare(config, announce=False, create=False)
    assert (checked.tls, checked.tls_pem) == (None, None)
    assert not (tmp_path / "spool").exists()
    started = prepare(config, announce=False)
    assert started.tls is not None and started.tls_pem is not None
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    assert prepare(config, announce=False, create=False).tls_pem == started.tls_pem


def test_a_file_unreadable_after_the_drop_is_reused_only_while_unchanged(tmp_path, monkeypatch):
    secret = tmp_path / "key.pem"
    secret.write_bytes(b"root's alone")
    files = FileReader()
    assert files.read(secret) == b"root's alone"  # at start-up, privileged
    real = Path.read_bytes

    def denied(path: Path) -> bytes:
        if path == secret:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", denied)  # after the drop
    assert files.read(secret) == b"root's alone"  # unchanged: from memory
    secret.write_bytes(b"a new key")
    with pytest.raises(PermissionError):
        files.read(secret)  # changed: it must be read, and cannot be
    with pytest.raises(PermissionError):
        FileReader().read(secret)  # never read: nothing to reuse
