"""A new shard joins ready: at the fleet's Alembic revision (the project's own migrations) and with
the reference rows before the first key moves; when that cannot be done, nothing moves."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import func, select, text

from sa_shardkit import HashRing, RebalanceError, ShardManager
from sa_shardkit.cli import main as shardkit
from sa_shardkit.demo.models import Base, Customer, Product
from sa_shardkit.rebalance import RebalanceProgress, add_shard, install_ring, load_ring_state
from tests.alembic_support import AlembicProject, execute_on, revision_on, tables_on
from tests.rebalance_data import seed

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS = 60


@pytest.fixture
def project(tmp_path: Path, shard_map: dict[str, str]) -> AlembicProject:
    """The project's migrations at head on the four shards, demo rows seeded, ring version 1 stored."""
    project = AlembicProject(tmp_path, shard_map)
    command.upgrade(project.config(), "head")
    with ShardManager.from_urls(shard_map) as manager:
        seed(manager, FOUR, CUSTOMERS, 2, 1)
        install_ring(manager, FOUR)
    return project


def _library_tables(url: str) -> set[str]:
    return {t for t in tables_on(url) if not t.startswith("shardkit_in_")}


def test_add_shard_migrates_the_new_shard_to_the_fleet_revision_before_any_key_moves(
    project: AlembicProject, shard_map: dict[str, str], shard5_url: str
) -> None:
    seen: list[tuple[tuple[str, ...], set[str], int]] = []

    def on_progress(p: RebalanceProgress) -> None:
        if p.phase == "move" and not seen:  # the first report of the move: no key has moved yet
            with ShardManager.from_urls({"shard-5": shard5_url}) as direct, direct.connect("shard-5") as conn:
                products = conn.execute(select(func.count()).select_from(Product)).scalar_one()
            seen.append((revision_on(shard5_url), _library_tables(shard5_url), products))

    with ShardManager.from_urls({**shard_map, "shard-5": shard5_url}) as operator:
        assert revision_on(shard5_url) == ()
        result = add_shard(operator, "shard-5", Base, migrations=project.config(), progress=on_progress)
        assert result.new == FIVE and result.rows_moved > 0
    assert seen, "no progress report during the move"
    revision, tables, products = seen[0]
    assert revision == (project.head,)
    assert tables == _library_tables(shard_map["shard-1"])  # alembic_version, saga, 2PC, sequences, ...
    assert {"alembic_version", "shardkit_sagas", "shardkit_2pc_decisions"} <= tables
    assert products == 1  # the reference rows came first, too


def test_a_fleet_on_alembic_refuses_a_new_shard_it_cannot_migrate(
    project: AlembicProject, shard_map: dict[str, str], shard5_url: str
) -> None:
    with ShardManager.from_urls({**shard_map, "shard-5": shard5_url}) as operator:
        with pytest.raises(RebalanceError, match="pass the Alembic config"):
            add_shard(operator, "shard-5", Base)
        execute_on(
            shard5_url,
            "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)",
            "INSERT INTO alembic_version VALUES ('zzzz_unknown')",
        )
        with pytest.raises(RebalanceError, match="could not migrate joining shard 'shard-5'"):
            add_shard(operator, "shard-5", Base, migrations=project.config())
        state = load_ring_state(operator)
        assert state is not None and state.version == 1 and state.target is None  # nothing started
        with operator.connect("shard-5") as conn:
            assert conn.execute(text("SELECT to_regclass('customers')")).scalar() is None


def test_shardkit_rebalance_add_migrates_the_new_shard(
    project: AlembicProject, shard_map: dict[str, str], shard5_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shardkit(
        ["rebalance", "--config", str(project.ini), "--add", "shard-5", shard5_url]
    )  # returns on success
    assert revision_on(shard5_url) == (project.head,)
    with ShardManager.from_urls({**shard_map, "shard-5": shard5_url}) as manager:
        with manager.connect("shard-5") as conn:
            moved = conn.execute(select(func.count()).select_from(Customer)).scalar_one()
    assert moved == len([k for k in range(1, CUSTOMERS + 1) if FIVE.get_shard(k) == "shard-5"])
