"""A saga id means one operation fleet-wide: reusing it with other input is refused and moves nothing."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import delete

from sa_shardkit import ShardManager
from sa_shardkit.errors import SagaConflictError
from sa_shardkit.saga import home_of, sagas_table, transfer
from tests.saga_support import balances, open_accounts, receipt_count, saga_rows

ID = "order-42"


def customers_by_shard(manager: ShardManager, count: int = 16) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for customer in range(1, count + 1):
        found.setdefault(manager.shard_for(customer), []).append(customer)
    return found


def first_use(manager: ShardManager) -> tuple[int, int, dict[int, Decimal]]:
    """Transfer 1.00 under ``ID`` between customers on two shards other than each other's."""
    open_accounts(manager)
    by_shard = customers_by_shard(manager)
    sender_shard, receiver_shard = sorted(by_shard)[:2]
    sender, receiver = by_shard[sender_shard][0], by_shard[receiver_shard][0]
    assert transfer(manager, sender, receiver, 1, transfer_id=ID).status == "complete"
    return sender, receiver, balances(manager)


def assert_nothing_moved(manager: ShardManager, before: dict[int, Decimal]) -> None:
    after = balances(manager)  # read from each server directly
    assert after == before
    assert sum(after.values()) == 16 * Decimal(100)  # the fleet total


def test_same_sender_other_amount_is_refused(manager: ShardManager) -> None:
    sender, receiver, before = first_use(manager)

    with pytest.raises(SagaConflictError, match=ID):
        transfer(manager, sender, receiver, 2, transfer_id=ID)

    assert_nothing_moved(manager, before)
    assert saga_rows(manager)[ID]["payload"]["amount"] == "1.00"


def test_other_sender_on_another_shard_to_the_first_receivers_shard_is_refused(manager: ShardManager) -> None:
    sender, receiver, before = first_use(manager)
    by_shard = customers_by_shard(manager)
    other_sender = next(
        c
        for shard, customers in by_shard.items()
        if shard not in (manager.shard_for(sender), manager.shard_for(receiver))
        for c in customers
    )
    other_receiver = next(c for c in by_shard[manager.shard_for(receiver)] if c != receiver)

    with pytest.raises(SagaConflictError, match=ID):
        transfer(manager, other_sender, other_receiver, 1, transfer_id=ID)

    assert_nothing_moved(manager, before)
    assert receipt_count(manager, ID, "debit") == 1 and receipt_count(manager, ID, "credit") == 1


def test_customers_on_shards_the_id_never_touched_are_refused(manager: ShardManager) -> None:
    sender, receiver, before = first_use(manager)
    untouched = [
        customers
        for shard, customers in sorted(customers_by_shard(manager).items())
        if shard not in (manager.shard_for(sender), manager.shard_for(receiver))
    ]
    assert len(untouched) == 2

    with pytest.raises(SagaConflictError, match=ID):
        transfer(manager, untouched[0][0], untouched[1][0], 1, transfer_id=ID)

    assert_nothing_moved(manager, before)
    assert len(saga_rows(manager)) == 1


def test_a_receipt_for_other_input_is_refused_even_without_the_log_row(manager: ShardManager) -> None:
    """Defence in depth: with the first use's log row gone (deleted here by hand), the step's receipt
    still knows the id was used for another input; the already-applied debit is compensated."""
    sender, receiver, before = first_use(manager)
    with manager.engine(home_of(manager, ID)).begin() as conn:
        conn.execute(delete(sagas_table).where(sagas_table.c.saga_id == ID))
    other_sender = next(
        c
        for c in range(1, 17)
        if manager.shard_for(c) not in {manager.shard_for(sender), manager.shard_for(receiver)}
    )

    with pytest.raises(SagaConflictError, match="receipt"):
        transfer(manager, other_sender, receiver, 1, transfer_id=ID)  # the credit's receipt conflicts

    assert_nothing_moved(manager, before)
    assert receipt_count(manager, ID, "credit") == 1  # the first use's, untouched


def test_a_receipt_conflict_on_the_first_step_records_nothing(manager: ShardManager) -> None:
    sender, receiver, before = first_use(manager)
    with manager.engine(home_of(manager, ID)).begin() as conn:
        conn.execute(delete(sagas_table).where(sagas_table.c.saga_id == ID))
    other_receiver = next(c for c in range(1, 17) if c not in (sender, receiver))

    with pytest.raises(SagaConflictError, match="receipt"):
        transfer(manager, sender, other_receiver, 1, transfer_id=ID)  # the debit's receipt conflicts

    assert_nothing_moved(manager, before)
    assert ID not in saga_rows(manager)  # the id's new log row was withdrawn


def test_the_same_input_again_returns_the_first_outcome_from_any_process(
    manager: ShardManager, shard_map: dict[str, str]
) -> None:
    sender, receiver, before = first_use(manager)

    with ShardManager.from_urls(shard_map) as other_process:
        again = transfer(other_process, sender, receiver, "1.00", transfer_id=ID)

    assert again.status == "complete" and again.home_shard == home_of(manager, ID)
    assert_nothing_moved(manager, before)
