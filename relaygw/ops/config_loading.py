"""Loading the configuration for a command: the one way every subcommand does it."""

from __future__ import annotations

import sys
from typing import TextIO

from relaygw.config import Config, ConfigError, load


def load_or_report(path: str | None, warnings: TextIO | None = None) -> Config | None:
    """The configuration at ``path`` (None: the built-in default), its warnings
    printed to ``warnings`` (standard output by default; standard error where standard
    output carries JSON); None after printing each problem to standard error."""
    try:
        config = load(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None
    for warning in config.warnings:
        print(f"warning: {warning}", file=warnings or sys.stdout)
    return config
