"""The package layout's one rule: imports run only downward.

Every import in relaygw/, at module level or inside a function, is checked
against the layer order below (docs/architecture.md explains it). A module may
import its own package and any layer below its own, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relaygw"

# Lowest first. "relaygw" is the foundation: the value types and pure functions
# every layer shares (address, envelope, results, config, routing, fileio).
LAYERS = ["relaygw", "observe", "smtp", "delivery", "queue", "receive", "daemon", "ops",
          "testing"]
# The protocol knows no configuration: of the foundation it uses only these.
SMTP_MAY_USE = {"relaygw.address", "relaygw.results", "relaygw.fileio"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return "relaygw"


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found.append((name, path))
    return found


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            # "from relaygw import wiring"-style imports name a module in the list.
            names += [f"{node.module}.{alias.name}" for alias in node.names
                      if f"{node.module}.{alias.name}" in MODULE_NAMES]
    return [n for n in names if n == "relaygw" or n.startswith("relaygw.")]


MODULES = _modules()
MODULE_NAMES = {name for name, _ in MODULES}


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_module_imports_only_its_own_layer_or_below(module: str, path: Path) -> None:
    own = LAYERS.index(_layer(module))
    upward = [name for name in _imports(path) if LAYERS.index(_layer(name)) > own]
    assert upward == []


@pytest.mark.parametrize(("module", "path"),
                         [(m, p) for m, p in MODULES if _layer(m) == "smtp"],
                         ids=[m for m, _ in MODULES if _layer(m) == "smtp"])
def test_smtp_knows_no_configuration(module: str, path: Path) -> None:
    foundation = {name for name in _imports(path) if _layer(name) == "relaygw"}
    assert foundation <= SMTP_MAY_USE


def test_every_package_is_in_the_layer_order() -> None:
    packages = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("__init__.py")
                if p.parent != PACKAGE}
    assert packages <= set(LAYERS)


def test_no_test_harness_ships_in_the_package() -> None:
    assert sorted(p.name for p in PACKAGE.glob("testing_*.py")) == []
