"""Installing relaygw for real makes `twistd relaygw` work from any directory.

`python -m pytest` alone proves nothing here (it puts the checkout on
sys.path), so each test builds a fresh venv, installs the checkout into it,
and asks Twisted for the plugin from a directory outside the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_plugin_is_found_after_install(tmp_path, editable):
    venv = tmp_path / "venv"
    result = run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    target = ["-e", str(ROOT)] if editable else [str(ROOT)]
    result = run(pip + target, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    result = run([str(venv / "bin" / "twistd"), "--help"], cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:1] == ["relaygw"] for line in result.stdout.splitlines()), \
        result.stdout

    probe = ("from twisted.plugin import getPlugins;"
             "from twisted.application.service import IServiceMaker;"
             "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))")
    result = run([str(venv / "bin" / "python"), "-c", probe], cwd=elsewhere, env=env)
    assert "'relaygw'" in result.stdout, result.stdout + result.stderr

    result = run([str(venv / "bin" / "twistd"), "relaygw", "--help"], cwd=elsewhere, env=env)
    assert result.returncode == 0 and "--config" in result.stdout, result.stdout + result.stderr

    result = run([str(venv / "bin" / "relaygw"), "check-config"], cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("built-in default: configuration is valid")

    # Installing never ships files that would replace Twisted's own.
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not (site / "twisted" / "plugins" / "__init__.py").read_text().count("relaygw")
    if not editable:
        assert (site / "twisted" / "plugins" / "relaygw_plugin.py").exists()
