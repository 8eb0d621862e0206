"""Jobs made as the API makes them: validated at the edge, then written by the store."""

from service.api.validation import sweep_configs, training_config
from store.submit import submit_sweep, submit_training


def submit_train(db, dataset, model, training, **kwargs):
    """A training submission as the API makes it: validated at the edge, then written."""
    return submit_training(db, dataset.id, training_config(dataset.item_shape, model, training),
                           **kwargs)


def submit_grid(db, dataset, model, training, grid, **kwargs):
    """A sweep as the API submits it: every grid point validated, then written."""
    return submit_sweep(db, dataset.id, sweep_configs(dataset.item_shape, model, training, grid),
                        **kwargs)
