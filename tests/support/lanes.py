"""The test suite's two lanes: `make check` runs the tests that start no whole stack, and a
test that does (uvicorn, a Celery worker or beat, `latentbank up`) must carry `stack` (or
`system`, the suites that `make test-system` runs, whole stacks all)."""

from typing import Any

_running: Any = None  # the pytest item being set up or run, None outside a test


def whole_stack(fixture_function: Any) -> Any:
    """Marks a fixture that starts a whole stack: every test using it is marked `stack`
    (tests/conftest.py), so new tests of that fixture leave the fast lane by themselves."""
    fixture_function.whole_stack = True
    return fixture_function


def uses_whole_stack(item: Any) -> bool:
    """Whether a fixture `item` uses (directly or through others) was marked `whole_stack`:
    of a name's definitions, the closest one counts, and the one it overrides only when it
    asks for it by its own name."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name, defs in info.name2fixturedefs.items():
        for definition in reversed(defs):
            if getattr(definition.func, "whole_stack", False):
                return True
            if name not in definition.argnames:
                break
    return False


def running(item: Any) -> None:
    """Called around each test (tests/conftest.py): the item whose lane is checked."""
    global _running
    _running = item


def require_stack_lane(what: str) -> None:
    """Refuse to start `what` in a test of the fast lane, so a test without the marker fails
    in `make check` instead of slowing it down; outside pytest (the benches) anything goes."""
    if _running is not None and not any(_running.get_closest_marker(lane) is not None
                                        for lane in ("stack", "system")):  # system: whole too
        raise RuntimeError(
            f"{_running.nodeid} starts {what} but is not marked `stack`: mark it with "
            "@pytest.mark.stack, or its fixture with tests.support.lanes.whole_stack")
