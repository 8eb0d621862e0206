"""Datasets in tests: a name per test, and what registering left behind (rows and files)."""

import os


def counts(db):
    """(datasets, items) rows stored now."""
    from sqlalchemy import func, select

    from store.tables import Dataset, Item

    with db.session() as s:
        return s.scalar(select(func.count()).select_from(Dataset)), s.scalar(
            select(func.count()).select_from(Item))


def stored_files(artifacts):
    found = []
    for root, _, files in os.walk(artifacts.root):
        found += [os.path.join(root, f) for f in files]
    return sorted(found)


def unique_name(request):
    return f"{request.node.name}"[:190]
