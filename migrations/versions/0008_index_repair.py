"""An embedding set's index build as a repairable task: the set records that it is owed
an index (`index_requested_at`, in the same transaction that marks it ready), when the
task was sent (`index_sent_at`), which process builds it under a lease
(`index_owner`, `index_lease_expires_at`), how many builds started (`index_attempts`)
and why the index failed (`index_error`). The maintenance pass sends again an index task
the broker missed, takes over a build whose worker died, and marks the index `failed`
after the attempts run out, so no set stays `building` for good.

Sets already `building` when this runs have none of these: the next maintenance pass
sends their task again. No view changes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 05:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

TIMES = ('index_requested_at', 'index_sent_at', 'index_lease_expires_at')


def upgrade() -> None:
    for name in TIMES:
        op.add_column('embedding_sets', sa.Column(name, sa.DateTime(timezone=True),
                                                  nullable=True))
    op.add_column('embedding_sets', sa.Column('index_owner', sa.Text(), nullable=True))
    op.add_column('embedding_sets', sa.Column('index_attempts', sa.Integer(),
                                              server_default='0', nullable=False))
    op.add_column('embedding_sets', sa.Column('index_error', sa.Text(), nullable=True))


def downgrade() -> None:
    for name in ('index_error', 'index_attempts', 'index_owner', *reversed(TIMES)):
        op.drop_column('embedding_sets', name)
