"""Where the client sends requests and which key goes there (as the CLI decides)."""

import fcntl
import json
import os

import pytest
from latentbank_client import Client
from latentbank_client.config import DEFAULT_URL, read_stack, resolve


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for name in ("LATENTBANK_URL", "LATENTBANK_API_KEY", "LATENTBANK_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./.latentbank of the developer's
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def stack(tmp_path, monkeypatch):
    """A data folder as `latentbank up` leaves it while running: a private stack.json
    naming a process (this one) that holds the folder's up.lock."""
    folder = tmp_path / "data"
    folder.mkdir(mode=0o700)
    (folder / "stack.json").write_text(json.dumps({"url": "http://127.0.0.1:8123/",
                                                   "pid": os.getpid()}))
    (folder / "stack.json").chmod(0o600)
    (folder / "admin.key").write_text("lb_admin_secret\n")
    lock = open(folder / "up.lock", "w")  # noqa: SIM115
    fcntl.flock(lock, fcntl.LOCK_EX)
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(folder))
    yield folder
    lock.close()


def test_arguments_first():
    resolved = resolve("http://example.test:9000/", "lb_mine")
    assert (resolved.url, resolved.key) == ("http://example.test:9000", "lb_mine")


def test_environment(monkeypatch):
    monkeypatch.setenv("LATENTBANK_URL", "http://env.test")
    monkeypatch.setenv("LATENTBANK_API_KEY", "lb_env")
    assert resolve() == resolve(None, None)
    assert (resolve().url, resolve().key) == ("http://env.test", "lb_env")
    assert resolve("http://arg.test").url == "http://arg.test"


def test_nothing_running_means_the_default_url_without_a_key(monkeypatch):
    assert (resolve().url, resolve().key, resolve().withheld) == (DEFAULT_URL, None, False)
    monkeypatch.setenv("LATENTBANK_API_KEY", "lb_env")
    withheld = resolve()
    assert (withheld.url, withheld.key, withheld.withheld) == (DEFAULT_URL, None, True)


def test_the_running_stack_and_its_admin_key(stack):
    resolved = resolve()
    assert (resolved.url, resolved.key) == ("http://127.0.0.1:8123", "lb_admin_secret")
    with Client() as c:
        assert (c.url, c.key) == ("http://127.0.0.1:8123", "lb_admin_secret")


def test_the_admin_key_goes_only_to_the_stacks_own_url(stack, monkeypatch):
    assert resolve("http://127.0.0.1:8123").key == "lb_admin_secret"
    assert resolve("http://elsewhere.test").key is None
    monkeypatch.setenv("LATENTBANK_API_KEY", "lb_user")
    assert resolve().key == "lb_user"  # the user's key wins on the stack's URL


def test_a_stack_json_without_its_lock_is_not_trusted(stack):
    os.unlink(stack / "up.lock")  # the lock this process holds is now on another inode
    (stack / "up.lock").write_text("")
    assert read_stack(stack) is None
    assert resolve().url == DEFAULT_URL


def test_a_writable_stack_json_is_not_trusted(stack):
    (stack / "stack.json").chmod(0o622)
    assert read_stack(stack) is None
    (stack / "stack.json").chmod(0o600)
    stack.chmod(0o777)
    assert read_stack(stack) is None
    stack.chmod(0o700)
    assert read_stack(stack)["pid"] == os.getpid()


def test_a_malformed_stack_json_is_ignored(stack):
    (stack / "stack.json").write_text("{not json")
    assert resolve().url == DEFAULT_URL
    (stack / "stack.json").write_text(json.dumps({"url": "http://x", "pid": "1"}))
    assert resolve().url == DEFAULT_URL


def test_one_data_folder_the_stack_commands_mean_too(tmp_path, stack, monkeypatch):
    """LATENTBANK_DATA_DIR, else ./.latentbank, as `up` and `status` (store.settings):
    a stack run from ~/.latentbank is not this folder's, so no verb goes there while
    `status` says no stack runs here; and the home folder is never looked up (it may not
    exist: HOME unset, a uid without a passwd entry)."""
    from pathlib import Path

    from store.settings import Settings

    monkeypatch.delenv("LATENTBANK_DATA_DIR")
    home = tmp_path / "home"
    home.mkdir()
    stack.rename(home / ".latentbank")
    monkeypatch.delenv("HOME")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert resolve().url == DEFAULT_URL
    monkeypatch.chdir(home)  # ./.latentbank is now that folder
    assert resolve().url == "http://127.0.0.1:8123"
    assert Settings().data_dir.resolve() == (home / ".latentbank").resolve()
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(tmp_path / "elsewhere"))
    assert resolve().url == DEFAULT_URL
    assert Settings().data_dir == tmp_path / "elsewhere"
