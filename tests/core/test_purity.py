"""syncengine.core performs no I/O and reads no clock: the sans-I/O rule, enforced."""

from __future__ import annotations

import ast
from pathlib import Path

import syncengine.core

FORBIDDEN = {
    "asyncio",
    "sqlite3",
    "socket",
    "time",
    "random",
    "uuid",
    "os",
    "threading",
    "subprocess",
    "secrets",
    "datetime",
    "websockets",
    "httpx",
    "select",
    "selectors",
    "shutil",
    "pathlib",
    "io",
}

CORE = Path(syncengine.core.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in {"__import__", "open"}:
            found.add(f"<call {getattr(node.func, 'id', '')}>")
    return found


def test_core_imports_nothing_that_does_io() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert len(files) >= 8
    offenders = {
        str(path.relative_to(CORE)): sorted(bad)
        for path in files
        if (
            bad := imported_modules(path) & FORBIDDEN
            | {m for m in imported_modules(path) if m.startswith("<call")}
        )
    }
    assert offenders == {}


def test_the_checker_would_catch_an_offender(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom time import monotonic\nopen('x')\n")
    assert {"os", "time", "<call open>"} <= imported_modules(bad)
