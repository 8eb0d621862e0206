"""The workers' one retry policy for a database outage, on a throwaway Celery app run
eagerly (`apply`: the retries run inline, their countdowns recorded, not waited)."""

import pytest
from celery import Celery
from sqlalchemy.exc import OperationalError

from store.errors import DatabaseUnavailable, PgvectorMissing
from workers.outages import SHARD_RETRIES, backoff, retried_on_outage

app = Celery("test-outages", set_as_current=False)


def outage():
    return OperationalError("SELECT 1", {}, ConnectionError("server closed the connection"))


def make_task(errors, max_retries=SHARD_RETRIES, delay=backoff):
    """A task that raises `errors` one by one, then answers; it records its tries, the
    countdowns it was retried with and what it gave up on."""
    seen = {"tries": [], "countdowns": [], "gave_up": []}

    def give_up(exc, *args):
        seen["gave_up"].append((type(exc).__name__, args))

    @app.task(bind=True, max_retries=max_retries, name=f"t{id(seen)}")
    @retried_on_outage(delay=delay, give_up=give_up)
    def task(self, job_id, owner):
        seen["tries"].append((job_id, owner))
        if errors:
            raise errors.pop(0)
        return "done"

    real_retry = task.retry

    def retry(*args, countdown=None, **kwargs):
        seen["countdowns"].append(countdown)
        return real_retry(*args, countdown=countdown, **kwargs)

    task.retry = retry
    return task, seen


def test_an_outage_is_retried_with_back_off_and_the_same_arguments():
    task, seen = make_task([outage(), DatabaseUnavailable("the database is away"), outage()])
    assert task.apply(args=[7, "o"]).get() == "done"
    assert seen["tries"] == [(7, "o")] * 4
    assert seen["countdowns"] == [1, 2, 4]
    assert seen["gave_up"] == []


def test_an_outage_past_the_retries_gives_up_with_the_outage():
    task, seen = make_task([outage() for _ in range(SHARD_RETRIES + 1)])
    result = task.apply(args=[7, "o"])
    assert isinstance(result.result, OperationalError)
    assert len(seen["tries"]) == SHARD_RETRIES + 1
    assert seen["countdowns"] == [1, 2, 4, 8, 16, 30]
    assert seen["gave_up"] == [("OperationalError", (7, "o"))]


@pytest.mark.parametrize("error", [ValueError("bad data"), PgvectorMissing("no pgvector")])
def test_any_other_error_gives_up_at_once(error):
    task, seen = make_task([error])
    result = task.apply(args=[7, "o"])
    assert result.result is error
    assert len(seen["tries"]) == 1 and seen["countdowns"] == []
    assert seen["gave_up"] == [(type(error).__name__, (7, "o"))]


def test_without_a_limit_an_outage_is_retried_until_it_ends():
    task, seen = make_task([outage() for _ in range(12)], max_retries=None,
                           delay=lambda retries: min(10, 1 + retries))
    assert task.apply(args=[7, "o"]).get() == "done"
    assert seen["countdowns"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]


def test_a_call_with_wrong_arguments_is_refused_when_sent():
    task, _ = make_task([])
    with pytest.raises(TypeError):
        task.__header__(7)  # what apply_async checks before publishing
