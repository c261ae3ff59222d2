"""docs/security.md names, for every attack tried, the test that holds its answer: each named test exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "security.md").read_text()


def named_tests() -> list[tuple[str, str]]:
    """(file, test) for every `tests/...py::name` and every `::name` that continues the last named file."""
    found, current = [], ""
    for match in re.finditer(r"`(tests/[\w/]+\.py)?::(test_\w+)`", DOC):
        current = match.group(1) or current
        assert current, f"{match.group(0)} names no file"
        found.append((current, match.group(2)))
    return found


def test_every_test_the_security_page_names_exists() -> None:
    tests = named_tests()
    assert len(tests) >= 30
    missing = []
    for file, name in tests:
        tree = ast.parse((ROOT / file).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        if name not in defined:
            missing.append(f"{file}::{name}")
    assert not missing, missing


def test_the_readme_links_the_page() -> None:
    assert "(docs/security.md)" in (ROOT / "README.md").read_text()
