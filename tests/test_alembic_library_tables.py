"""Autogenerate never proposes dropping sa_shardkit's own tables, whatever metadata env.py passes."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command

from tests.alembic_support import AlembicProject, execute_on

# The env.py a user writes from the docs: only the application's models, no saga_metadata.
PLAIN_ENV = """
from sa_shardkit.alembic import run_migrations
from sa_shardkit.demo.models import Base

run_migrations(Base.metadata)
"""

LIBRARY_TABLES = ["shardkit_ring_state", "shardkit_in_orders", "shardkit_lookup_customer_email"]


@pytest.fixture
def project(tmp_path: Path, shard_map: dict[str, str]) -> AlembicProject:
    project = AlembicProject(tmp_path, shard_map)
    (project.migrations / "env.py").write_text(PLAIN_ENV)
    command.upgrade(project.config(), "head")  # sagas, receipts, 2PC decisions, sequences
    for url in shard_map.values():
        execute_on(
            url,
            *(f"CREATE TABLE {name} (k bigint PRIMARY KEY)" for name in LIBRARY_TABLES),
            "CREATE INDEX ix_shardkit_in_orders_k ON shardkit_in_orders (k)",
            "CREATE TABLE stray_table (k bigint PRIMARY KEY)",  # the user's own: still proposed
        )
    return project


def generated(project: AlembicProject, rev_id: str) -> str:
    command.revision(project.config(), "autogen", autogenerate=True, rev_id=rev_id)
    return next(project.versions.glob(f"{rev_id}_*.py")).read_text()


def test_autogenerate_leaves_every_library_table_alone(project: AlembicProject) -> None:
    source = generated(project, "auto_lib")
    dropped = [line.strip() for line in source.splitlines() if "op.drop_" in line]
    assert not [line for line in dropped if "shardkit_" in line], dropped
    assert 'op.drop_table("stray_table")' in source  # the filter is narrow: other drops still appear


def test_a_user_include_name_hook_still_applies(project: AlembicProject) -> None:
    env = PLAIN_ENV.replace(
        "run_migrations(Base.metadata)",
        "run_migrations(Base.metadata, include_name=lambda name, type_, parents: name != 'stray_table')",
    )
    (project.migrations / "env.py").write_text(env)
    source = generated(project, "auto_user")
    assert "stray_table" not in source
    assert "shardkit_" not in source
