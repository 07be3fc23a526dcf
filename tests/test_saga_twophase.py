"""Two-phase commit across shards: all or nothing, and an in-doubt resolver for crashed coordinators."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection

from sa_shardkit import ShardManager, TwoPhaseAbortedError
from sa_shardkit.cli import main
from sa_shardkit.saga import commit_across_shards, create_saga_tables, resolve_in_doubt

PARTICIPANTS = ["shard-2", "shard-3"]  # coordinator: shard-2 (first sorted id)


def setup(manager: ShardManager) -> None:
    create_saga_tables(manager)
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).begin() as conn:
            conn.execute(text("CREATE TABLE ledger (entry text PRIMARY KEY)"))


def write(entry: str) -> object:
    def work(conn: Connection) -> None:
        conn.execute(text("INSERT INTO ledger VALUES (:entry)"), {"entry": entry})

    return work


def entries(manager: ShardManager) -> dict[str, list[str]]:
    found = {}
    for shard_id in PARTICIPANTS:
        with manager.engine(shard_id).connect() as conn:
            found[shard_id] = list(conn.execute(text("SELECT entry FROM ledger ORDER BY entry")).scalars())
    return found


def prepared(manager: ShardManager) -> dict[str, int]:
    counts = {}
    for shard_id in PARTICIPANTS:
        with manager.engine(shard_id).connect() as conn:
            counts[shard_id] = conn.execute(text("SELECT count(*) FROM pg_prepared_xacts")).scalar_one()
    return counts


def test_commit_across_shards_commits_on_every_participant(manager: ShardManager) -> None:
    setup(manager)

    commit_across_shards(manager, {s: write(f"on-{s}") for s in PARTICIPANTS})  # type: ignore[misc]

    assert entries(manager) == {s: [f"on-{s}"] for s in PARTICIPANTS}
    assert prepared(manager) == {s: 0 for s in PARTICIPANTS}


def test_a_failing_participant_commits_nothing_anywhere(manager: ShardManager) -> None:
    setup(manager)
    with manager.engine("shard-3").begin() as conn:
        conn.execute(text("INSERT INTO ledger VALUES ('taken')"))

    with pytest.raises(Exception, match="duplicate key"):
        commit_across_shards(manager, {"shard-2": write("fine"), "shard-3": write("taken")})  # type: ignore[dict-item]

    assert entries(manager) == {"shard-2": [], "shard-3": ["taken"]}
    assert prepared(manager) == {s: 0 for s in PARTICIPANTS}


COORDINATOR = textwrap.dedent(
    """
    import os, signal, sys
    from sqlalchemy import text
    from sa_shardkit import ShardManager
    from sa_shardkit.saga import commit_across_shards

    urls, point = sys.argv[1].split(","), sys.argv[2]

    def work(entry):
        return lambda conn: conn.execute(text("INSERT INTO ledger VALUES (:e)"), {"e": entry})

    def die(txid, checkpoint):
        if checkpoint == point:
            os.kill(os.getpid(), signal.SIGKILL)

    manager = ShardManager.from_urls(urls)
    commit_across_shards(manager, {"shard-2": work("a"), "shard-3": work("b")}, on_checkpoint=die)
    """
)


def crash_coordinator(shard_urls: list[str], point: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", COORDINATOR, ",".join(shard_urls), point],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr


def test_coordinator_killed_between_prepare_and_decision_is_rolled_back_by_the_resolver(
    manager: ShardManager, shard_urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    setup(manager)
    crash_coordinator(shard_urls, "prepared")
    assert prepared(manager) == {s: 1 for s in PARTICIPANTS}  # in doubt: nothing visible yet
    assert entries(manager) == {s: [] for s in PARTICIPANTS}

    young = resolve_in_doubt(manager, older_than=60)  # the coordinator might still be alive: wait
    assert len(young.waiting) == 2 and prepared(manager) == {s: 1 for s in PARTICIPANTS}

    main(["recover", "--in-doubt-after", "0", *[arg for url in shard_urls for arg in ("--url", url)]])

    assert "in-doubt 2PC: 0 committed, 2 rolled back, 0 waiting" in capsys.readouterr().out
    assert prepared(manager) == {s: 0 for s in PARTICIPANTS}
    assert entries(manager) == {s: [] for s in PARTICIPANTS}


def test_coordinator_killed_after_the_commit_decision_is_committed_everywhere_by_the_resolver(
    manager: ShardManager, shard_urls: list[str]
) -> None:
    setup(manager)
    crash_coordinator(shard_urls, "decided")
    assert prepared(manager) == {s: 1 for s in PARTICIPANTS}

    report = resolve_in_doubt(manager, older_than=60)  # decided: no need to wait

    assert len(report.committed) == 2
    assert prepared(manager) == {s: 0 for s in PARTICIPANTS}
    assert entries(manager) == {"shard-2": ["a"], "shard-3": ["b"]}


def test_a_slow_coordinator_overtaken_by_the_resolver_commits_nothing(manager: ShardManager) -> None:
    setup(manager)

    def resolver_runs_meanwhile(txid: str, checkpoint: str) -> None:
        if checkpoint == "prepared":  # the coordinator stalls after PREPARE, longer than the grace period
            assert len(resolve_in_doubt(manager, older_than=0).rolled_back) == 2

    with pytest.raises(TwoPhaseAbortedError):
        commit_across_shards(
            manager,
            {"shard-2": write("a"), "shard-3": write("b")},  # type: ignore[dict-item]
            on_checkpoint=resolver_runs_meanwhile,
        )

    assert entries(manager) == {s: [] for s in PARTICIPANTS}
    assert prepared(manager) == {s: 0 for s in PARTICIPANTS}
