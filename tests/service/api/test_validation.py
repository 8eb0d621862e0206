"""Training submissions checked at the API's edge: normalised configurations, grids."""

import time

import pytest

from service.api.validation import MAX_SWEEP, expand_grid, sweep_configs, training_config
from store.errors import InvalidInput


def test_a_training_request_becomes_the_full_normalised_configuration():
    config = training_config([1, 8, 8], {"latent_dim": 3}, {"epochs": 2})
    assert config["model"]["input_shape"] == [1, 8, 8]
    assert config["model"]["latent_dim"] == 3
    assert config["training"]["epochs"] == 2
    assert {"likelihood", "hidden", "beta"} <= set(config["model"])  # defaults filled in


def test_bad_requests_name_what_is_wrong():
    with pytest.raises(InvalidInput, match="latent_dim"):
        training_config([4], {"latent_dim": 0}, {})
    with pytest.raises(InvalidInput, match="must be objects"):
        training_config([4], [], {})
    with pytest.raises(InvalidInput, match=r"does not fit the dataset's items \[4\]"):
        training_config([4], {"family": "conv", "input_shape": [1, 8, 8]}, {})


def test_a_grid_expands_to_every_combination_and_validates_each():
    configs = sweep_configs([4], {"latent_dim": 2}, {"epochs": 1},
                            {"model.latent_dim": [2, 3], "training.epochs": [1, 2, 5]})
    got = sorted((c["model"]["latent_dim"], c["training"]["epochs"]) for c in configs)
    assert got == [(a, b) for a in (2, 3) for b in (1, 2, 5)]
    with pytest.raises(InvalidInput, match="latent_dim"):
        sweep_configs([4], {}, {}, {"model.latent_dim": [2, -1]})
    with pytest.raises(InvalidInput, match=f"the limit is {MAX_SWEEP}"):
        expand_grid({"model.latent_dim": list(range(1, MAX_SWEEP + 2))})
    with pytest.raises(InvalidInput, match="model.<field>"):
        expand_grid({"latent_dim": [1]})


def test_a_grids_size_is_computed_before_anything_is_expanded():
    # 10^12 points: building them would take hours and all memory; refused at once
    grid = {f"model.f{i}": list(range(10)) for i in range(12)}
    started = time.perf_counter()
    with pytest.raises(InvalidInput, match=r"sweep has 1000000000000 configurations "
                                           r"\(10 x 10 x .* values\); the limit is 64 "
                                           r"\(LATENTBANK_SWEEP_MAX_CONFIGS\)"):
        expand_grid(grid)
    assert time.perf_counter() - started < 0.1
    with pytest.raises(InvalidInput, match=r"the limit is 5 \(LATENTBANK_SWEEP_MAX_CONFIGS"):
        sweep_configs([4], {}, {}, {"model.latent_dim": [1, 2, 3], "model.beta": [1, 2]},
                      max_configs=5)
    assert len(expand_grid({"model.latent_dim": list(range(1, 65))})) == 64  # the limit
    with pytest.raises(InvalidInput, match=r"varies 17 fields; the limit is 16 "
                                           r"\(LATENTBANK_SWEEP_MAX_FIELDS\)"):
        expand_grid({f"model.f{i}": [1] for i in range(17)})
    assert len(expand_grid({f"model.f{i}": [1] for i in range(16)})) == 1
