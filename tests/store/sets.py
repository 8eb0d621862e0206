"""Embedding sets for tests, made the way the service makes them: submitted
(`store.submit.submit_embedding`), claimed by their job, written through `latent_writer`,
then ended by the job; and what tests read back of them."""

from sqlalchemy import select

from store.indexes import index_owed
from store.jobs import claim, finish, mark_finishing
from store.latent_rows import latent_writer
from store.retrieval import set_statistics
from store.submit import submit_embedding
from store.tables import EmbeddingSetPart, Model


def model_row(db, dataset_id, dim):
    """A ready model row of `dim` latent dimensions over the dataset (no files): what a
    set needs when only its latents matter."""
    with db.session() as s:
        model = Model(dataset_id=dataset_id, status="ready",
                      config={"model": {"input_shape": [1], "latent_dim": dim}})
        s.add(model)
        s.flush()
        return model.id


def writing_set(db, model_id, dataset_id, importance_samples=0):
    """(set id, job id, owner) of a set submitted and claimed by its job: `writing`."""
    job, _ = submit_embedding(db, model_id, dataset_id, importance_samples)
    owner = f"test-owner-{job.id}"
    assert claim(db, job.id, owner, 3600).outcome == "claimed"
    return job.embedding_set_id, job.id, owner


def end_set(db, set_id, job_id, owner, status="ready", owed_index=False):
    """The set's job ends: `ready` (succeeded; `owed_index`: owed its index build, as the
    worker leaves it), or `finishing` (every shard written, the job still running)."""
    if status == "finishing":
        mark_finishing(db, job_id, set_id, owner)
        return
    finish(db, job_id, owner, "succeeded", embedding_set=index_owed() if owed_index else None)


def ready_set(db, model_id, dataset_id, write, importance_samples=0, owed_index=False):
    """A set written by `write(set_id)` and made ready by its job; returns its id."""
    set_id, job_id, owner = writing_set(db, model_id, dataset_id, importance_samples)
    write(set_id)
    end_set(db, set_id, job_id, owner, owed_index=owed_index)
    return set_id


def write_latents(db, set_id, first_index, mu, logvar, elbo, reconstruction, kl, log_px=None,
                  chunk_rows=50_000, guard=None):
    """Write one whole shard from arrays through `latent_writer`, `chunk_rows` at a time;
    returns the rows written."""
    n = len(mu)
    with latent_writer(db, set_id, first_index, n, guard) as write:
        for a in range(0, n, chunk_rows):
            b = min(n, a + chunk_rows)
            write(mu[a:b], logvar[a:b], elbo[a:b], reconstruction[a:b], kl[a:b],
                  None if log_px is None else log_px[a:b])
    return n


def count_latents(db, set_id):
    return set_statistics(db, set_id)["n_items"]


def set_parts(db, set_id):
    """The datasets the set holds, in position order."""
    with db.session() as s:
        return list(s.scalars(select(EmbeddingSetPart).where(EmbeddingSetPart.set_id == set_id)
                              .order_by(EmbeddingSetPart.start)))
