"""latentbank_client: the Python client of the latentbank HTTP API.

    import numpy as np
    from latentbank_client import Client

    client = Client()                                   # or Client(url=..., key=...)
    ds = client.datasets.add(np.random.rand(500, 64).astype("float32"), name="demo")
    job = client.models.train(ds.id, model={"family": "mlp", "latent_dim": 4},
                              training={"epochs": 3})
    model = job.wait(progress=True).model()

`AsyncClient` offers the same with `await`. Every failure is a `LatentbankError`.
"""

__version__ = "0.1.0"

from latentbank_client._core import RetryPolicy
from latentbank_client._datasets import Dataset
from latentbank_client._embeddings import EmbeddingSet
from latentbank_client._jobs import Job
from latentbank_client._models import Model
from latentbank_client.client import AsyncClient, Client
from latentbank_client.errors import (
    Conflict,
    ConnectionFailed,
    Forbidden,
    InvalidInput,
    JobFailed,
    LatentbankError,
    NotFound,
    RateLimited,
    ServerError,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnreadableAnswer,
    WaitTimeout,
)
from latentbank_client.results import (
    Alias,
    AliasEvent,
    ApiKey,
    CreatedKey,
    DatasetItems,
    Encoded,
    Hit,
    Item,
    MetricRow,
    Outliers,
    Projection,
    Sample,
    Scores,
    SearchResult,
    Threshold,
    Traversal,
    WhoAmI,
)

__all__ = [
    "Alias", "AliasEvent", "ApiKey", "AsyncClient", "Client", "Conflict", "ConnectionFailed",
    "CreatedKey", "Dataset", "DatasetItems", "EmbeddingSet", "Encoded", "Forbidden", "Hit",
    "InvalidInput",
    "Item", "Job", "JobFailed", "LatentbankError", "MetricRow", "Model", "NotFound",
    "Outliers", "Projection", "RateLimited", "RetryPolicy", "Sample", "Scores",
    "SearchResult", "ServerError", "Threshold", "TooLarge", "Traversal", "Unauthorized",
    "Unavailable", "UnreadableAnswer", "WaitTimeout", "WhoAmI",
]
