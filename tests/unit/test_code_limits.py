"""The package stays readable in pieces: no module of ``workbench/`` over 400 lines, no function
(or method) over 80 lines, counted from its ``def`` line to its last line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "workbench"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_modules_to_check():
    assert len(modules()) > 100 and (PACKAGE / "__init__.py") in modules()


def test_no_module_over_400_lines():
    too_long = {}
    for path in modules():
        name = path.relative_to(PACKAGE).as_posix()
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            too_long[name] = lines
    assert too_long == {}, f"modules over {MAX_MODULE_LINES} lines: split them by job"


def test_no_function_over_80_lines():
    too_long = {}
    for path in modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    where = f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} {node.name}"
                    too_long[where] = lines
    assert too_long == {}, f"functions over {MAX_FUNCTION_LINES} lines: cut them into steps"
