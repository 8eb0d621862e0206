"""What a driver or pool error means (store.db.store_error_of), which the API maps as it
maps every store error: no database needed."""

import psycopg
import pytest
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from store.db import DRIVER_ERRORS, store_error_of
from store.errors import DatabaseOutage, InvalidInput, StatementTimeout


class Cancelled(psycopg.errors.QueryCanceled):
    sqlstate = "57014"


@pytest.mark.parametrize(("error", "meaning"), [
    (OperationalError("SELECT 1", {}, ConnectionError("server closed")), DatabaseOutage),
    (PoolTimeout("QueuePool limit reached"), DatabaseOutage),
    (OperationalError("SELECT 1", {}, Cancelled("canceling statement")), StatementTimeout),
    (Cancelled("canceling statement due to statement timeout"), StatementTimeout),
    (DataError("SELECT 1", {}, ValueError("value out of range")), InvalidInput),
])
def test_a_driver_error_becomes_the_store_error_it_means(error, meaning):
    assert isinstance(error, DRIVER_ERRORS)
    found = store_error_of(error)
    assert type(found) is meaning and found.__cause__ is error


def test_an_error_of_the_statement_itself_means_nothing_to_the_store():
    assert store_error_of(IntegrityError("INSERT", {}, ValueError("duplicate key"))) is None
    assert store_error_of(ValueError("no driver here")) is None
