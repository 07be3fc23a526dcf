"""${message}

Revision ID: ${up_revision}
Revises: ${comma(down_revision) or "(base)"}
Create Date: ${create_date}

Runs on every shard, one shard at a time, each in its own transaction. Keep it additive and
idempotent: add columns before code reads them, never rename, `if_not_exists=True` where the op has it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
