"""The layering the README's project layout promises: `runtime/` under both `tracing/` and `chat/`,
and the techniques in `tracing/` never reaching up into `chat/` or the app."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the top-level packages of this repository it must not import
FORBIDDEN = {"runtime": {"chat", "tracing.api", "ui", "demo"}, "tracing": {"chat", "ui", "demo"}, "chat": {"ui", "demo"}}


def imported(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (functions too), as written."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package):
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not found, found
    assert list((ROOT / package).rglob("*.py"))  # the package is there: the check looked at something
