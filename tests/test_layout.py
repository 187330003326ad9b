"""The house: subpackages depend on each other in one direction only (the declared list below).

Two checks of the same list:

* static: every ``import`` of a ``medspan`` module anywhere in a module's source (top level or
  inside a function) is an allowed arrow, and no ``medspan`` import hides inside a function;
* dynamic: each subpackage imported alone in a fresh interpreter pulls in only the subpackages it
  may use (so no import with a side door, e.g. ``importlib``, goes the wrong way either).

Plus: every package folder of the tree is listed in ``pyproject.toml`` (the package list is explicit
because ``data_prep/`` installs as ``medspan.data_prep``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BASE = {"errors", "io"}
"""Modules every subpackage may use."""

ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "ssl": {"models"},
    "losses": {"ssl", "models"},
    "data": set(),
    "atlas": {"data"},
    "eval": {"data"},
    "inference": {"data", "eval", "models"},
    "engines": {"models", "losses", "ssl", "data", "eval", "inference"},
    "recipes": {"data", "atlas"},
    "workflows": {"models", "losses", "ssl", "data", "eval", "inference", "engines", "recipes", "atlas"},
    "data_prep": {"data", "atlas", "recipes"},
}
"""Subpackage -> the subpackages it may import (besides :data:`BASE` and itself). Nothing imports
``label`` (the MONAI Label app) or ``data_prep``; ``cli`` is the top and imports commands lazily."""


def _unit(module: str) -> str | None:
    """``medspan.data.readers`` -> ``data``; ``medspan.errors`` -> ``errors``; non-medspan -> None."""
    parts = module.split(".")
    if parts[0] != "medspan" or len(parts) < 2:
        return None
    return parts[1]


def _package_files() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for sub in ALLOWED:
        folder = ROOT / ("data_prep" if sub == "data_prep" else f"medspan/{sub}")
        out[sub] = sorted(folder.rglob("*.py"))
    return out


def _imports(path: Path, package: str) -> list[tuple[str, bool, int]]:
    """(absolute module, inside a function?, line) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_func, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this file's package
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.append((mod, in_func, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def _module_package(sub: str, path: Path) -> str:
    folder = ROOT / ("data_prep" if sub == "data_prep" else f"medspan/{sub}")
    rel = path.relative_to(folder).with_suffix("")
    parts = ["medspan", sub, *rel.parts[:-1]]
    return ".".join(parts)


def test_static_arrows_point_one_way():
    wrong, local = [], []
    for sub, files in _package_files().items():
        for f in files:
            for mod, in_func, line in _imports(f, _module_package(sub, f)):
                unit = _unit(mod)
                if unit is None:
                    continue
                if unit not in BASE | {sub} | ALLOWED[sub]:
                    wrong.append(f"{f.relative_to(ROOT)}:{line} imports {mod} ({sub} -> {unit})")
                if in_func:
                    local.append(f"{f.relative_to(ROOT)}:{line} imports {mod} inside a function")
    assert not wrong, "imports against the declared direction:\n" + "\n".join(wrong)
    assert not local, "function-local medspan imports (hide cycles; import at the top):\n" + "\n".join(local)


def test_declared_arrows_have_no_cycle():
    seen: dict[str, int] = {}

    def walk(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, f"cycle in ALLOWED: {' -> '.join(stack + (node,))}"
        for nxt in ALLOWED.get(node, ()):
            walk(nxt, stack + (node,))
        seen[node] = 1

    for sub in ALLOWED:
        walk(sub, ())


_PROBE = """
import importlib, json, pkgutil, sys
name = sys.argv[1]
pkg = importlib.import_module(name)
for m in pkgutil.walk_packages(pkg.__path__, name + "."):
    if not m.name.rsplit(".", 1)[-1].startswith("__"):
        importlib.import_module(m.name)
print(json.dumps(sorted({k.split(".")[1] for k in sys.modules if k.startswith("medspan.")})))
"""


@pytest.mark.timeout(300)
def test_each_subpackage_alone_pulls_only_allowed_ones():
    def probe(sub: str) -> tuple[str, list[str]]:
        res = subprocess.run([sys.executable, "-c", _PROBE, f"medspan.{sub}"], capture_output=True, text=True,
                             cwd=ROOT / "tests")  # not the repo root: data_prep must come from the install
        assert res.returncode == 0, f"importing medspan.{sub} alone failed:\n{res.stderr[-2000:]}"
        return sub, json.loads(res.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(probe, ALLOWED))
    wrong = {sub: sorted(set(units) - BASE - {sub} - ALLOWED[sub]) for sub, units in results.items()}
    assert not {k: v for k, v in wrong.items() if v}, f"subpackages pulled in against the declared direction: {wrong}"


def test_every_package_folder_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "medspan").rglob("__init__.py")}
    found |= {"medspan.data_prep"} if (ROOT / "data_prep/__init__.py").exists() else set()
    assert found == listed, f"pyproject.toml packages differ from the tree: missing {found - listed}, stale {listed - found}"
