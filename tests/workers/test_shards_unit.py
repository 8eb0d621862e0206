"""How an embedding job cuts its dataset into shard tasks."""

from workers.shards import rows_per_shard, shard_ranges


def test_embedding_shards_shrink_with_the_importance_samples():
    # the same work per shard: rows x max(K, 100) about base x 100
    assert rows_per_shard(50_000, 0) == rows_per_shard(50_000, 100) == 50_000
    assert rows_per_shard(50_000, 1000) == 5000
    assert rows_per_shard(50_000, 5000) == 1000
    assert rows_per_shard(50_000, 100_000) == 256  # the floor
    assert rows_per_shard(400, 5000) == 256  # a small base keeps at least min(base, 256)
    assert rows_per_shard(100, 5000) == 100
    shards = shard_ranges(10_000, rows_per_shard(50_000, 5000))
    assert len(shards) == 10 and shards[0] == (0, 1000) and shards[-1] == (9000, 10_000)
