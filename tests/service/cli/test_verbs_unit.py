"""Units of the client verbs: flags to request bodies, how `watch` renders a job, errors
to exit statuses, and which key goes where. The verbs run on a real latentbank_client
Client whose transport is an httpx.MockTransport playing the API; tests/service/cli/
test_stack.py runs the same verbs against a real stack."""

import functools
import json
import types

import httpx
import latentbank_client
import latentbank_client.client as client_module
import pytest
from latentbank_client import config
from typer.testing import CliRunner

from service.cli.main import app
from service.cli.ports import free_port

URL = "http://api.test"


def job(job_id, status, progress, message=None, eta=None, error=None):
    return {"id": job_id, "kind": "train", "status": status, "progress": progress,
            "progress_message": message, "eta_seconds": eta, "error": error, "model_id": 7,
            "embedding_set_id": None, "created_at": "2026-11-24T00:00:00", "params": {}}


class FakeApi:
    """The API as a MockTransport: submissions answer queued jobs (a sweep two), job 5
    answers `states[0]` and streams `states` as server-sent events; anything else is a
    404 in the API's error shape; embedding set 4 has 2 dimensions. `answers` replays
    status codes for POSTs first."""

    def __init__(self, states=(), answers=()):
        self.states = list(states)
        self.answers = list(answers)
        self.requests = []

    def posted(self):
        return [(r.url.path, json.loads(r.content)) for r in self.requests
                if r.method == "POST"]

    def __call__(self, request):
        self.requests.append(request)
        path = request.url.path
        if request.method == "POST" and self.answers:
            status, headers = self.answers.pop(0)
            return httpx.Response(status, headers=headers, json={"error": {
                "code": "unavailable", "message": "the broker is unavailable"}})
        if request.method == "POST" and path == "/v1/sweeps":
            return httpx.Response(202, json={"sweep_id": "s1", "jobs": [
                {**job(i + 1, "queued", 0.0), "sweep_id": "s1"} for i in range(2)]})
        if request.method == "POST" and path == "/v1/training-jobs":
            return httpx.Response(202, json=job(1, "queued", 0.0))
        if path == "/v1/embeddings/4":
            return httpx.Response(200, json={"id": 4, "dim": 2, "status": "ready"})
        if path == "/v1/jobs/5" and self.states:
            return httpx.Response(200, json=self.states[0])
        if path == "/v1/jobs/5/events" and self.states:
            body = "".join(f"event: {'end' if i == len(self.states) - 1 else 'job'}\n"
                           f"data: {json.dumps(s)}\n\n" for i, s in enumerate(self.states))
            return httpx.Response(200, text=body,
                                  headers={"content-type": "text/event-stream"})
        what = path.rsplit("/", 2)
        return httpx.Response(404, json={"error": {
            "code": "not_found", "message": f"{what[-2].rstrip('s')} {what[-1]} does not "
                                            "exist"}})


@pytest.fixture
def no_client_env(monkeypatch, tmp_path):
    for name in ("LATENTBANK_URL", "LATENTBANK_API_KEY", "LATENTBANK_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.latentbank of the developer


@pytest.fixture
def slept(monkeypatch):
    waits = []
    monkeypatch.setattr(client_module, "sleep", waits.append)
    return waits


@pytest.fixture
def api(monkeypatch, no_client_env, slept):
    """The verbs' Client (its URL and key resolved as the CLI's: here LATENTBANK_URL and
    LATENTBANK_API_KEY) over a FakeApi."""
    fake = FakeApi()
    monkeypatch.setenv("LATENTBANK_URL", URL)
    monkeypatch.setenv("LATENTBANK_API_KEY", "lb_k")
    monkeypatch.setattr(latentbank_client, "Client", functools.partial(
        latentbank_client.Client, transport=httpx.MockTransport(fake)))
    return fake


runner = CliRunner()


def test_flags_override_the_config_file_and_set_reaches_any_field(api, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({
        "dataset_id": 3, "model": {"latent_dim": 16, "likelihood": "gaussian"},
        "training": {"epochs": 50, "lr": 0.1}}))
    out = runner.invoke(app, ["train", "--config", str(tmp_path / "c.json"), "--latent-dim",
                              "4", "--hidden", "32,16", "--lr", "0.002", "--set",
                              "model.free_bits=0.25", "--set", "training.grad_clip=null",
                              "--json"])
    assert out.exit_code == 0, out.output
    (path, body), = api.posted()
    assert path == "/v1/training-jobs"
    assert body == {"dataset_id": 3,
                    "model": {"latent_dim": 4, "likelihood": "gaussian", "hidden": [32, 16],
                              "free_bits": 0.25},
                    "training": {"epochs": 50, "lr": 0.002, "grad_clip": None}}
    assert json.loads(out.stdout) == job(1, "queued", 0.0)  # the API's answer, as it came
    assert api.requests[0].headers["authorization"] == "Bearer lb_k"


def test_likelihood_flags_become_the_model_fields(api):
    out = runner.invoke(app, ["train", "--dataset", "2", "--binarize", "dynamic", "--json"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["train", "--dataset", "2", "--likelihood", "gaussian",
                              "--dequantize", "256", "--json"])
    assert out.exit_code == 0, out.output
    (_, first), (_, second) = api.posted()
    assert first["model"] == {"binarize": "dynamic"}
    assert second["model"] == {"likelihood": "gaussian", "dequantize": "uniform",
                               "levels": 256}


def test_sweep_axes_join_the_config_grid(api, tmp_path):
    (tmp_path / "c.yaml").write_text("model: {latent_dim: 2}\ntraining: {lr: 3e-4}\n"
                                     "grid: {model.beta: [1, 4]}\n")
    out = runner.invoke(app, ["train", "--dataset", "1", "--config", str(tmp_path / "c.yaml"),
                              "--sweep", "model.latent_dim=2,8", "--sweep",
                              "training.lr=1e-3,3e-3", "--json"])
    assert out.exit_code == 0, out.output
    (path, body), = api.posted()
    assert path == "/v1/sweeps"
    assert body["grid"] == {"model.beta": [1, 4], "model.latent_dim": [2, 8],
                            "training.lr": [0.001, 0.003]}
    assert body["training"] == {"lr": 0.0003}  # YAML 1.1 alone would read "3e-4"
    answer = json.loads(out.stdout)  # the API's SweepOut
    assert answer["sweep_id"] == "s1" and [j["id"] for j in answer["jobs"]] == [1, 2]


def test_a_retried_submission_makes_one_job(api, slept):
    """A 503 with Retry-After: the client waits as told and sends the same submission
    again with the same Idempotency-Key, so the server can never make two jobs."""
    api.answers = [(503, {"Retry-After": "2"})]
    out = runner.invoke(app, ["train", "--dataset", "2", "--json"])
    assert out.exit_code == 0, out.output
    posts = [r for r in api.requests if r.method == "POST"]
    assert len(posts) == 2 and slept == [2.0]
    keys = {r.headers["idempotency-key"] for r in posts}
    assert len(keys) == 1 and len(keys.pop()) == 36  # one uuid4, sent both times


@pytest.mark.parametrize(("content", "reason"), [
    ("[1, 2]", "expected a mapping"),
    ("model: {a: 1}\noptimizer: sgd\n", "expected a mapping"),
    ("model: [unclosed", "not JSON or YAML"),
])
def test_a_bad_config_file_is_named(api, tmp_path, content, reason):
    (tmp_path / "c.yaml").write_text(content)
    out = runner.invoke(app, ["train", "--dataset", "1", "--config", str(tmp_path / "c.yaml")])
    assert out.exit_code == 2 and reason in out.output and api.requests == []


def test_watch_in_a_pipe_prints_one_line_per_change_and_the_outcome(api):
    api.states = [job(5, "queued", 0.0),
                  job(5, "running", 0.3, "epoch 3/10 · val ELBO -30.10", 75.0),
                  job(5, "succeeded", 1.0, "model ready")]
    out = runner.invoke(app, ["jobs", "watch", "5"])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    # the job's state before the stream, then the stream: one line for each change
    assert lines == ["job 5 queued   0.0%",
                     "job 5 running  30.0% epoch 3/10 · val ELBO -30.10 ETA 1:15",
                     "job 5 succeeded 100.0% model ready",
                     "job 5 succeeded: model 7"]


def test_watch_of_a_failed_job_exits_1_with_its_error(api):
    api.states = [job(5, "running", 0.5), job(5, "failed", 0.5, error="training diverged")]
    out = runner.invoke(app, ["jobs", "watch", "5"])
    assert out.exit_code == 1
    assert out.output.strip().splitlines()[-1] == "error: job 5 failed: training diverged"


def test_watch_json_is_one_job_per_line(api):
    api.states = [job(5, "running", 0.5), job(5, "cancelled", 0.5)]
    out = runner.invoke(app, ["jobs", "watch", "5", "--json"])
    assert out.exit_code == 1
    assert [json.loads(line) for line in out.stdout.splitlines()] == api.states


def test_an_api_refusal_is_one_line_and_exit_1(api):
    out = runner.invoke(app, ["models", "show", "9"])
    assert out.exit_code == 1
    assert out.output.strip() == "error: 404 Not Found: model 9 does not exist"


def test_no_api_is_exit_3_naming_up_and_the_url_variable(monkeypatch, no_client_env, slept):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("LATENTBANK_URL", url)
    out = runner.invoke(app, ["datasets", "list"])
    assert out.exit_code == 3
    line = out.output.strip()
    assert line.startswith(f"error: cannot reach the latentbank API at {url}")
    assert line.endswith("start it with `latentbank up` or set LATENTBANK_URL")
    assert len(slept) == 3  # the client's retries of a connection never made


def test_a_delete_whose_answer_is_lost_is_exit_3_not_a_false_404(monkeypatch,
                                                                  no_client_env, slept):
    """The server deleted the model, then the connection broke: not retried (a retry's
    404 would say it never existed), so the verb says the API could not be reached."""
    requests = []

    def handler(request):
        requests.append(request)
        if len(requests) == 1:
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return httpx.Response(404, json={"error": {"code": "not_found",
                                                   "message": "model 3 does not exist"}})

    monkeypatch.setenv("LATENTBANK_URL", URL)
    monkeypatch.setattr(latentbank_client, "Client", functools.partial(
        latentbank_client.Client, transport=httpx.MockTransport(handler)))
    out = runner.invoke(app, ["models", "rm", "3"])
    assert out.exit_code == 3, out.output
    assert out.output.startswith(f"error: cannot reach the latentbank API at {URL}")
    assert len(requests) == 1


def test_an_answer_that_is_not_the_apis_is_exit_1_saying_so(monkeypatch, no_client_env,
                                                            slept):
    """A proxy's HTML page answering 200: an API-side failure (exit 1) that says what
    came from where, not bad usage (exit 2) with a bare JSON decoding error."""
    monkeypatch.setenv("LATENTBANK_URL", URL)
    monkeypatch.setattr(latentbank_client, "Client", functools.partial(
        latentbank_client.Client, transport=httpx.MockTransport(lambda request: httpx.Response(
            200, text="<html>proxy login</html>", headers={"content-type": "text/html"}))))
    out = runner.invoke(app, ["jobs", "list"])
    assert out.exit_code == 1, out.output
    assert out.output.startswith(f"error: 200 OK: the answer of {URL} to GET /v1/jobs is "
                                 "not the latentbank API's (text/html; JSONDecodeError")
    assert "a proxy's page?" in out.output


def test_a_bad_argument_is_refused_before_any_request(api, tmp_path):
    out = runner.invoke(app, ["search", "4", "--vector", "1,2", "--metric", "manhattan"])
    # the set is read first (its dimension checks the vector); the search never goes out
    assert out.exit_code == 2 and "metric must be one of l2, cosine" in out.output
    out = runner.invoke(app, ["search", "4", "--vector", "1,2,3"])
    assert out.exit_code == 2 and "vector must have shape (n, 2); got [1, 3]" in out.output
    assert [r.url.path for r in api.requests] == ["/v1/embeddings/4"] * 2
    out = runner.invoke(app, ["keys", "create", "--name", "x", "--scope", "root"])
    assert out.exit_code == 2 and "scopes must be some of read, write, admin" in out.output
    assert [r.url.path for r in api.requests] == ["/v1/embeddings/4"] * 2


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


def resolved(url=None):
    got = config.resolve(url)
    return got.url, got.key


def test_the_saved_admin_key_goes_only_to_the_local_stack(tmp_path, monkeypatch,
                                                          no_client_env):
    held = fake_stack(tmp_path, "http://127.0.0.1:8123")
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(tmp_path))
    try:
        assert resolved() == ("http://127.0.0.1:8123", "lb_saved")
        assert resolved("http://127.0.0.1:8123/") == ("http://127.0.0.1:8123", "lb_saved")
        assert resolved("https://prod.example") == ("https://prod.example", None)
        monkeypatch.setenv("LATENTBANK_API_KEY", "lb_mine")  # the user's, to their stack
        assert resolved() == ("http://127.0.0.1:8123", "lb_mine")
        monkeypatch.setenv("LATENTBANK_URL", "https://prod.example")
        monkeypatch.setenv("LATENTBANK_API_KEY", "lb_prod")
        assert resolved() == ("https://prod.example", "lb_prod")
    finally:
        held.close()


def sent_to(monkeypatch, *argv):
    """Run a verb whose every request is answered 401 (the API's words); the requests
    and the run's result."""
    requests = []

    def handler(request):
        requests.append(request)
        return httpx.Response(401, json={"error": {"code": "unauthorized",
                                                   "message": "missing API key"}})

    monkeypatch.setattr(latentbank_client, "Client", functools.partial(
        latentbank_client.Client, transport=httpx.MockTransport(handler)))
    return requests, runner.invoke(app, list(argv))


def test_a_stack_json_planted_in_the_working_folder_gets_no_key(tmp_path, monkeypatch,
                                                                no_client_env):
    """A `.latentbank/stack.json` in whatever folder the CLI runs from (a cloned repository,
    a shared folder) naming another server, with a live pid (this very process): without
    this user's `up` holding that folder's lock it is no stack, and LATENTBANK_API_KEY goes
    nowhere but to a URL the user gives; the 401 says why and what to set."""
    from service.cli.running import read_stack

    held = fake_stack(tmp_path / ".latentbank", "https://evil.example", lock=False)
    held.close()
    monkeypatch.chdir(tmp_path)  # the default data folder is ./.latentbank
    monkeypatch.setenv("LATENTBANK_API_KEY", "lb_mine")
    assert read_stack(tmp_path / ".latentbank") is None
    assert config.read_stack(tmp_path / ".latentbank") is None
    requests, out = sent_to(monkeypatch, "models", "list")
    assert [str(r.url) for r in requests] == ["http://127.0.0.1:8000/v1/models?limit=100&offset=0"]
    assert "authorization" not in requests[0].headers
    assert out.exit_code == 1
    assert "set LATENTBANK_URL=http://127.0.0.1:8000 to send it there" in out.output
    assert "lb_mine" not in out.output
    monkeypatch.setenv("LATENTBANK_URL", "https://mine.example")
    requests, out = sent_to(monkeypatch, "models", "list")
    assert requests[0].url.host == "mine.example"
    assert requests[0].headers["authorization"] == "Bearer lb_mine"
    assert "LATENTBANK_URL=" not in out.output  # nothing withheld: no hint


def test_the_cli_sends_the_saved_key_to_its_own_stack_only(tmp_path, monkeypatch,
                                                          no_client_env):
    held = fake_stack(tmp_path / "data", "http://127.0.0.1:8123")
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(tmp_path / "data"))
    try:
        requests, _ = sent_to(monkeypatch, "jobs", "list")
        assert requests[0].url.port == 8123
        assert requests[0].headers["authorization"] == "Bearer lb_saved"
        monkeypatch.setenv("LATENTBANK_URL", "https://elsewhere.example")
        requests, _ = sent_to(monkeypatch, "jobs", "list")
        assert requests[0].url.host == "elsewhere.example"
        assert "authorization" not in requests[0].headers
    finally:
        held.close()


@pytest.mark.parametrize("reader", ["service.cli.running", "latentbank_client.config"])
def test_a_stack_json_counts_only_when_this_users_up_holds_its_folders_lock(
        tmp_path, monkeypatch, reader):
    """Both readers of stack.json (`up`'s own, and the client's, which the verbs go by)
    trust the same files: the client cannot import the server's package, so the rule is
    written twice and held the same here."""
    import importlib
    import os
    import subprocess
    import sys

    stack = importlib.import_module(reader)
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


@pytest.mark.parametrize("reader", ["service.cli.running", "latentbank_client.config"])
def test_without_proc_no_stack_json_is_trusted(tmp_path, monkeypatch, reader):
    """Off /proc (macOS) neither reader can tell which process holds the folder's lock,
    so neither trusts a stack.json: not one committed to a cloned repository (the user's
    own 0644 files) naming pid 1, alive everywhere, and an attacker's URL, to which
    `demo` or a verb would send LATENTBANK_API_KEY; not even a real one (a live pid of
    this user holding the lock), as that cannot be verified."""
    import importlib
    import os

    stack = importlib.import_module(reader)
    monkeypatch.setattr(stack, "PROC", tmp_path / "no-proc")
    cloned = tmp_path / "repo" / ".latentbank"
    cloned.mkdir(parents=True, mode=0o755)
    (cloned / "stack.json").write_text(json.dumps({"url": "https://evil.example", "pid": 1}))
    (cloned / "stack.json").chmod(0o644)
    assert read_url(stack, cloned) is None
    held = fake_stack(tmp_path / "data", "http://127.0.0.1:8123", pid=os.getpid())
    try:
        assert read_url(stack, tmp_path / "data") is None
        monkeypatch.undo()  # with /proc, the real one is trusted again
        assert read_url(stack, tmp_path / "data") == "http://127.0.0.1:8123"
    finally:
        held.close()
    monkeypatch.setattr(config, "PROC", tmp_path / "no-proc")  # what the verbs go by
    monkeypatch.setenv("LATENTBANK_API_KEY", "lb_mine")
    monkeypatch.delenv("LATENTBANK_URL", raising=False)
    monkeypatch.setenv("LATENTBANK_DATA_DIR", str(cloned))
    got = config.resolve()
    assert (got.url, got.key) == ("http://127.0.0.1:8000", None)


def read_url(stack, data_dir):
    info = stack.read_stack(data_dir)
    return info["url"] if info else None


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
