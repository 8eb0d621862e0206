"""The goals `make bench` checks, one table: each bench records its figures here
(out/bench/goals.json), and `python bench/goals.py` prints them after the run.

A goal is a figure against a target; the ratio is figure / target for "at least" goals and
target / figure for "at most" ones, so a ratio >= 1 means the goal is met.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = os.path.join(ROOT, "out", "bench", "goals.json")


def record(goal: str, figure: float, target: float, unit: str = "", at_most: bool = False,
           ) -> None:
    """Store (or replace) one goal's figure from this run."""
    os.makedirs(os.path.dirname(FILE), exist_ok=True)
    goals = _load()
    goals[goal] = {"figure": figure, "target": target, "unit": unit, "at_most": at_most}
    with open(FILE + ".tmp", "w") as f:
        json.dump(goals, f, indent=1)
    os.replace(FILE + ".tmp", FILE)


def _load() -> dict[str, dict]:
    try:
        with open(FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def main() -> int:
    goals = _load()
    if not goals:
        print("no goals recorded: run `make bench` first")
        return 1
    print("\ngoals of `make bench` (ratio >= 1: met)")
    print(f"{'goal':<64} {'figure':>12} {'target':>12} {'ratio':>7}  met")
    for name, g in goals.items():
        figure, target = g["figure"], g["target"]
        ratio = (target / figure if figure else float("inf")) if g["at_most"] else (
            figure / target)
        sign = "<=" if g["at_most"] else ">="
        print(f"{name:<64} {figure:>10.3g}{g['unit']:>2} {sign}{target:>8.3g}{g['unit']:>2} "
              f"{ratio:>7.2f}  {'yes' if ratio >= 1 else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
