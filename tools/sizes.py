"""The house's size rule: package modules of at most 400 lines and functions of at most 60,
or a one-line reason where one must be longer (`# size: why` among a module's first ten
lines, or on the line above a function's `def`, its `def` line or the line after its
signature).

    python tools/sizes.py          # lists what breaks the rule; exit 1 if anything does
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "store", "ingest", "bridges", "workers", "service", "clients/python/src")
MODULE_LINES, FUNCTION_LINES = 400, 60
MARK = "# size:"


@dataclass(frozen=True)
class Breach:
    path: str
    line: int
    what: str
    lines: int
    limit: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} has {self.lines} lines (limit {self.limit})"


def package_modules(root: Path = ROOT) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (root / package).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _reasoned(lines: list[str], first: int, last: int) -> bool:
    return any(MARK in lines[i] for i in range(max(0, first), min(len(lines), last + 1)))


def breaches(path: Path, root: Path = ROOT) -> list[Breach]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    name = str(path.relative_to(root))
    found = []
    if len(lines) > MODULE_LINES and not _reasoned(lines, 0, 9):
        found.append(Breach(name, 1, "module", len(lines), MODULE_LINES))
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        length = (node.end_lineno or node.lineno) - start + 1
        body = node.body[0].lineno - 1  # the line before the body: the signature's end
        if length > FUNCTION_LINES and not _reasoned(lines, node.lineno - 2, body):
            found.append(Breach(name, node.lineno, f"function {node.name}", length,
                                FUNCTION_LINES))
    return found


def main() -> int:
    found = [b for path in package_modules() for b in breaches(path)]
    for breach in found:
        print(breach)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
