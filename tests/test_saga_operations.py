"""What operators see: `shardkit sagas` and `recover` report a saga held by a dead runner's live
lease; `shardkit sagas purge` prunes old finished rows only."""

from __future__ import annotations

import json
import textwrap

import pytest
from sqlalchemy import func, select, text

from sa_shardkit import ShardManager
from sa_shardkit.cli import main
from sa_shardkit.saga import home_of, list_sagas, receipts_table, sagas_table, transfer
from tests.saga_support import cross_shard_pair, open_accounts, run_until_killed, saga_rows

KILLED_UNDER_LEASE = textwrap.dedent(
    """
    import os, signal, sys
    from sa_shardkit import ShardManager
    from sa_shardkit.saga import SagaOptions, transfer

    urls, sender, receiver = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])

    def die(saga_id, checkpoint):
        if checkpoint == "do:debit":
            os.kill(os.getpid(), signal.SIGKILL)

    options = SagaOptions(lease_seconds=600, on_checkpoint=die)
    transfer(ShardManager.from_urls(urls), sender, receiver, 5, transfer_id="killed", options=options)
    """
)


def urls_args(shard_urls: list[str]) -> list[str]:
    return [arg for url in shard_urls for arg in ("--url", url)]


@pytest.fixture
def leased_open_saga(manager: ShardManager, shard_urls: list[str]) -> tuple[int, int]:
    """A transfer whose runner was SIGKILLed after the debit; its 600 s lease has not run out."""
    open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    run_until_killed(KILLED_UNDER_LEASE, ",".join(shard_urls), sender, receiver)
    return sender, receiver


def test_sagas_json_lists_the_dead_runners_saga_with_its_live_lease(
    manager: ShardManager,
    shard_urls: list[str],
    leased_open_saga: tuple[int, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sender, receiver = leased_open_saga

    main(["sagas", "--json", *urls_args(shard_urls)])

    listed = json.loads(capsys.readouterr().out)
    assert listed["unreachable"] == {}
    [saga] = listed["sagas"]
    assert saga["saga_id"] == "killed" and saga["saga_type"] == "credit_transfer"
    assert saga["state"] == "running" and saga["lease_seconds_left"] > 0 and saga["lease_until"]
    assert ":runner:" in saga["owner"] and saga["attempts"] == 0
    assert saga["home_shard"] == home_of(manager, "killed")
    assert saga["shards"] == [manager.shard_for(sender), manager.shard_for(receiver)]
    assert saga["age_seconds"] >= 0 and saga["finished_at"] is None


def test_sagas_table_shows_state_owner_and_shards(
    manager: ShardManager,
    shard_urls: list[str],
    leased_open_saga: tuple[int, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sender, receiver = leased_open_saga

    main(["sagas", *urls_args(shard_urls)])

    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("killed ")]
    assert "running" in line and "s left" in line and ":runner:" in line
    assert f"{manager.shard_for(sender)},{manager.shard_for(receiver)}" in line
    assert "1 saga(s): 1 running, 0 stuck" in out


def test_recover_reports_the_leased_open_saga_and_leaves_it_alone(
    manager: ShardManager,
    shard_urls: list[str],
    leased_open_saga: tuple[int, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["recover", *urls_args(shard_urls)])  # younger than the default --max-age: exit 0

    out = capsys.readouterr().out
    assert "0 completed, 0 compensated, 0 still pending, 1 open under a live lease" in out
    assert "killed (credit_transfer) running" in out
    assert saga_rows(manager)["killed"]["attempts"] == 0  # not claimed: the lease is live


def test_recover_exits_1_when_a_saga_is_older_than_the_max_age(
    shard_urls: list[str], leased_open_saga: tuple[int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["recover", "--max-age", "0s", *urls_args(shard_urls)])

    assert done.value.code == 1
    out = capsys.readouterr().out
    assert "1 open longer than allowed" in out and "killed (credit_transfer) running OVERDUE" in out


def test_list_sagas_api_says_stuck_once_the_lease_ran_out(manager: ShardManager) -> None:
    open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    transfer(manager, sender, receiver, 1, transfer_id="done")
    saga_rows(manager)  # its completion mark written (in the background): it must not land after ours
    with manager.engine(home_of(manager, "done")).begin() as conn:  # as if its runner died long ago
        conn.execute(
            sagas_table.update()
            .where(sagas_table.c.saga_id == "done")
            .values(finished_at=None, lease_until=func.now() - text("interval '1 minute'"))
        )

    [saga] = list_sagas(manager).sagas

    assert saga.saga_id == "done" and saga.state == "stuck"
    assert saga.lease_seconds_left is not None and saga.lease_seconds_left < -50


def receipts_of(manager: ShardManager) -> set[str]:
    found: set[str] = set()
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).connect() as conn:
            found |= set(conn.execute(select(receipts_table.c.saga_id)).scalars())
    return found


def test_purge_deletes_old_finished_sagas_and_their_receipts_only(
    manager: ShardManager, shard_urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    open_accounts(manager)
    pairs = [cross_shard_pair(manager, start=n) for n in (1, 2, 3)]
    for n, (sender, receiver) in enumerate(pairs):
        transfer(manager, sender, receiver, 1, transfer_id=f"old-{n}")
    transfer(manager, *pairs[0], 1, transfer_id="recent")
    saga_rows(manager)  # completion marks written
    with manager.engine(home_of(manager, "old-2")).begin() as conn:  # an old saga still open
        conn.execute(sagas_table.update().where(sagas_table.c.saga_id == "old-2").values(finished_at=None))
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).begin() as conn:
            conn.execute(
                text(
                    "UPDATE shardkit_sagas SET created_at = now() - interval '40 days',"
                    " finished_at = CASE WHEN finished_at IS NULL THEN NULL ELSE now() - interval '40 days' END"
                    " WHERE saga_id LIKE 'old-%'"
                )
            )
            conn.execute(
                text(
                    "UPDATE shardkit_saga_receipts SET created_at = now() - interval '40 days' WHERE saga_id LIKE 'old-%'"
                )
            )

    main(["sagas", "purge", "--older-than", "30d", "--dry-run", *urls_args(shard_urls)])
    assert "dry run: would have purged 2 finished saga log rows and 4 receipts" in capsys.readouterr().out
    assert set(saga_rows(manager)) == {"old-0", "old-1", "old-2", "recent"}

    main(["sagas", "purge", "--older-than", "30d", "--batch-size", "1", *urls_args(shard_urls)])

    assert "purged 2 finished saga log rows and 4 receipts" in capsys.readouterr().out
    assert set(saga_rows(manager)) == {"old-2", "recent"}  # open or young: kept
    assert receipts_of(manager) == {"old-2", "recent"}  # the open saga's old receipts: kept


def test_purge_refuses_an_age_inside_the_idempotency_window(
    shard_urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["sagas", "purge", "--older-than", "5m", *urls_args(shard_urls)])

    assert done.value.code == 2
    assert "refusing to purge sagas younger than 3600 s" in capsys.readouterr().err
