"""Getting data in: readers of every format users hold (arrays, tables, images in folders,
archives, WebDataset shards and parquet columns, IDX files), each streaming chunks in
bounded memory into `store.datasets.register_dataset`.

A layer of its own between its callers (the API's synchronous uploads, the ingest jobs
the workers run, the serving routes that decode a query image) and `store/`: it imports
the data layer and NumPy/Pillow/pyarrow, never torch, the API or the workers.
"""
