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
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from store.artifacts import ArtifactStore
from store.db import Database
from store.mlflow_sync import (
    Bridge,
    RunWork,
    alias_state,
    bridge,
    drop_alias,
    metric_rows,
    pass_lock,
    run_status_of,
    runs_behind,
    save_alias,
    save_sweep,
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
CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                 "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"}
TAG = "latentbank."


class ServerTrouble(Exception):
    """The server did not answer as a working server does: the pass stops here."""


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
    back-off by default) would hold a pass, and the next pass retries anyway."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout))))
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:  # pragma: no cover - the extra is missing on this worker
        raise RuntimeError("LATENTBANK_MLFLOW_TRACKING_URI is set but MLflow's client is "
                           "not installed on this worker: pip install "
                           "'latentbank[mlflow]' (mlflow-skinny)") from exc
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", "") or "")


def _is_client_error(exc: BaseException) -> bool:
    """MLflow refused this request (the record's own problem); anything else (no answer,
    a timeout, a 5xx) is the server's, and ends the pass."""
    return _code(exc) in CLIENT_ERRORS


def sync_pass(db: Database, artifacts: ArtifactStore, tracking_uri: str, experiment: str,
              *, timeout: float = 10.0, budget: float = 30.0, client: Any = None,
              limit: int = 100) -> PassReport:
    """One pass: track new training jobs, catch up the runs that lag, mirror the aliases.
    At most `budget` seconds of work are started; the rest waits for the next pass."""
    report = PassReport()
    with pass_lock(db) as got:
        if not got:
            report.skipped = True
            return report
        b = bridge(db, tracking_uri)
        report.tracked = track_new_jobs(db, b)
        client = client or client_for(tracking_uri, timeout)
        deadline = time.monotonic() + budget
        try:
            if b.experiment_id is None:
                b.experiment_id = _experiment(client, experiment)
                set_experiment(db, tracking_uri, b.experiment_id)
            for work in runs_behind(db, tracking_uri, limit):
                if time.monotonic() > deadline:
                    break
                try:
                    _sync_run(db, artifacts, client, b, work, report)
                    report.runs_synced += 1
                except ServerTrouble:
                    raise
                except Exception as exc:
                    if not _is_client_error(exc):
                        update_run(db, tracking_uri, work.model_id, error=_short(exc))
                        raise ServerTrouble(_short(exc)) from exc
                    log.warning("mlflow sync of model %d refused: %s", work.model_id,
                                _short(exc))
                    update_run(db, tracking_uri, work.model_id, error=_short(exc))
                    report.errors.append(f"model {work.model_id}: {_short(exc)}")
            _close_sweeps(db, client, tracking_uri)
            report.aliases = _sync_aliases(db, client, tracking_uri, report)
        except ServerTrouble as trouble:
            report.stopped = str(trouble)
        except Exception as exc:  # the experiment, a sweep or an alias: next pass
            report.stopped = _short(exc)
        if report.stopped:
            log.warning("mlflow sync pass stopped (the next pass goes on): %s", report.stopped)
    return report


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


def _experiment(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ServerTrouble(f"the MLflow experiment {name!r} is deleted: restore it or "
                                "set LATENTBANK_MLFLOW_EXPERIMENT to another name")
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, tags={f"{TAG}created_by": "latentbank"}))
    except Exception as exc:
        if _code(exc) != "RESOURCE_ALREADY_EXISTS":
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
    run_id = rec["run_id"]
    if model is None:  # deleted in latentbank: say so in MLflow, keep the run
        _mark_deleted(db, client, b, work)
        return
    if run_id is None:
        run_id = _find_or_create_run(db, client, b, work)
        update_run(db, uri, work.model_id, run_id=run_id, error=None)
    if not rec["params_logged"]:
        _log_params(client, run_id, work)
        update_run(db, uri, work.model_id, params_logged=True)
    done = int(job["items_done"] or 0) if job else int(rec["epochs_logged"])
    logged = int(rec["epochs_logged"])
    if rec["sending_through"] is not None:  # a batch whose answer was lost: ask the server
        logged = _confirmed_through(client, run_id, logged, int(rec["sending_through"]))
        update_run(db, uri, work.model_id, epochs_logged=logged, sending_through=None)
    if done > logged:
        report.epochs_logged += _log_epochs(db, client, b, work, run_id, logged, done)
    status = _status(work)
    if model["status"] == "ready" and not rec["summary_logged"]:
        _log_summary(client, run_id, model, done)
        update_run(db, uri, work.model_id, summary_logged=True)
    if model["status"] == "ready" and rec["registered_version"] is None:
        name, version = _register(client, artifacts, b, work, run_id)
        update_run(db, uri, work.model_id, registered_name=name, registered_version=version)
        report.versions += 1
    if rec["run_status"] != status:
        if status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            end = job.get("finished_at") if job else None
            client.set_terminated(run_id, status=status, end_time=_ms(end))
        update_run(db, uri, work.model_id, run_status=status)
    update_run(db, uri, work.model_id, error=None)


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


def _close_sweeps(db: Database, client: Any, tracking_uri: str) -> None:
    for sweep_id, run_id in sweeps_ended(db, tracking_uri):
        client.set_terminated(run_id, status="FINISHED")
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


def registered_name(work: RunWork) -> str:
    """The registered model a ready model becomes a version of: the job's
    `registered_model`, else its dataset's name ('/' and ':', which MLflow refuses in a
    name, become '-')."""
    params = (work.job or {}).get("params") or {}
    name = params.get("registered_model") or (work.dataset or {}).get("name") or "latentbank"
    return str(name).replace("/", "-").replace(":", "-")


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

    rows = metric_rows(db, work.model_id, 0, done)  # from 1: the timestamps add up
    job = work.job or {}
    base = _ms(job.get("started_at") or job.get("created_at")) or int(time.time() * 1000)
    metrics = [m for m in epoch_metrics(rows, base) if m[0] > logged]
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


def _log_summary(client: Any, run_id: str, model: dict[str, Any], last_epoch: int) -> None:
    from mlflow.entities import Metric

    summary = model.get("summary") or {}
    now = int(time.time() * 1000)
    metrics = [Metric(f"heldout/{k[len('heldout_'):]}", float(v), now, last_epoch)
               for k, v in sorted(summary.items())
               if k.startswith("heldout_") and isinstance(v, int | float)
               and not isinstance(v, bool) and math.isfinite(float(v))]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.log_text(run_id, json.dumps(summary, indent=2, sort_keys=True), "summary.json")


def onnx_signature(path: str) -> Any:
    """The MLflow signature of an ONNX graph: its inputs and outputs as tensors, with -1
    for a dynamic axis."""
    import onnx
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    graph = onnx.load(path, load_external_data=False).graph

    def spec(value: Any) -> Any:
        t = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), shape,
                          value.name)

    return ModelSignature(Schema([spec(v) for v in graph.input]),
                          Schema([spec(v) for v in graph.output]))


def mlflow_onnx_model(onnx_path: str, out_dir: str) -> str:
    """An MLflow model directory (`mlflow.onnx` flavour, with the graph's signature)
    whose `model.onnx` is the very file given, byte for byte."""
    import mlflow.onnx
    import onnx

    mlflow.onnx.save_model(onnx.load(onnx_path), out_dir, signature=onnx_signature(onnx_path))
    shutil.copyfile(onnx_path, os.path.join(out_dir, "model.onnx"))
    return out_dir


def _register(client: Any, artifacts: ArtifactStore, b: Bridge, work: RunWork,
              run_id: str) -> tuple[str, str]:
    """Log the model's ONNX files into its run and register the decoder as a version of
    its registered model (found again by run id when an answer was lost)."""
    model = work.model or {}
    name = registered_name(work)
    with tempfile.TemporaryDirectory(prefix="mlflow-") as tmp:
        for role in ("encoder", "decoder"):
            local = os.path.join(tmp, f"{role}.onnx")
            artifacts.get_file(artifacts.key_of(model[f"{role}_uri"]), local,
                               model.get(f"{role}_sha256"))
            client.log_artifacts(run_id, mlflow_onnx_model(local, os.path.join(tmp, role)),
                                 role)
    try:
        client.create_registered_model(
            name, tags={f"{TAG}instance": b.instance},
            description="VAE decoders trained by latentbank (z -> x); each version's run "
                        "holds its encoder too")
    except Exception as exc:
        if _code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
    found = client.search_model_versions(f"name = '{_quoted(name)}' and run_id = '{run_id}'")
    if found:
        return name, str(found[0].version)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/decoder"
    version = client.create_model_version(
        name, source, run_id=run_id,
        tags={f"{TAG}model_id": str(work.model_id), f"{TAG}instance": b.instance,
              f"{TAG}decoder_sha256": str(model.get("decoder_sha256")),
              f"{TAG}encoder_sha256": str(model.get("encoder_sha256"))},
        description=f"latentbank model {work.model_id}: the decoder (z -> x); the "
                    "encoder is the run's `encoder` artifact")
    return name, str(version.version)


def _quoted(value: str) -> str:
    return value.replace("'", "\\'")


def _mark_deleted(db: Database, client: Any, b: Bridge, work: RunWork) -> None:
    """A model deleted in latentbank: its version stays in MLflow (a registry keeps its
    history) tagged `latentbank.deleted`, its aliases go (the alias pass), an unfinished
    run ends KILLED."""
    rec = work.record
    if rec["registered_version"] is not None:
        client.set_model_version_tag(rec["registered_name"], rec["registered_version"],
                                     f"{TAG}deleted", dt.datetime.now(dt.UTC).isoformat())
    if rec["run_id"] is not None and rec["run_status"] in (None, "RUNNING"):
        client.set_terminated(rec["run_id"], status="KILLED")
    update_run(db, b.tracking_uri, work.model_id, deleted_marked=True, run_status="KILLED",
               error=None)


def _sync_aliases(db: Database, client: Any, tracking_uri: str, report: PassReport) -> int:
    """Mirror latentbank's model aliases onto the registered versions; returns how many
    changed in MLflow. A name MLflow refuses (a '.', `latest`, `v1`) is recorded with
    the reason and skipped."""
    state = alias_state(db, tracking_uri)
    changed = 0
    for name, kept in state.current.items():
        want = state.desired.get(name)
        if kept.version is not None and (want is None or want[0] != kept.registered_name):
            try:
                client.delete_registered_model_alias(kept.registered_name, name)
            except Exception as exc:
                if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
            changed += 1
        if want is None:
            drop_alias(db, tracking_uri, name)
    for name, (reg, version) in sorted(state.desired.items()):
        kept = state.current.get(name)
        if kept is not None and (kept.registered_name, kept.version) == (reg, version):
            continue
        if kept is not None and kept.error and kept.registered_name == reg:
            continue  # refused before: it stays refused until the alias moves
        try:
            client.set_registered_model_alias(reg, name, version)
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            save_alias(db, tracking_uri, name, reg, None, _short(exc))
            report.errors.append(f"alias {name}: {_short(exc)}")
            continue
        save_alias(db, tracking_uri, name, reg, version)
        changed += 1
    return changed
