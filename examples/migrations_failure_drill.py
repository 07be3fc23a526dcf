"""Alembic across shards, end to end on four throwaway PostgreSQL servers: the failure drill.

    python -m examples.migrations_failure_drill

1. ``alembic upgrade head``: every shard gets the demo schema, one shard after another;
2. a new revision meets a table that exists on shard 3 only: shards 1-2 migrate, shard 3 rolls back
   (transactional DDL), shard 4 is not attempted, the command exits non-zero with a per-shard summary;
3. the stray table is removed; the same command continues where it stopped;
4. ``shardkit migrations status`` confirms every shard is at head.

Needs the PostgreSQL server binaries (see docs/development.md); takes a few seconds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from sa_shardkit.testing import local_fleet

REPO = Path(__file__).resolve().parent.parent

LOYALTY_REVISION = '''"""Loyalty: a tier column and a cards table."""

import sqlalchemy as sa
from alembic import op

revision = "drill_loyalty"
down_revision = {head!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("customers", sa.Column("loyalty_tier", sa.String(20), nullable=True))
    op.create_table(
        "loyalty_cards",
        sa.Column("customer_id", sa.BigInteger(), primary_key=True),
        sa.Column("card_no", sa.String(32), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("loyalty_cards")
    op.drop_column("customers", "loyalty_tier")
'''


def run(*argv: str, cwd: Path) -> int:
    """Run a command as an operator would, echoing it and its output."""
    print(f"\n$ {' '.join(argv)}", flush=True)
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    print(result.stdout.rstrip())
    print(f"(exit code {result.returncode})", flush=True)
    return result.returncode


def sql(url: str, statement: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(text(statement))
    engine.dispose()


def main() -> None:
    with local_fleet(4) as fleet, tempfile.TemporaryDirectory(prefix="shardkit-drill-") as tmp:
        root = Path(tmp)
        shutil.copytree(
            REPO / "migrations", root / "migrations", ignore=shutil.ignore_patterns("__pycache__")
        )
        shards = {f"shard-{i}": url for i, url in enumerate(fleet.urls, 1)}
        ini = (
            (REPO / "alembic.ini")
            .read_text()
            .replace(
                "[shardkit]\n",
                f"[shardkit]\nshards = {', '.join(shards)}\n"
                + "".join(f"{s}.url = {u}\n" for s, u in shards.items()),
                1,
            )
        )
        (root / "alembic.ini").write_text(ini)
        alembic = [sys.executable, "-m", "alembic"]  # its INFO log lines go to stderr, not shown here

        run(*alembic, "upgrade", "head", cwd=root)

        head = subprocess.run(
            [*alembic, "heads"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.split()[0]
        (root / "migrations" / "versions" / "drill_loyalty.py").write_text(LOYALTY_REVISION.format(head=head))
        print("\n# a table named loyalty_cards already exists on shard 3 (created by hand, say)")
        sql(shards["shard-3"], "CREATE TABLE loyalty_cards (legacy_id integer)")
        failed = run(*alembic, "upgrade", "head", cwd=root)
        assert failed != 0

        print("\n# the stray table is dropped; the same command continues where it stopped")
        sql(shards["shard-3"], "DROP TABLE loyalty_cards")
        assert run(*alembic, "upgrade", "head", cwd=root) == 0
        assert run(sys.executable, "-m", "sa_shardkit", "migrations", "status", cwd=root) == 0


if __name__ == "__main__":
    main()
