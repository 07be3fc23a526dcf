"""What the migration lint costs: a 50-revision history, against Alembic's own offline rendering.

Baseline: ``alembic upgrade base:head --sql`` with a plain single-database env.py (the SQL the lint
renders too). Then the lint with the sharding rules only, and with squawk. Best of 3; one process.

Run: python benchmarks/lint.py
"""

from __future__ import annotations

import io
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config

from sa_shardkit.lint import lint_script_directory

REVISIONS = 50
ROUNDS = 3
MODELS = "sa_shardkit.demo.models:Base"

ENV = """
from alembic import context
context.configure(url="postgresql+psycopg://", literal_binds=True, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
"""

BODY = """
    op.execute("SET LOCAL lock_timeout = '2s'")
    op.execute("SET LOCAL statement_timeout = '5min'")
    op.add_column("customers", sa.Column("c{n}", sa.Text(), nullable=True), if_not_exists=True)
    op.execute("UPDATE customers SET c{n} = name WHERE c{n} IS NULL")
    with op.get_context().autocommit_block():
        op.create_index("ix_customers_c{n}", "customers", ["c{n}"], postgresql_concurrently=True, if_not_exists=True)
"""


def write_history(root: Path) -> Config:
    versions = root / "versions"
    versions.mkdir(parents=True)
    (root / "env.py").write_text(ENV)
    previous = None
    for n in range(1, REVISIONS + 1):
        rev = f"{n:04d}"
        (versions / f"{rev}_step.py").write_text(
            f'"""step {n}"""\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
            f"revision = {rev!r}\ndown_revision = {previous!r}\n\n\ndef upgrade():\n"
            + textwrap.indent(textwrap.dedent(BODY.format(n=n)).strip(), "    ")
            + "\n"
        )
        previous = rev
    config = Config(stdout=io.StringIO(), output_buffer=io.StringIO())
    config.set_main_option("script_location", str(root))
    return config


def best(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "migrations"
        config = write_history(root)
        baseline = best(lambda: command.upgrade(config, "base:head", sql=True))
        rules = best(lambda: lint_script_directory(root, models=MODELS, squawk=False))
        full = best(lambda: lint_script_directory(root, models=MODELS))
        report = lint_script_directory(root, models=MODELS)
    assert report.ok, [f.rule_id for f in report.findings]
    per = 1000 / REVISIONS
    print(f"{REVISIONS} revisions, best of {ROUNDS}:")
    print(f"alembic upgrade --sql (baseline):   {baseline * per:7.2f} ms/revision")
    print(
        f"lint, sharding rules only:          {rules * per:7.2f} ms/revision  ({rules / baseline:.2f}x baseline)"
    )
    print(
        f"lint, sharding rules + squawk:      {full * per:7.2f} ms/revision  ({full / baseline:.2f}x baseline)"
    )


if __name__ == "__main__":
    main()
