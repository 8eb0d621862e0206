"""The house's size rule (tools/sizes.py) holds over the package code, and the checker
itself sees what it must: a long module or function without its one-line reason."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("sizes", ROOT / "tools" / "sizes.py")
sizes = importlib.util.module_from_spec(spec)
sys.modules["sizes"] = sizes  # its dataclass looks its module up there
spec.loader.exec_module(sizes)


def test_no_module_or_function_is_over_its_limit_without_a_reason():
    found = [b for path in sizes.package_modules() for b in sizes.breaches(path)]
    assert not found, "\n".join(map(str, found))


def function(name, lines, reason=None):
    above = [f"# size: {reason}"] if reason else []
    return [*above, f"def {name}():", *[f"    x{i} = {i}" for i in range(lines - 1)], ""]


def test_the_checker_sees_long_functions_and_modules_and_their_reasons(tmp_path):
    short = function("fine", 60)
    long = function("long", 61)
    kept = function("kept", 80, reason="a table of cases")
    (tmp_path / "m.py").write_text("\n".join(short + long + kept))
    found = sizes.breaches(tmp_path / "m.py", tmp_path)
    assert [(b.what, b.lines) for b in found] == [("function long", 61)]
    body = ['"""A module."""'] + [f"x{i} = {i}" for i in range(400)]
    (tmp_path / "big.py").write_text("\n".join(body))
    assert [b.what for b in sizes.breaches(tmp_path / "big.py", tmp_path)] == ["module"]
    (tmp_path / "big.py").write_text("\n".join([*body[:1], "# size: generated", *body[1:]]))
    assert sizes.breaches(tmp_path / "big.py", tmp_path) == []
