"""Loading the configuration for a command: the one way every subcommand does it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

from relaygw import config as configuration
from relaygw.config import CONFIG_ENV, Config, ConfigError, default_path, load


def source_line(chosen: Path | None) -> str:
    """The line that says which configuration a command chose by itself (no -c)."""
    if chosen is None:
        return (f"relaygw: no {configuration.DEFAULT_PATH} and no ${CONFIG_ENV}: using the "
                f"built-in default configuration (data in {Path.cwd() / 'relaygw-data'})")
    if os.environ.get(CONFIG_ENV):
        return f"relaygw: using {chosen} (from ${CONFIG_ENV})"
    return f"relaygw: using {chosen}"


def load_or_report(path: str | None, warnings: TextIO | None = None, *,
                   show_warnings: bool = True) -> Config | None:
    """The configuration at ``path``; without one, ``$RELAYGW_CONFIG``, else
    /etc/relaygw/relaygw.toml when it exists, else the built-in default, with one line
    on standard error saying which. Its warnings go to ``warnings`` (standard output by
    default; standard error where standard output carries JSON). None after printing
    each problem to standard error."""
    chosen: str | Path | None = path
    if path is None:
        chosen = default_path()
        print(source_line(chosen), file=sys.stderr)
    try:
        config = load(chosen)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None
    if show_warnings:
        for warning in config.warnings:
            print(f"warning: {warning}", file=warnings or sys.stdout)
    return config
