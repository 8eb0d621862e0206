"""The client's typed results against the server's OpenAPI: a field renamed or dropped on
either side fails here. (Importing the server is allowed in tests, never in the client.)"""

import dataclasses

import pytest
from latentbank_client import (
    Alias,
    AliasEvent,
    ApiKey,
    CreatedKey,
    Dataset,
    DatasetItems,
    EmbeddingSet,
    Encoded,
    Hit,
    Item,
    Job,
    MetricRow,
    Model,
    Projection,
    Sample,
    Scores,
    Threshold,
    Traversal,
    WhoAmI,
)

SCHEMAS = {
    Dataset: "DatasetOut", Job: "JobOut", Model: "ModelOut", EmbeddingSet: "EmbeddingSetOut",
    Hit: "HitOut", Item: "ItemOut", Scores: "ScoreOut", Threshold: "ScoreThreshold",
    Encoded: "EncodeOut", Sample: "SampleOut", Traversal: "TraverseOut",
    MetricRow: "MetricRow", Projection: "ProjectionOut", Alias: "AliasOut",
    AliasEvent: "AliasEventOut", ApiKey: "KeyOut", CreatedKey: "CreatedKeyOut",
    WhoAmI: "WhoAmIOut", DatasetItems: "DatasetItemsOut",
}


@pytest.fixture(scope="module")
def openapi(tmp_path_factory):
    """The server's OpenAPI document, from an app built with test settings (nothing is
    connected: the database and broker are only named)."""
    from service.api.app import create_app
    from store.settings import Settings

    folder = tmp_path_factory.mktemp("openapi")
    settings = Settings(database_url="postgresql+psycopg://u:p@127.0.0.1:9/none",
                        redis_url="redis://127.0.0.1:9/0", data_dir=folder / "data",
                        artifacts=(folder / "artifacts").as_uri())
    return create_app(settings).openapi()


def public_fields(cls):
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def drift(cls, schema):
    """The client's fields missing from the server's schema (fields the server adds are
    welcome: results ignore what they do not know)."""
    properties = schema.get("properties", {})
    return sorted({f.name for f in public_fields(cls)} - set(properties))


@pytest.mark.parametrize("cls", list(SCHEMAS), ids=lambda c: c.__name__)
def test_every_field_exists_on_the_server(cls, openapi):
    missing = drift(cls, openapi["components"]["schemas"][SCHEMAS[cls]])
    assert missing == [], f"{cls.__name__} fields absent from {SCHEMAS[cls]}: {missing}"


def test_a_renamed_field_would_be_caught(openapi):
    schema = openapi["components"]["schemas"]["HitOut"]
    renamed = {**schema, "properties": {("dist" if k == "distance" else k): v
                                        for k, v in schema["properties"].items()}}
    assert drift(Hit, renamed) == ["distance"]


def test_the_routes_the_client_calls_exist(openapi):
    paths = openapi["paths"]
    for path, method in [
            ("/v1/datasets", "post"), ("/v1/datasets/{dataset_id}", "get"),
            ("/v1/datasets/{dataset_id}/items", "get"),
            ("/v1/datasets/{dataset_id}/thumbnails.png", "get"),
            ("/v1/training-jobs", "post"), ("/v1/sweeps", "post"),
            ("/v1/embedding-jobs", "post"), ("/v1/jobs/{job_id}", "get"),
            ("/v1/jobs/{job_id}/events", "get"), ("/v1/jobs/{job_id}/cancel", "post"),
            ("/v1/models/{model_id}", "get"), ("/v1/models/{model_id}/decode", "post"),
            ("/v1/models/{model_id}/sample", "post"), ("/v1/models/{model_id}/encode", "post"),
            ("/v1/models/{model_id}/score", "post"), ("/v1/models/{model_id}/traverse", "post"),
            ("/v1/models/{model_id}/interpolate", "post"),
            ("/v1/models/{model_id}/reconstruct", "post"),
            ("/v1/models/{model_id}/metrics", "get"),
            ("/v1/models/{model_id}/plots/curves.png", "get"),
            ("/v1/embeddings/{set_id}/search", "post"),
            ("/v1/embeddings/{set_id}/search/batch", "post"),
            ("/v1/embeddings/{set_id}/outliers", "get"),
            ("/v1/embeddings/{set_id}/export", "get"),
            ("/v1/embeddings/{set_id}/projection", "get"),
            ("/v1/embeddings/{set_id}/items/{key}", "get"),
            ("/v1/aliases/{name}", "put"), ("/v1/keys", "post"), ("/v1/whoami", "get")]:
        assert method in paths.get(path, {}), f"{method.upper()} {path} is not served"
    # the submissions whose retries rely on the server honouring Idempotency-Key
    for path in ("/v1/datasets", "/v1/training-jobs", "/v1/embedding-jobs", "/v1/sweeps"):
        names = {p["name"] for p in paths[path]["post"].get("parameters", [])}
        assert "Idempotency-Key" in names, path
