"""Shards really going down under a saga: refunds when the receiver is gone, recovery after a restart."""

from __future__ import annotations

import time

import pytest

from sa_shardkit import ShardManager
from sa_shardkit.errors import SagaPendingError
from sa_shardkit.saga import CREDIT_TRANSFER, SagaOptions, home_of, new_saga_id, recover, transfer
from tests.fleet import TestFleet
from tests.saga_support import (
    SimulatedCrash,
    balances,
    crash_at,
    cross_shard_pair,
    expected_balances,
    open_accounts,
    receipt_count,
    saga_rows,
)

FAST = SagaOptions(lease_seconds=1, step_attempts=2, retry_delay=0.05)


def server_index(shard_id: str) -> int:
    return int(shard_id.rsplit("-", 1)[1]) - 1  # the fixture's shard-N is fleet server N-1


def test_receiver_shard_down_refunds_the_sender(manager: ShardManager, pg_fleet: TestFleet) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    receiver_shard = manager.shard_for(receiver)
    pg_fleet.server(server_index(receiver_shard)).stop()

    outcome = transfer(manager, sender, receiver, 40, transfer_id="t-down", options=FAST)

    assert outcome.status == "failed_credit_error" and outcome.failure == "credit_error"
    assert outcome.error is not None and f"shard {receiver_shard!r}" in outcome.error
    pg_fleet.server(server_index(receiver_shard)).start()
    assert balances(manager) == initial
    assert receipt_count(manager, "t-down", "debit", "undo") == 1  # refunded, on the sender's shard
    assert receipt_count(manager, "t-down", "credit") == 0  # the credit never happened


def stopping_the_home_after_the_debit(
    manager: ShardManager, pg_fleet: TestFleet, saga_id: str
) -> SagaOptions:
    """Options whose checkpoint hook stops the server of ``saga_id``'s home shard once the debit is in."""
    home = pg_fleet.server(server_index(home_of(manager, saga_id)))

    def stop_home_after_debit(saga_id: str, checkpoint: str) -> None:
        if checkpoint == "log:debit":
            home.stop()

    return SagaOptions(
        lease_seconds=1, step_attempts=2, retry_delay=0.05, on_checkpoint=stop_home_after_debit
    )


def test_home_shard_stopped_before_the_last_step_leaves_it_pending_for_recovery(
    manager: ShardManager, pg_fleet: TestFleet
) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    saga_id = new_saga_id(manager, near=receiver)  # the log lives with the credit
    options = stopping_the_home_after_the_debit(manager, pg_fleet, saga_id)
    with pytest.raises(SagaPendingError) as pending:
        transfer(manager, sender, receiver, 15, transfer_id=saga_id, options=options)
    assert pending.value.saga_id == saga_id and pending.value.status == "debit_complete"
    assert pending.value.recorded is True
    sender_shard = [manager.shard_for(sender)]
    assert receipt_count(manager, saga_id, "debit", shard_ids=sender_shard) == 1  # debited, not credited

    pg_fleet.server(server_index(home_of(manager, saga_id))).start()
    time.sleep(1.1)
    report = recover(manager, [CREDIT_TRANSFER], options=FAST)

    assert report.completed == [saga_id]
    assert saga_rows(manager)[saga_id]["status"] == "complete"
    assert balances(manager) == expected_balances(manager, initial)
    assert balances(manager)[receiver] == initial[receiver] + 15
    assert receipt_count(manager, saga_id, "credit") == 1


def test_home_shard_stopped_after_the_last_step_still_returns_complete_and_is_marked_later(
    manager: ShardManager, pg_fleet: TestFleet
) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    saga_id = new_saga_id(manager, near=sender)  # the log lives with the debit
    options = stopping_the_home_after_the_debit(manager, pg_fleet, saga_id)
    outcome = transfer(manager, sender, receiver, 15, transfer_id=saga_id, options=options)
    assert outcome.status == "complete"  # every step committed: the outcome is decided

    pg_fleet.server(server_index(home_of(manager, saga_id))).start()
    time.sleep(1.1)
    recover(manager, [CREDIT_TRANSFER], options=FAST)  # finishes the mark if the runner could not

    assert saga_rows(manager)[saga_id]["status"] == "complete"
    assert balances(manager) == expected_balances(manager, initial)
    assert balances(manager)[receiver] == initial[receiver] + 15
    assert receipt_count(manager, saga_id, "credit") == 1 and receipt_count(manager, saga_id, "debit") == 1


def test_recovery_leaves_sagas_pending_while_their_shard_is_down_and_finishes_them_later(
    manager: ShardManager, pg_fleet: TestFleet
) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    receiver_server = pg_fleet.server(server_index(manager.shard_for(receiver)))

    crashing = SagaOptions(lease_seconds=1, on_checkpoint=crash_at("log:debit"))
    ids = sorted(new_saga_id(manager, near=sender) for _ in range(3))  # logged with the debit
    for saga_id in ids:
        with pytest.raises(SimulatedCrash):
            transfer(manager, sender, receiver, 10, transfer_id=saga_id, options=crashing)
    receiver_server.stop()
    time.sleep(1.1)

    # A recovery worker cannot know whether the dead runner's credit committed: it must not refund.
    first = recover(manager, [CREDIT_TRANSFER], options=FAST)
    assert sorted(first.pending) == ids and first.finished == 0
    assert {row["status"] for row in saga_rows_on(manager, manager.shard_for(sender))} == {"debit_complete"}

    receiver_server.start()
    second = recover(manager, [CREDIT_TRANSFER], options=FAST)

    assert sorted(second.completed) == ids
    assert balances(manager) == expected_balances(manager, initial)
    assert balances(manager)[receiver] == initial[receiver] + 30


def saga_rows_on(manager: ShardManager, shard_id: str) -> list[dict[str, object]]:
    with manager.engine(shard_id).connect() as conn:
        return [dict(r) for r in conn.exec_driver_sql("SELECT * FROM shardkit_sagas").mappings()]
