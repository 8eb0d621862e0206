"""Units of the client verbs: flags to request bodies, and how `watch` renders a job.
The client is a fake here; tests/cli/test_stack.py runs the same verbs against a real stack."""

import json
import types

import pytest
from typer.testing import CliRunner

from service.cli import output
from service.cli.client import ClientError
from service.cli.main import app


class FakeClient:
    def __init__(self, events=(), answers=None):
        self.posted = []
        self._events = list(events)
        self.answers = answers or {}

    def __enter__(self):
        return self

    def __exit__(self, *_):
        pass

    def post(self, path, json=None, **_):
        self.posted.append((path, json))
        if path == "/v1/sweeps":
            jobs = [job(i + 1, "queued", 0.0) for i in range(2)]
            return {"sweep_id": "s1", "jobs": jobs}
        return job(1, "queued", 0.0)

    def get(self, path, **_):
        if path in self.answers:
            return self.answers[path]
        raise ClientError(f"404 Not Found: {path}")

    def events(self, job_id):
        yield from self._events


def job(job_id, status, progress, message=None, eta=None, error=None):
    return {"id": job_id, "kind": "train", "status": status, "progress": progress,
            "progress_message": message, "eta_seconds": eta, "error": error, "model_id": 7,
            "embedding_set_id": None, "created_at": "2026-11-24T00:00:00", "params": {}}


@pytest.fixture
def fake(monkeypatch):
    holder = types.SimpleNamespace(client=FakeClient())
    monkeypatch.setattr(output, "Client", lambda: holder.client)
    return holder


runner = CliRunner()


def test_flags_override_the_config_file_and_set_reaches_any_field(fake, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({
        "dataset_id": 3, "model": {"latent_dim": 16, "likelihood": "gaussian"},
        "training": {"epochs": 50, "lr": 0.1}}))
    out = runner.invoke(app, ["train", "--config", str(tmp_path / "c.json"), "--latent-dim",
                              "4", "--hidden", "32,16", "--lr", "0.002", "--set",
                              "model.free_bits=0.25", "--set", "training.grad_clip=null",
                              "--json"])
    assert out.exit_code == 0, out.output
    (path, body), = fake.client.posted
    assert path == "/v1/training-jobs"
    assert body == {"dataset_id": 3,
                    "model": {"latent_dim": 4, "likelihood": "gaussian", "hidden": [32, 16],
                              "free_bits": 0.25},
                    "training": {"epochs": 50, "lr": 0.002, "grad_clip": None}}


def test_likelihood_flags_become_the_model_fields(fake):
    out = runner.invoke(app, ["train", "--dataset", "2", "--binarize", "dynamic", "--json"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["train", "--dataset", "2", "--likelihood", "gaussian",
                              "--dequantize", "256", "--json"])
    assert out.exit_code == 0, out.output
    (_, first), (_, second) = fake.client.posted
    assert first["model"] == {"binarize": "dynamic"}
    assert second["model"] == {"likelihood": "gaussian", "dequantize": "uniform",
                               "levels": 256}


def test_sweep_axes_join_the_config_grid(fake, tmp_path):
    (tmp_path / "c.yaml").write_text("model: {latent_dim: 2}\ntraining: {lr: 3e-4}\n"
                                     "grid: {model.beta: [1, 4]}\n")
    out = runner.invoke(app, ["train", "--dataset", "1", "--config", str(tmp_path / "c.yaml"),
                              "--sweep", "model.latent_dim=2,8", "--sweep",
                              "training.lr=1e-3,3e-3", "--json"])
    assert out.exit_code == 0, out.output
    (path, body), = fake.client.posted
    assert path == "/v1/sweeps"
    assert body["grid"] == {"model.beta": [1, 4], "model.latent_dim": [2, 8],
                            "training.lr": [0.001, 0.003]}
    assert body["training"] == {"lr": 0.0003}  # YAML 1.1 alone would read "3e-4"


@pytest.mark.parametrize(("content", "reason"), [
    ("[1, 2]", "expected a mapping"),
    ("model: {a: 1}\noptimizer: sgd\n", "expected a mapping"),
    ("model: [unclosed", "not JSON or YAML"),
])
def test_a_bad_config_file_is_named(fake, tmp_path, content, reason):
    (tmp_path / "c.yaml").write_text(content)
    out = runner.invoke(app, ["train", "--dataset", "1", "--config", str(tmp_path / "c.yaml")])
    assert out.exit_code == 2 and reason in out.output and fake.client.posted == []


def test_watch_in_a_pipe_prints_one_line_per_change_and_the_outcome(fake):
    fake.client = FakeClient([
        job(5, "queued", 0.0), job(5, "running", 0.3, "epoch 3/10 · val ELBO -30.10", 75.0),
        job(5, "succeeded", 1.0, "model ready")])
    out = runner.invoke(app, ["jobs", "watch", "5"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines[1] == "job 5 running  30.0% epoch 3/10 · val ELBO -30.10 ETA 1:15"
    assert lines[-1] == "job 5 succeeded: model 7"


def test_watch_of_a_failed_job_exits_1_with_its_error(fake):
    fake.client = FakeClient([job(5, "running", 0.5),
                              job(5, "failed", 0.5, error="training diverged")])
    out = runner.invoke(app, ["jobs", "watch", "5"])
    assert out.exit_code == 1
    assert out.output.strip().splitlines()[-1] == "error: job 5 failed: training diverged"


def test_watch_json_is_one_job_per_line(fake):
    states = [job(5, "running", 0.5), job(5, "cancelled", 0.5)]
    fake.client = FakeClient(states)
    out = runner.invoke(app, ["jobs", "watch", "5", "--json"])
    assert out.exit_code == 1
    assert [json.loads(line) for line in out.stdout.splitlines()] == states


def test_an_api_refusal_is_one_line_and_exit_1(fake):
    out = runner.invoke(app, ["models", "show", "9"])
    assert out.exit_code == 1
    assert out.output.strip() == "error: 404 Not Found: /v1/models/9"


def test_training_progress_carries_the_last_validation_figures(monkeypatch):
    from models.trainer import Progress
    from workers import training

    reports = []
    lease = types.SimpleNamespace(owner="w", report=lambda *a: reports.append(a),
                                  confirm=lambda: None, check=lambda: None, lease_seconds=60)
    artifacts = types.SimpleNamespace(put_file=lambda *a: None, uri=lambda key: key)
    ctx = types.SimpleNamespace(db=None, artifacts=artifacts)
    monkeypatch.setattr(training, "record_epochs", lambda *a: None)
    cb = training.JobCallback(ctx, lease, 1, 2, 1, "/nowhere")
    trainer = types.SimpleNamespace(epoch=3, config=types.SimpleNamespace(epochs=10),
                                    model_config=types.SimpleNamespace(latent_dim=8))
    progress = Progress(fraction=0.35, epoch=4, epochs=10, step=35, total_steps=100,
                        eta_seconds=12.0, message="training")
    cb.on_progress(trainer, progress)
    cb.on_epoch_end(trainer, [{"split": "train", "elbo": -40.0, "log_px": None},
                              {"split": "val", "elbo": -31.234, "log_px": -30.5,
                               "log_px_se": 0.123, "active_units": 5}])
    cb.on_progress(trainer, progress)
    assert reports[0] == (0.9 * 0.35, "epoch 4/10", 12.0)
    assert reports[-1] == (0.9 * 0.35, "epoch 4/10 · val ELBO -31.23 · log p(x) -30.50 "
                                        "± 0.12 (epoch 3)", 12.0)
    # most dimensions collapsed: the message warns and names the knobs
    cb.on_epoch_end(trainer, [{"split": "val", "elbo": -35.0, "log_px": None,
                               "active_units": 2}])
    cb.on_progress(trainer, progress)
    assert reports[-1][1].startswith("epoch 4/10 · val ELBO -35.00 (epoch 3); warning: 6 of "
                                     "8 latent dimensions collapsed")
    assert "kl_warmup_epochs" in reports[-1][1] and "free_bits" in reports[-1][1]


@pytest.fixture
def no_client_env(monkeypatch):
    for name in ("LATENTBANK_URL", "LATENTBANK_API_KEY", "LATENTBANK_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def fake_stack(data_dir, url, pid=None, lock=True):
    """What a running `latentbank up` leaves in its folder: stack.json (0600), admin.key,
    and the folder's lock, held (here by this test's process, as `up` holds it)."""
    import fcntl
    import os

    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "admin.key").write_text("lb_saved\n")
    (data_dir / "stack.json").write_text(json.dumps({"url": url, "pid": pid or os.getpid()}))
    (data_dir / "stack.json").chmod(0o600)
    held = open(data_dir / "up.lock", "a+")  # noqa: SIM115 (closed by the caller)
    if lock:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return held


def test_the_saved_admin_key_goes_only_to_the_local_stack(tmp_path, monkeypatch,
                                                          no_client_env):
    from service.cli.client import resolve

    held = fake_stack(tmp_path, "http://127.0.0.1:8123")
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(tmp_path))
    try:
        assert resolve() == ("http://127.0.0.1:8123", "lb_saved")
        assert resolve("http://127.0.0.1:8123/") == ("http://127.0.0.1:8123", "lb_saved")
        assert resolve("https://prod.example") == ("https://prod.example", None)
        monkeypatch.setenv("LATENTBANK_API_KEY", "lb_mine")  # the user's, to their stack
        assert resolve() == ("http://127.0.0.1:8123", "lb_mine")
        monkeypatch.setenv("LATENTBANK_URL", "https://prod.example")
        monkeypatch.setenv("LATENTBANK_API_KEY", "lb_prod")
        assert resolve() == ("https://prod.example", "lb_prod")
    finally:
        held.close()


def test_a_stack_json_planted_in_the_working_folder_gets_no_key(tmp_path, monkeypatch,
                                                                no_client_env):
    """A `.latentbank/stack.json` in whatever folder the CLI runs from (a cloned repository,
    a shared folder) naming another server, with a live pid (this very process): without
    this user's `up` holding that folder's lock it is no stack, and LATENTBANK_API_KEY goes
    nowhere but to a URL the user gives."""
    from service.cli.client import Client, resolve
    from service.cli.stack import read_stack

    held = fake_stack(tmp_path / ".latentbank", "https://evil.example", lock=False)
    held.close()
    monkeypatch.chdir(tmp_path)  # the default data folder is ./.latentbank
    monkeypatch.setenv("LATENTBANK_API_KEY", "lb_mine")
    assert read_stack(tmp_path / ".latentbank") is None
    assert resolve() == ("http://127.0.0.1:8000", None)
    with Client() as c:
        assert c.withheld and "Authorization" not in c.http.headers
    monkeypatch.setenv("LATENTBANK_URL", "https://mine.example")
    assert resolve() == ("https://mine.example", "lb_mine")


def test_a_stack_json_counts_only_when_this_users_up_holds_its_folders_lock(
        tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from service.cli import stack

    data_dir = tmp_path / "data"
    held = fake_stack(data_dir, "http://127.0.0.1:8123")
    try:
        assert read_url(stack, data_dir) == "http://127.0.0.1:8123"
        for path, mode in ((data_dir / "stack.json", 0o620), (data_dir / "stack.json", 0o602),
                           (data_dir, 0o770), (data_dir, 0o757)):
            before = path.stat().st_mode
            path.chmod(mode)  # another user could have written it
            assert read_url(stack, data_dir) is None, (path.name, oct(mode))
            path.chmod(before)
        assert read_url(stack, data_dir) == "http://127.0.0.1:8123"
        # files and a process of another user (this one seen as someone else)
        uid = os.getuid()
        monkeypatch.setattr(stack.os, "getuid", lambda: uid + 1)
        assert read_url(stack, data_dir) is None
        monkeypatch.undo()
        # a live process of this user that does not hold the lock (a reused pid)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            info = json.loads((data_dir / "stack.json").read_text())
            (data_dir / "stack.json").write_text(json.dumps({**info, "pid": other.pid}))
            assert read_url(stack, data_dir) is None
        finally:
            other.kill()
            other.wait()
    finally:
        held.close()
    (data_dir / "stack.json").write_text(json.dumps({"url": "http://x", "pid": os.getpid()}))
    assert read_url(stack, data_dir) is None  # the lock is no longer held


def read_url(stack, data_dir):
    info = stack.read_stack(data_dir)
    return info["url"] if info else None


def test_a_withheld_key_is_named_in_the_401(tmp_path, monkeypatch, no_client_env):
    import httpx

    from service.cli.client import Client

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATENTBANK_API_KEY", "lb_mine")
    with Client() as c:
        c.http = httpx.Client(base_url=c.url, transport=httpx.MockTransport(
            lambda r: httpx.Response(401, json={"error": {"message": "missing API key"}})))
        with pytest.raises(ClientError) as raised:
            c.get("/v1/models")
    assert "set LATENTBANK_URL=http://127.0.0.1:8000" in str(raised.value)
    assert "lb_mine" not in str(raised.value)


def test_up_prints_the_admin_key_to_a_terminal_only(tmp_path, monkeypatch):
    """Where `latentbank up`'s output goes to a file (`make demo`'s stack.log, a service
    manager's journal) the key is not in it: only where it is saved (mode 0600)."""
    from service.cli import stack
    from store.settings import Settings

    def start(self):
        self.url, self.admin_key = "http://127.0.0.1:8123", "lb_the-admin-key"

    monkeypatch.setattr(stack.Stack, "start", start)
    monkeypatch.setattr(stack.Stack, "wait", lambda self: 0)
    monkeypatch.setattr(stack.Stack, "stop", lambda self: None)
    for show_key, shown in ((None, False), (False, False), (True, True)):
        said: list[str] = []
        assert stack.run_up(Settings(data_dir=tmp_path), 8123, 1.0, said.append,
                            show_key=show_key) == 0
        text = "\n".join(said)
        assert ("lb_the-admin-key" in text) is shown, text  # pytest's stdout: no terminal
        assert f"saved in {tmp_path.resolve() / 'admin.key'} (mode 0600)" in text
