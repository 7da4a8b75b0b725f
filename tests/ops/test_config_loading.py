"""Which configuration a command reads without -c: $RELAYGW_CONFIG, else
/etc/relaygw/relaygw.toml when it exists, else the built-in default; and the line on
stderr that says which."""

from __future__ import annotations

from pathlib import Path

import pytest

import relaygw.config
from relaygw.ops.config_loading import load_or_report

CONFIG = '[server]\nhostname = "relay.test"\n[[listeners]]\naddress = "127.0.0.1:2525"\n'


@pytest.fixture
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where /etc/relaygw/relaygw.toml is, for these tests; it does not exist yet."""
    path = tmp_path / "etc" / "relaygw.toml"
    path.parent.mkdir()
    monkeypatch.setattr(relaygw.config, "DEFAULT_PATH", path)
    monkeypatch.delenv("RELAYGW_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    return path


def test_the_etc_file_is_used_when_it_exists(etc: Path, capsys) -> None:
    etc.write_text(CONFIG)
    config = load_or_report(None)
    assert config is not None and config.source_path == etc
    assert capsys.readouterr().err == f"relaygw: using {etc}\n"


def test_relaygw_config_wins(etc: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    etc.write_text(CONFIG)
    mine = tmp_path / "mine.toml"
    mine.write_text(CONFIG)
    monkeypatch.setenv("RELAYGW_CONFIG", str(mine))
    config = load_or_report(None)
    assert config is not None and config.source_path == mine
    assert capsys.readouterr().err == f"relaygw: using {mine} (from $RELAYGW_CONFIG)\n"


def test_relaygw_config_naming_no_file_is_an_error(etc: Path, tmp_path: Path, monkeypatch,
                                                   capsys) -> None:
    etc.write_text(CONFIG)
    monkeypatch.setenv("RELAYGW_CONFIG", str(tmp_path / "gone.toml"))
    assert load_or_report(None) is None
    assert capsys.readouterr().err == (
        f"relaygw: using {tmp_path / 'gone.toml'} (from $RELAYGW_CONFIG)\n"
        f"{tmp_path / 'gone.toml'}: cannot read: No such file or directory\n")


def test_neither_means_the_built_in_default_and_says_so(etc: Path, tmp_path: Path,
                                                        capsys) -> None:
    config = load_or_report(None)
    assert config is not None and config.source_path is None
    assert config.server.spool_dir == tmp_path / "relaygw-data" / "spool"
    assert capsys.readouterr().err == (
        f"relaygw: no {etc} and no $RELAYGW_CONFIG: using the built-in default "
        f"configuration (data in {tmp_path / 'relaygw-data'})\n")


def test_an_explicit_file_needs_no_line(etc: Path, tmp_path: Path, capsys) -> None:
    etc.write_text(CONFIG)
    given = tmp_path / "given.toml"
    given.write_text(CONFIG)
    config = load_or_report(str(given))
    assert config is not None and config.source_path == given
    assert capsys.readouterr().err == ""
