"""Helpers shared by the tests, the one package tests import besides the code under test;
its modules hold one idea each, and `from tests.support import X` names any of them."""

from service.cli.ports import free_port
from tests.support.cli import Up, clean_env, cli, cli_json
from tests.support.datasets import counts, stored_files, unique_name
from tests.support.environment import SYSTEM_PG, settings_of, system_pg_up
from tests.support.jobs import submit_grid, submit_train
from tests.support.lanes import whole_stack
from tests.support.probe import Probe
from tests.support.processes import (
    ApiProcess,
    Beat,
    Served,
    Worker,
    alive,
    children_of,
    terminate,
)
from tests.support.ready_models import store_untrained_model
from tests.support.waiting import wait, wait_job

__all__ = ["SYSTEM_PG", "ApiProcess", "Beat", "Probe", "Served", "Up", "Worker", "alive",
           "children_of", "clean_env", "cli", "cli_json", "counts", "free_port", "settings_of",
           "store_untrained_model", "stored_files", "submit_grid",
           "submit_train", "system_pg_up", "terminate", "unique_name", "wait", "wait_job",
           "whole_stack"]
