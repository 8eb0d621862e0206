"""The MLflow bridge's registry side (bridges/mlflow_bridge.py runs it): a ready model as a
version of a registered model, its ONNX files as MLflow ONNX models byte for byte, a
deleted model's version marked, latentbank's model aliases mirrored; and the rules both
modules share for telling a refusal (this record's problem) from a server in trouble."""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import tempfile
from typing import Any

from store.artifacts import ArtifactStore
from store.db import Database
from store.mlflow_sync import Bridge, RunWork, alias_state, drop_alias, save_alias, update_run

TAG = "latentbank."
# MLflow error codes of a working server refusing one request; anything else (no answer,
# a timeout, a 5xx) says the server is in trouble, which ends a pass
CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS",
                 "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
                 "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_LIMIT_EXCEEDED"}
NAME_OK = re.compile(r"[^A-Za-z0-9_.\- ]+")


class ServerTrouble(Exception):
    """The server did not answer as a working server does: the pass stops here."""


def code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", "") or "")


def server_trouble(exc: BaseException) -> bool:
    """Whether `exc` says the server is unreachable or failing (the pass stops, the
    next one retries) rather than refusing or failing this one record."""
    if isinstance(exc, ServerTrouble | ConnectionError | TimeoutError):
        return True
    name = type(exc).__module__ + "." + type(exc).__name__
    if name.startswith(("requests.", "urllib3.")):
        return True
    # MLflow's own: transport failures and 5xx answers (INTERNAL_ERROR, ...) but refusals
    return name.startswith("mlflow.") and code(exc) not in CLIENT_ERRORS


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


def registered_name(work: RunWork) -> str:
    """The registered model a ready model becomes a version of: the job's
    `registered_model` (checked by the API), else its dataset's name with anything MLflow
    might refuse in a name made '-'."""
    params = (work.job or {}).get("params") or {}
    if params.get("registered_model"):
        return str(params["registered_model"])
    name = NAME_OK.sub("-", str((work.dataset or {}).get("name") or "")).replace("..", "-")
    return name.strip(" -.")[:200] or "latentbank"


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
    whose `model.onnx` is the very file given, byte for byte (latentbank's files carry
    their weights inside: no external data)."""
    import mlflow.onnx
    import onnx

    mlflow.onnx.save_model(onnx.load(onnx_path), out_dir, save_as_external_data=False,
                           signature=onnx_signature(onnx_path))
    shutil.copyfile(onnx_path, os.path.join(out_dir, "model.onnx"))
    return out_dir


def register(client: Any, artifacts: ArtifactStore, b: Bridge, work: RunWork,
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
            name, tags={f"{TAG}created_by": "latentbank"},
            description="VAE decoders trained by latentbank (z -> x); each version's run "
                        "holds its encoder too")
    except Exception as exc:
        if code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
    # by run id only (a hex id: nothing to quote), the name compared here
    found = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
             if v.name == name]
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


def mark_deleted(db: Database, client: Any, b: Bridge, work: RunWork) -> None:
    """A model deleted in latentbank: its version stays in MLflow (a registry keeps its
    history) tagged `latentbank.deleted`, its aliases go (with latentbank's, which the
    deletion required), a run still RUNNING ends KILLED."""
    rec = work.record
    if rec["registered_version"] is not None:
        client.set_model_version_tag(rec["registered_name"], rec["registered_version"],
                                     f"{TAG}deleted", dt.datetime.now(dt.UTC).isoformat())
    status = rec["run_status"]
    if rec["run_id"] is not None and status in (None, "RUNNING"):
        client.set_terminated(rec["run_id"], status="KILLED")
        status = "KILLED"
    update_run(db, b.tracking_uri, work.model_id, deleted_marked=True, run_status=status,
               error=None, failures=0, retry_at=None)


def sync_aliases(db: Database, client: Any, tracking_uri: str, errors: list[str]) -> int:
    """Mirror latentbank's model aliases onto the registered versions; returns how many
    changed in MLflow. An alias whose model has no version yet keeps its old one until
    it has. A name MLflow refuses (a '.', `latest`, `v1`) is recorded with the reason,
    and tried again when the alias moves."""
    state = alias_state(db, tracking_uri)
    changed = 0
    for name, kept in state.current.items():
        want = state.desired.get(name)
        if want is not None and want[1] is None:
            continue  # its model is not registered yet: the old target stands meanwhile
        if kept.version is not None and (want is None or want[0] != kept.registered_name):
            try:
                client.delete_registered_model_alias(kept.registered_name, name)
            except Exception as exc:
                if code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
            changed += 1
        if want is None:
            drop_alias(db, tracking_uri, name)
    for name, (reg, version) in sorted(state.desired.items()):
        kept = state.current.get(name)
        if version is None or (kept is not None and (kept.registered_name, kept.version)
                               == (reg, version)):
            continue
        if kept is not None and kept.error and kept.error.startswith(f"{reg} v{version}:"):
            continue  # refused for this very target: it stays refused until it moves
        try:
            client.set_registered_model_alias(reg, name, version)
        except Exception as exc:
            if server_trouble(exc):
                raise
            save_alias(db, tracking_uri, name, kept.registered_name if kept else None,
                       kept.version if kept else None, f"{reg} v{version}: {short(exc)}")
            errors.append(f"alias {name}: {short(exc)}")
            continue
        save_alias(db, tracking_uri, name, reg, version)
        changed += 1
    return changed
