"""Bulk embedding: shards of a dataset encoded as a Celery chord and written by the COPY
writer, a finishing step that marks the set ready (searchable exactly at once), and a
follow-up build of its HNSW index (docs/internals/workers.md)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import Counter
from typing import Any

import numpy as np
import torch

from models.checkpoint import load_model
from models.config import VAEConfig
from models.data import gather_rows, scan_chunks
from models.transforms import (
    is_binary,
    needs_value_scan,
    prepare,
    range_problem,
    value_problem,
)
from models.vae import VAE, elbo_terms, log_px_importance
from store.datasets import dataset_array, get_dataset
from store.db import analyze
from store.embedding_sets import get_set, part_at
from store.indexes import build_index, claim_index, index_owed, record_index_stats
from store.jobs import (
    LeaseLost,
    count_done,
    finish,
    get_job,
    lease_guard,
    mark_finishing,
    record_shard_rows,
)
from store.latent_rows import latent_writer
from store.partitions import partition_name
from store.processes import host_identity
from store.publishing import publish_index
from store.registry import get_model
from store.retrieval import labelled_sample, set_statistics
from store.search import search_many
from workers.context import Context
from workers.lease import IndexLease, Lease, owner_is_dead, start_attempt
from workers.sender import FINISH_TASK, SHARD_TASK
from workers.shards import job_shards, owed_shards, rows_per_shard

log = logging.getLogger(__name__)
CHUNK_ROWS = 4096
KNN_SAMPLE = 500


class ShardCancelled(Exception):
    """The job was cancelled while this shard ran: its rows are not written."""


def _load(ctx: Context, model_id: int) -> tuple[VAE, Any]:
    """The model (torch) and its encoder session (onnxruntime), cached per process, from
    the files the model row records (verified against its encoder's sha256)."""
    key = f"model-{model_id}"
    if key not in ctx.cache:
        import onnxruntime as ort

        model_row = get_model(ctx.db, model_id)
        assert model_row.checkpoint_uri and model_row.encoder_uri
        folder = os.path.join(ctx.settings.cache_dir, f"model-{model_id}")
        os.makedirs(folder, exist_ok=True)
        ckpt = os.path.join(folder, "checkpoint.safetensors")
        enc = os.path.join(folder, "encoder.onnx")
        ctx.artifacts.get_file(ctx.artifacts.key_of(model_row.checkpoint_uri), ckpt)
        ctx.artifacts.get_file(ctx.artifacts.key_of(model_row.encoder_uri), enc,
                               sha256=model_row.encoder_sha256)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Spinning onnxruntime threads would steal the cores from the torch decoder pass
        # that follows each encoder call (measured: 94 -> 53 ms per 4096 rows).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = None if device == "cuda" else ort.InferenceSession(
            enc, options, providers=["CPUExecutionProvider"])
        ctx.cache[key] = (load_model(ckpt, device), session)
    return ctx.cache[key]


@torch.inference_mode()
def embed_rows(model: VAE, session: Any, x: np.ndarray, importance_samples: int,
               generator: torch.Generator) -> dict[str, np.ndarray]:
    """mu, logvar and per-item ELBO terms (and log p(x) with K > 0) of a batch."""
    device = next(model.parameters()).device
    xt = torch.from_numpy(x).to(device)
    if session is not None:
        mu, logvar = session.run(None, {"x": x})
        encoded = (torch.from_numpy(mu), torch.from_numpy(logvar))
    else:
        encoded = model.encode(xt)
    if importance_samples > 0:
        est = log_px_importance(model, xt, importance_samples, generator, encoded=encoded)
        terms = est
        extra = {"log_px": est.log_px, "log_px_se": est.log_px_se, "ess": est.ess}
    else:
        terms, extra = elbo_terms(model, xt, 1, generator, encoded=encoded), {}
    out = {"mu": encoded[0].float().cpu().numpy(), "logvar": encoded[1].float().cpu().numpy(),
           **{k: getattr(terms, k).cpu().numpy().astype(np.float64)
              for k in ("elbo", "reconstruction", "kl")}}
    out |= {k: v.cpu().numpy().astype(np.float64) for k, v in extra.items() if v is not None}
    return out


def start_embedding(ctx: Context, job_id: int) -> dict[str, Any]:
    """Claim the job, then fan its shards out as a chord with a finishing task."""
    owner, got = start_attempt(ctx.db, job_id, ctx.settings.embed_lease_seconds)
    if got.outcome != "claimed":
        return {"outcome": got.outcome}
    job = got.job
    assert job is not None and job.embedding_set_id is not None
    set_id = job.embedding_set_id
    # under a lease: a scan of every value can outlast the stall maintenance looks for
    with Lease(ctx.db, job_id, owner, ctx.settings.embed_lease_seconds):
        problem = value_problem_of(ctx, job.params["model_id"], job.params["dataset_id"])
    if problem is not None:  # before any row is written
        with contextlib.suppress(LeaseLost):
            finish(ctx.db, job_id, owner, "failed", error=problem)
        return {"outcome": "failed"}
    es = get_set(ctx.db, set_id)
    params = job.params if job.params.get("shard_rows") else record_shard_rows(
        ctx.db, job_id, owner, rows_per_shard(ctx.settings.embed_shard_rows,
                                              es.importance_samples))
    shards = job_shards(params, es.n_items, es.importance_samples,
                        ctx.settings.embed_shard_rows)
    ctx.sender.send_chord([(SHARD_TASK, [job_id, set_id, a, b, owner]) for a, b in shards],
                          (FINISH_TASK, [job_id, set_id, owner]))
    log.info("embedding started job_id=%d set_id=%d shards=%d attempt=%d", job_id, set_id,
             len(shards), job.attempts)
    return {"outcome": "dispatched", "shards": len(shards)}


def value_problem_of(ctx: Context, model_id: int, dataset_id: int) -> str | None:
    """Why the dataset's values do not suit the model's transform or likelihood, or None:
    its stored range first (the API checked it at submission), then, for a dequantising
    model on data not stored from integers, every value, in chunks (a memory map)."""
    dataset = get_dataset(ctx.db, dataset_id)
    config = VAEConfig.from_dict(get_model(ctx.db, model_id).config["model"])
    why = range_problem(dataset.min_value, dataset.max_value, config)
    if why is None and needs_value_scan(dataset.source_dtype, config):
        data = dataset_array(ctx.artifacts, dataset, str(ctx.settings.cache_dir))
        for start, chunk in scan_chunks(data):
            found = value_problem(chunk.reshape(len(chunk), -1), config)
            if found is not None:
                why = found[1].format(item=start + found[0])
                break
    return None if why is None else (f"dataset {dataset_id} cannot be embedded with model "
                                     f"{model_id}: {why}")


def run_shard(ctx: Context, job_id: int, set_id: int, start: int, stop: int,
              owner: str, finish: bool = False) -> dict[str, Any]:
    """Embed items [start, stop) and write them; skipped if the attempt is stale, and
    computed only if the rows are not all written already (an earlier delivery of the
    shard, or an earlier attempt, wrote them with the same noise; a delivery running
    now is waited for, `latent_writer`).

    The attempt's lease is renewed while the shard runs (another process of the same
    attempt may have dispatched it), and the rows are written under its guard. With
    `finish` (a shard sent again by maintenance for a stalled attempt, outside the chord)
    it sends the finishing step once it finds every row of the job written."""
    job = get_job(ctx.db, job_id)
    if job.status != "running" or job.lease_owner != owner:
        return {"skipped": True, "worker": socket.gethostname()}
    if job.cancel_requested:
        return {"cancelled": True, "worker": socket.gethostname()}
    es = get_set(ctx.db, set_id)
    with Lease(ctx.db, job_id, owner, ctx.settings.embed_lease_seconds) as lease:
        try:  # None: the rows were written already (finish_set reads the values again)
            binary = _write_shard(ctx, job_id, es, start, stop, owner, lease)
        except ShardCancelled:
            return {"cancelled": True, "worker": socket.gethostname()}
        with contextlib.suppress(LeaseLost):  # the finishing task will notice
            done, total = count_done(ctx.db, job_id, owner, stop - start)
            total = total or (stop - start)
            done = min(done, total)  # a re-run shard counts again
            lease.report(0.95 * done / total, f"{done}/{total} items embedded")
            lease.beat()
    if finish and binary is not None:
        _finish_if_written(ctx, job, owner)
    # host/pid-namespace:pid: containers that share the host's network (and name) differ
    return {"rows": stop - start, "worker": f"{host_identity()}:{os.getpid()}",
            "binary": binary}


def _finish_if_written(ctx: Context, job: Any, owner: str) -> None:
    """A shard maintenance sent again wrote its rows: if no shard of the job is owed any
    more, send the finishing step (the chord's count may be what was lost). The broker
    away: the next nudge sends it."""
    if owed_shards(ctx.db, job, ctx.settings.embed_shard_rows):
        return
    log.info("a resent shard completed job_id=%d: sending its finishing step", job.id)
    try:
        ctx.sender.send_task(FINISH_TASK, [[], job.id, job.embedding_set_id, owner],
                             queue="embed", retry=False)
    except Exception as exc:  # never fail the job over it
        log.warning("finishing step of job_id=%d not sent (%s): maintenance sends it",
                    job.id, type(exc).__name__)


def _write_shard(ctx: Context, job_id: int, es: Any, start: int, stop: int, owner: str,
                 lease: Lease) -> bool | None:
    """Encode and score items [start, stop) chunk by chunk into one COPY under the
    lease's guard; returns whether every value was 0 or 1 (asked of Bernoulli models on
    data not binarised: their log p(x) is no likelihood otherwise), or None if the rows
    were all written already (an earlier delivery or attempt wrote them, same noise)."""
    model, session = _load(ctx, es.model_id)
    dataset_id, offset = part_at(ctx.db, es.id, start)  # the dataset these positions hold
    data = dataset_array(ctx.artifacts, get_dataset(ctx.db, dataset_id),
                         str(ctx.settings.cache_dir))
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(
        es.id * 1_000_003 + start)  # a re-run shard draws the same noise
    rows = np.arange(start - offset, stop - offset)  # the dataset's own indices
    check_binary = model.config.likelihood == "bernoulli" and model.config.binarize == "none"
    binary = True
    # Each chunk goes into the open COPY as soon as it is computed: the database parses
    # it while the next chunk is encoded, and memory holds one chunk, not the shard.
    with latent_writer(ctx.db, es.id, start, stop - start, keep_written=True,
                       guard=lambda conn: lease_guard(conn, job_id, owner)) as write:
        if write is None:
            return None
        for a in range(0, len(rows), CHUNK_ROWS):
            if lease.cancelled:  # cancelled or lost: the transaction rolls back
                lease.check()
                raise ShardCancelled
            chunk = rows[a:a + CHUNK_ROWS]
            x = gather_rows(data, chunk, model.config).numpy()
            binary = binary and (not check_binary or is_binary(x))
            out = embed_rows(model, session, prepare(x, chunk, model.config),
                             es.importance_samples, generator)
            write(out["mu"], out["logvar"], out["elbo"], out["reconstruction"],
                  out["kl"], out.get("log_px"), out.get("log_px_se"), out.get("ess"))
    return binary


def knn_label_accuracy(ctx: Context, set_id: int, sample: int = KNN_SAMPLE, k: int = 10,
                       ) -> float | None:
    """How often the majority label of an item's k nearest neighbours is its own label,
    over a seeded sample of labelled items (batch searches); None without labels."""
    es = get_set(ctx.db, set_id)
    keys = labelled_sample(ctx.db, es.dataset_id, sample, salt=str(set_id))
    if not keys:
        return None
    hits, step = 0, ctx.settings.search_max_queries
    for a in range(0, len(keys), step):
        part = keys[a:a + step]
        answers = search_many(ctx.db, ctx.settings, set_id, [key for key, _ in part], k=k)
        for (_, label), answer in zip(part, answers, strict=True):
            votes = Counter(h.label for h in answer.hits if h.label is not None)
            hits += bool(votes) and votes.most_common(1)[0][0] == label
    return hits / len(keys)


def _kind(ctx: Context, job: Any, es: Any, results: list[dict[str, Any]]) -> str:
    """Which figure the set's log p(x) is (VAEConfig.likelihood_kind) for the data the
    job's shards saw: told by the shards that computed their rows; read again from the
    data when a shard found its rows written or the finish came from maintenance (no
    shard results), which only a Bernoulli model on data it does not binarise asks."""
    config = VAEConfig.from_dict(get_model(ctx.db, es.model_id).config["model"])
    told = [r.get("binary", True) for r in results if "rows" in r]
    if told and None not in told:
        binary = all(told)
    elif config.likelihood == "bernoulli" and config.binarize == "none":
        binary = all(_items_binary(ctx, es, a, b) for a, b in job_shards(
            job.params, es.n_items, es.importance_samples, ctx.settings.embed_shard_rows))
    else:
        binary = True  # not asked
    return config.likelihood_kind(binary)


def _items_binary(ctx: Context, es: Any, start: int, stop: int) -> bool:
    config = VAEConfig.from_dict(get_model(ctx.db, es.model_id).config["model"])
    dataset_id, offset = part_at(ctx.db, es.id, start)
    data = dataset_array(ctx.artifacts, get_dataset(ctx.db, dataset_id),
                         str(ctx.settings.cache_dir))
    return all(is_binary(gather_rows(data, rows, config).numpy())
               for rows in np.array_split(np.arange(start - offset, stop - offset),
                                          max(1, (stop - start) // CHUNK_ROWS)))


def finish_set(ctx: Context, job_id: int, set_id: int, owner: str,
               results: list[dict[str, Any]]) -> dict[str, Any]:
    """Every shard is written: check the count, take the means, and mark the set ready
    (and the job succeeded) at once; the index follows in `embed_index`."""
    job, es = get_job(ctx.db, job_id), get_set(ctx.db, set_id)
    if job.status != "running" or job.lease_owner != owner:
        return {"outcome": "stale"}
    append = job.params.get("append")
    if job.cancel_requested or any(r.get("cancelled") for r in results):
        finish(ctx.db, job_id, owner, "cancelled", message="cancelled; no rows are kept" + (
            " of the append; the set is as it was" if append else ""))
        return {"outcome": "cancelled"}
    if append:
        return _finish_append(ctx, job, set_id, owner, results, append)
    mark_finishing(ctx.db, job_id, set_id, owner)  # LeaseLost if a newer attempt took over
    with Lease(ctx.db, job_id, owner, ctx.settings.embed_lease_seconds) as lease:
        lease.report(0.98, "checking the rows")
        stats = set_statistics(ctx.db, set_id)
        analyze(ctx.db, partition_name(set_id))  # the planner sees the rows before a search
        lease.check()
    stats |= {"shards": len(results),
              "workers": dict(Counter(r.get("worker", "?") for r in results)),
              "likelihood_kind": _kind(ctx, job, es, results)}
    if not results:
        stats["finished_by"] = "maintenance, after the attempt stalled"
    if stats["n_items"] != es.n_items:  # never mark a short set ready
        raise RuntimeError(f"set {set_id} holds {stats['n_items']} rows, not {es.n_items}")
    # The set is ready and owed its index in one transaction; the task is sent after the
    # commit. A worker (or broker) that fails between the two leaves a set the
    # maintenance pass finds owed and unsent, and sends for (store.indexes.stuck_indexes).
    finish(ctx.db, job_id, owner, "succeeded",
           message=f"{stats['n_items']} items embedded; searchable now (exact search) while "
                   "the index is built",
           embedding_set={"stats": stats, **index_owed()})
    publish_index(ctx.db, ctx.sender, set_id)
    return {"outcome": "succeeded", "stats": stats}


def _finish_append(ctx: Context, job: Any, set_id: int, owner: str,
                   results: list[dict[str, Any]], append: dict[str, Any]) -> dict[str, Any]:
    """Every shard of an append is written: check the count, refresh the set's statistics
    (over all its items) and count the new items in, in the job's finishing transaction.
    The set's HNSW index took the rows as they were inserted; a set that had none gets one
    once it is large enough."""
    job_id = job.id
    want = int(append["start"]) + int(append["n_items"])
    with Lease(ctx.db, job_id, owner, ctx.settings.embed_lease_seconds) as lease:
        lease.report(0.98, "checking the rows")
        stats = set_statistics(ctx.db, set_id)
        analyze(ctx.db, partition_name(set_id))
        lease.check()
    if stats["n_items"] != want:  # never count a short append in
        raise RuntimeError(f"set {set_id} holds {stats['n_items']} rows, not {want}")
    es = get_set(ctx.db, set_id)
    old = es.stats or {}
    stats |= {k: old[k] for k in ("knn_label_accuracy", "index") if k in old}
    kind = _kind(ctx, job, es, results)
    stats["likelihood_kind"] = "unnormalised" if "unnormalised" in (
        kind, old.get("likelihood_kind")) else kind
    stats["appends"] = int(old.get("appends", 0)) + 1
    # a set that had no index gets one once it is large enough: owed in the same
    # transaction that counts the append in (see finish_set)
    owed = es.index_status in ("none", "skipped") and want >= ctx.settings.exact_search_below
    finish(ctx.db, job_id, owner, "succeeded",
           message=f"{append['n_items']} items appended; the set holds {want}",
           embedding_set={"stats": stats, **(index_owed() if owed else {})})
    if owed:
        publish_index(ctx.db, ctx.sender, set_id)
    return {"outcome": "succeeded", "stats": stats}


def _build_figures(build: dict[str, Any] | None) -> dict[str, Any]:
    """What the build was given and whether its graph fitted, for the set's stats."""
    keys = ("workers", "memory_mb", "needed_mb", "fits", "index_mb", "vacuum_seconds")
    return {k: build[k] for k in keys if k in build} if build else {}


def index_set(ctx: Context, set_id: int, owner: str) -> dict[str, Any]:
    """Build a ready set's owed index under a lease, then measure kNN label accuracy
    through it, both into the set's stats; a delivery that finds the build held by a live
    worker, or not owed, does nothing."""
    got = claim_index(ctx.db, set_id, owner, ctx.settings.index_lease_seconds,
                      ctx.settings.index_max_attempts, owner_is_dead)
    if got != "claimed":
        log.info("index build skipped set_id=%d outcome=%s", set_id, got)
        return {"outcome": got}
    with IndexLease(ctx.db, set_id, owner, ctx.settings.index_lease_seconds) as lease:
        report = build_index(ctx.db, set_id, ctx.settings, owner=owner)
    if lease.lost or not report.written:  # another build took the set over: its outcome
        log.warning("index build superseded set_id=%d owner=%s", set_id, owner)
        return {"outcome": "superseded"}
    accuracy = knn_label_accuracy(ctx, set_id)
    stats = {**(get_set(ctx.db, set_id).stats or {}), "knn_label_accuracy": accuracy,
             "index": {"status": report.status, "build_seconds": report.build_seconds,
                       "ef_search": report.ef_search,
                       "calibration_recall": {str(k): v for k, v in report.recall.items()},
                       **_build_figures(report.build)}}
    if not record_index_stats(ctx.db, set_id, stats):  # a newer build owns the set now
        log.warning("index statistics superseded set_id=%d owner=%s", set_id, owner)
        return {"outcome": "superseded"}
    log.info("set indexed set_id=%d status=%s seconds=%.1f knn_label_accuracy=%s", set_id,
             report.status, report.build_seconds, accuracy)
    return {"outcome": report.status}
