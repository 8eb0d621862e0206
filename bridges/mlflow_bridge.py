"""The MLflow bridge: brings an MLflow tracking server in step with latentbank, one pass at
a time (beat sends a pass every `mlflow_sync_interval`; `latentbank mlflow sync` runs one
by hand). A pass reads what latentbank recorded (the jobs, the metric rows, the models,
the aliases) and pushes what the server lacks: a run per training job (parameters, tags,
each epoch's metrics once, the held-out summary, the status), a registered version per
ready model (its ONNX encoder and decoder as MLflow ONNX models, byte for byte, and
summary.json), each sweep as a parent run, and the model aliases.

Training never calls MLflow: a job writes its own tables only, so a slow or absent
server costs it nothing. The pass meets the server instead; when it is down the pass
stops at the first failed request (each has `mlflow_timeout_seconds`, and MLflow's own
retries are off) and the next pass starts where this one stopped. What a run holds is
kept in `mlflow_runs` (store/mlflow_sync.py); a metric batch whose answer was lost is
checked against the server's history before anything is sent again, so each epoch lands
exactly once (docs/operations/mlflow.md)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from bridges.mlflow_registry import (
    TAG,
    ServerTrouble,
    code,
    mark_deleted,
    register,
    registered_name,
    server_trouble,
    short,
    sync_aliases,
)
from store.artifacts import ArtifactStore
from store.db import Database
from store.mlflow_sync import (
    Bridge,
    RunWork,
    bridge,
    metric_rows,
    pass_lock,
    refused,
    run_status_of,
    runs_behind,
    save_sweep,
    seconds_through,
    set_experiment,
    sweep_run,
    sweeps_ended,
    track_new_jobs,
    update_run,
)

log = logging.getLogger(__name__)
EPOCH_KEYS = ("elbo", "reconstruction", "kl", "log_px", "log_px_se", "ess", "loss",
              "active_units")
SHARED_KEYS = {"lr": "lr", "beta": "beta", "seconds": "epoch_seconds"}  # from the train row
BATCH_METRICS = 900  # MLflow takes at most 1,000 metrics in one log-batch request
MAX_PARAM = 6000  # MLflow's longest parameter value


@dataclass
class PassReport:
    tracked: int = 0
    runs_synced: int = 0
    epochs_logged: int = 0
    versions: int = 0
    aliases: int = 0
    errors: list[str] = field(default_factory=list)
    stopped: str | None = None  # why the pass ended early (the server's trouble)
    skipped: bool = False  # another pass held the lock

    def as_dict(self) -> dict[str, Any]:
        return {"tracked": self.tracked, "runs_synced": self.runs_synced,
                "epochs_logged": self.epochs_logged, "versions": self.versions,
                "aliases": self.aliases, "errors": self.errors[:20],
                "stopped": self.stopped, "skipped": self.skipped}


def client_for(tracking_uri: str, timeout: float) -> Any:
    """An MlflowClient whose requests fail fast: MLflow's own retries (minutes of
    back-off by default) would hold a pass, and the next pass retries anyway. Variables
    the operator set for MLflow are left as they are."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout))))
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:  # the extra is missing on this worker
        raise ServerTrouble("LATENTBANK_MLFLOW_TRACKING_URI is set but MLflow's client is "
                            "not installed on this worker: pip install "
                            "'latentbank[mlflow]'") from exc
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def sync_pass(db: Database, artifacts: ArtifactStore, tracking_uri: str, experiment: str,
              *, timeout: float = 10.0, budget: float = 30.0, client: Any = None,
              limit: int = 100) -> PassReport:
    """One pass: track new training jobs, catch up the runs that lag, close finished
    sweeps, mirror the aliases. A record MLflow refuses (or whose files fail here) is
    noted on it and tried again later, doubling the wait; a server that does not answer
    ends the pass. Runs are started for at most `budget` seconds (one run's sync is not
    cut short); the rest waits for the next pass."""
    report = PassReport()
    with pass_lock(db) as got:
        if not got:
            report.skipped = True
            return report
        b = bridge(db, tracking_uri)
        report.tracked = track_new_jobs(db, b)
        deadline = time.monotonic() + budget
        try:
            client = client or client_for(tracking_uri, timeout)
            if b.experiment_id is None or b.experiment != experiment:
                b.experiment_id = _experiment(client, experiment)
                set_experiment(db, tracking_uri, experiment, b.experiment_id)
            for work in runs_behind(db, tracking_uri, limit):
                if time.monotonic() > deadline:
                    break
                _one_run(db, artifacts, client, b, work, report)
            _close_sweeps(db, client, tracking_uri, report.errors)
            report.aliases = sync_aliases(db, client, tracking_uri, report.errors)
        except Exception as exc:
            if not server_trouble(exc):
                raise
            report.stopped = short(exc)
            log.warning("mlflow sync pass stopped (the next pass goes on): %s",
                        report.stopped)
    return report


def _one_run(db: Database, artifacts: ArtifactStore, client: Any, b: Bridge, work: RunWork,
             report: PassReport) -> None:
    try:
        _sync_run(db, artifacts, client, b, work, report)
        report.runs_synced += 1
    except Exception as exc:
        if server_trouble(exc):
            update_run(db, b.tracking_uri, work.model_id, error=short(exc))
            raise
        log.warning("mlflow sync of model %d failed (tried again later): %s",
                    work.model_id, short(exc))
        refused(db, b.tracking_uri, work.model_id, short(exc))
        report.errors.append(f"model {work.model_id}: {short(exc)}")


def _experiment(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":  # nothing can be logged until then
            raise ServerTrouble(f"the MLflow experiment {name!r} is deleted: restore it or "
                                "set LATENTBANK_MLFLOW_EXPERIMENT to another name")
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, tags={f"{TAG}created_by": "latentbank"}))
    except Exception as exc:
        if code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
        return str(client.get_experiment_by_name(name).experiment_id)


def _ms(t: dt.datetime | None) -> int | None:
    return None if t is None else int(t.timestamp() * 1000)


def _status(work: RunWork) -> str:
    if work.job is not None:
        return run_status_of(work.job["status"])
    return run_status_of(work.model["status"] if work.model else None)


def _sync_run(db: Database, artifacts: ArtifactStore, client: Any, b: Bridge, work: RunWork,
              report: PassReport) -> None:
    uri, rec, job, model = b.tracking_uri, work.record, work.job, work.model
    if model is None:  # deleted in latentbank: say so in MLflow, keep the run
        mark_deleted(db, client, b, work)
        return
    run_id = rec["run_id"]
    if run_id is None:
        run_id = _find_or_create_run(db, client, b, work)
        update_run(db, uri, work.model_id, run_id=run_id)
    if not rec["params_logged"]:
        _log_params(client, run_id, work)
        update_run(db, uri, work.model_id, params_logged=True)
    done, logged = rec["epochs_recorded"], int(rec["epochs_logged"])
    if rec["sending_through"] is not None:  # a batch whose answer was lost: ask the server
        logged = _confirmed_through(client, run_id, logged, int(rec["sending_through"]))
        update_run(db, uri, work.model_id, epochs_logged=logged, sending_through=None)
    if done > logged:
        report.epochs_logged += _log_epochs(db, client, b, work, run_id, logged, done)
    if model["status"] == "ready" and not rec["summary_logged"]:
        _log_summary(client, run_id, model, done, (job or {}).get("finished_at"))
        update_run(db, uri, work.model_id, summary_logged=True)
    status = _status(work)
    if rec["run_status"] != status:
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=status,
                                  end_time=_ms((job or {}).get("finished_at")))
        update_run(db, uri, work.model_id, run_status=status)
    if model["status"] == "ready" and rec["registered_version"] is None:
        name, version = register(client, artifacts, b, work, run_id)
        update_run(db, uri, work.model_id, registered_name=name, registered_version=version)
        report.versions += 1
    update_run(db, uri, work.model_id, error=None, failures=0, retry_at=None)


def _find_or_create_run(db: Database, client: Any, b: Bridge, work: RunWork) -> str:
    """The model's run: found by its tags when an earlier pass made it and lost the
    answer, else created (under its sweep's parent run, if any)."""
    found = client.search_runs(
        [b.experiment_id], max_results=1,
        filter_string=(f"tags.`{TAG}model_id` = '{work.model_id}' and "
                       f"tags.`{TAG}instance` = '{b.instance}'"))
    if found:
        return str(found[0].info.run_id)
    job, model, dataset = work.job or {}, work.model or {}, work.dataset or {}
    tags = {f"{TAG}model_id": str(work.model_id), f"{TAG}instance": b.instance}
    if job.get("id") is not None:
        tags[f"{TAG}job_id"] = str(job["id"])
    if dataset:
        tags.update({f"{TAG}dataset_id": str(dataset["id"]),
                     f"{TAG}dataset_name": str(dataset["name"]),
                     f"{TAG}dataset_checksum": str(dataset["checksum"])})
    sweep_id = model.get("sweep_id") or job.get("sweep_id")
    if sweep_id:
        tags[f"{TAG}sweep_id"] = sweep_id
        tags["mlflow.parentRunId"] = _sweep_parent(db, client, b, sweep_id)
    start = job.get("started_at") or job.get("created_at")
    run = client.create_run(b.experiment_id, start_time=_ms(start), tags=tags,
                            run_name=f"model-{work.model_id}")
    return str(run.info.run_id)


def _sweep_parent(db: Database, client: Any, b: Bridge, sweep_id: str) -> str:
    known = sweep_run(db, b.tracking_uri, sweep_id)
    if known is not None:
        return known.run_id
    found = client.search_runs(
        [b.experiment_id], max_results=1,
        filter_string=(f"tags.`{TAG}sweep_id` = '{sweep_id}' and "
                       f"tags.`{TAG}instance` = '{b.instance}' and "
                       f"tags.`{TAG}kind` = 'sweep'"))
    if found:
        run_id = str(found[0].info.run_id)
    else:
        run_id = str(client.create_run(
            b.experiment_id, run_name=sweep_id,
            tags={f"{TAG}sweep_id": sweep_id, f"{TAG}instance": b.instance,
                  f"{TAG}kind": "sweep"}).info.run_id)
    save_sweep(db, b.tracking_uri, sweep_id, run_id)
    return run_id


def _close_sweeps(db: Database, client: Any, tracking_uri: str, errors: list[str]) -> None:
    """End the parent run of each sweep whose jobs have all ended (one deleted in MLflow
    meanwhile is left as it is)."""
    for sweep_id, run_id in sweeps_ended(db, tracking_uri):
        try:
            client.set_terminated(run_id, status="FINISHED")
        except Exception as exc:
            if server_trouble(exc):
                raise
            errors.append(f"sweep {sweep_id}: {short(exc)}")
        save_sweep(db, tracking_uri, sweep_id, run_id, "FINISHED")


def flat_params(work: RunWork) -> dict[str, str]:
    """The model's configuration as MLflow parameters: `model.latent_dim`,
    `training.epochs`, ... (lists and dicts as JSON), plus the dataset and the name the
    version is registered under."""
    config = (work.model or {}).get("config") or {}
    out: dict[str, str] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{key}.{k}", v)
            return
        text = value if isinstance(value, str) else json.dumps(value)
        out[key[:250]] = text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 3] + "..."

    for section in ("model", "training"):
        put(section, config.get(section) or {})
    if work.dataset:
        out["dataset_id"] = str(work.dataset["id"])
    out["registered_model"] = registered_name(work)
    return out


def _log_params(client: Any, run_id: str, work: RunWork) -> None:
    from mlflow.entities import Param

    items = sorted(flat_params(work).items())
    for i in range(0, len(items), 100):  # MLflow takes 100 parameters a request
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])


def epoch_metrics(rows: list[dict[str, Any]], base_ms: int) -> list[tuple[int, str, float, int]]:
    """(epoch, key, value, timestamp) of each metric of these rows: `train/elbo`,
    `val/log_px`, ..., and the epoch's `lr`, `beta`, `epoch_seconds` (from its train
    row). Missing values are left out; the timestamp is the run's start plus the epochs'
    seconds so far, the same on every pass."""
    out = []
    elapsed = 0.0
    for row in rows:
        epoch, split = int(row["epoch"]), row["split"]
        if split == "train":
            elapsed += float(row.get("seconds") or 0.0)
        ts = base_ms + int(elapsed * 1000)
        for key in EPOCH_KEYS:
            value = row.get(key)
            if value is not None:
                out.append((epoch, f"{split}/{key}", float(value), ts))
        if split == "train":
            for col, key in SHARED_KEYS.items():
                if row.get(col) is not None:
                    out.append((epoch, key, float(row[col]), ts))
    return out


def _log_epochs(db: Database, client: Any, b: Bridge, work: RunWork, run_id: str,
                logged: int, done: int) -> int:
    """Send epochs logged+1..done, whole epochs a request, each request's last epoch
    written down as `sending_through` before it goes."""
    from mlflow.entities import Metric

    rows = metric_rows(db, work.model_id, logged, done)
    job = work.job or {}
    start = _ms(job.get("started_at") or job.get("created_at")) or int(time.time() * 1000)
    base = start + int(seconds_through(db, work.model_id, logged) * 1000)
    metrics = epoch_metrics(rows, base)
    by_epoch: dict[int, list[tuple[int, str, float, int]]] = {}
    for m in metrics:
        by_epoch.setdefault(m[0], []).append(m)
    sent = 0
    batch: list[tuple[int, str, float, int]] = []
    epochs = sorted(by_epoch)
    for i, epoch in enumerate(epochs):
        batch.extend(by_epoch[epoch])
        last = i == len(epochs) - 1
        if last or len(batch) + len(by_epoch[epochs[i + 1]]) > BATCH_METRICS:
            update_run(db, b.tracking_uri, work.model_id, sending_through=epoch)
            client.log_batch(run_id, metrics=[Metric(k, v, ts, e) for e, k, v, ts in batch])
            update_run(db, b.tracking_uri, work.model_id, epochs_logged=epoch,
                       sending_through=None)
            sent += len({e for e, *_ in batch})
            batch = []
    if not epochs:  # recorded epochs without a row (none yet): nothing to send
        update_run(db, b.tracking_uri, work.model_id, epochs_logged=done)
    return sent


def _confirmed_through(client: Any, run_id: str, logged: int, sending: int) -> int:
    """After a lost answer: the last epoch the server holds (each request carries whole
    epochs and MLflow stores a request in one transaction)."""
    steps = [m.step for m in client.get_metric_history(run_id, "train/elbo")]
    held = [s for s in steps if logged < s <= sending]
    return max(held) if held else logged


def _log_summary(client: Any, run_id: str, model: dict[str, Any], last_epoch: int,
                 finished: dt.datetime | None) -> None:
    from mlflow.entities import Metric

    summary = model.get("summary") or {}
    now = _ms(finished) or int(time.time() * 1000)  # the same on every pass
    metrics = [Metric(f"heldout/{k[len('heldout_'):]}", float(v), now, last_epoch)
               for k, v in sorted(summary.items())
               if k.startswith("heldout_") and isinstance(v, int | float)
               and not isinstance(v, bool) and math.isfinite(float(v))]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, json.dumps(summary, indent=2, sort_keys=True), "summary.json")
