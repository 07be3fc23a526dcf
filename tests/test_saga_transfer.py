"""The credit-transfer saga on real shards: where money lands, refusals, refunds, idempotency, bad input."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import select

from sa_shardkit import ShardManager
from sa_shardkit.errors import SagaConflictError, SagaError, SagaInputError
from sa_shardkit.saga import Saga, Step, receipts_table, transfer, transfer_payload
from tests.saga_support import balances, cross_shard_pair, expected_balances, open_accounts, saga_rows


def test_transfer_between_shards_debits_one_shard_and_credits_the_other(manager: ShardManager) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)

    outcome = transfer(manager, sender, receiver, "30.50", transfer_id="t-1")

    assert outcome.status == "complete" and outcome.succeeded and outcome.is_final
    after = balances(manager)
    assert after[sender] == initial[sender] - Decimal("30.50")
    assert after[receiver] == initial[receiver] + Decimal("30.50")
    row = saga_rows(manager)["t-1"]
    assert row["shard"] == manager.shard_for("t-1") == outcome.home_shard  # the id decides the log's shard
    assert row["shards"] == [manager.shard_for(sender), manager.shard_for(receiver)]
    for customer, step in ((sender, "debit"), (receiver, "credit")):  # each receipt beside its effect
        with manager.engine(manager.shard_for(customer)).connect() as conn:
            steps = conn.execute(select(receipts_table.c.step).where(receipts_table.c.saga_id == "t-1")).all()
        assert steps == [(step,)]


def test_a_generated_transfer_id_puts_the_log_on_the_senders_shard(manager: ShardManager) -> None:
    open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)

    outcome = transfer(manager, sender, receiver, 5)

    assert outcome.status == "complete"
    assert saga_rows(manager)[outcome.saga_id]["shard"] == manager.shard_for(sender) == outcome.home_shard


def test_insufficient_funds_fails_without_moving_money(manager: ShardManager) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)

    outcome = transfer(manager, sender, receiver, "100.01", transfer_id="t-poor")

    assert outcome.status == "failed_insufficient_funds" and outcome.failure == "insufficient_funds"
    assert balances(manager) == initial


def test_failed_credit_refunds_the_sender(manager: ShardManager) -> None:
    initial = open_accounts(manager)
    sender = cross_shard_pair(manager)[0]
    missing = next(k for k in range(1000, 2000) if manager.shard_for(k) != manager.shard_for(sender))

    outcome = transfer(manager, sender, missing, 25, transfer_id="t-ghost")

    assert outcome.status == "failed_unknown_receiver"
    assert balances(manager) == initial
    assert saga_rows(manager)["t-ghost"]["compensating"] is True


def test_same_transfer_id_is_applied_once_and_returns_the_same_outcome(manager: ShardManager) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)

    first = transfer(manager, sender, receiver, 10, transfer_id="t-dup")
    second = transfer(manager, sender, receiver, "10.00", transfer_id="t-dup")

    assert first == second
    assert balances(manager)[sender] == initial[sender] - 10
    assert balances(manager) == expected_balances(manager, initial)


def test_reusing_a_transfer_id_for_other_arguments_is_refused(manager: ShardManager) -> None:
    open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    transfer(manager, sender, receiver, 10, transfer_id="t-once")

    with pytest.raises(SagaConflictError, match="t-once"):
        transfer(manager, sender, receiver, 11, transfer_id="t-once")


@pytest.mark.parametrize(
    ("sender", "receiver", "amount", "message"),
    [
        (1, 2, 0, "positive"),
        (1, 2, "-5", "positive"),
        (1, 2, "1.001", "decimal places"),
        (1, 2, "ten", "numeric"),
        (1, 2, 1.5, "numeric"),
        (1, 1, 5, "itself"),
        (None, 2, 5, "sender"),
    ],
)
def test_bad_transfer_arguments_are_refused_by_name(
    sender: object, receiver: object, amount: object, message: str
) -> None:
    with pytest.raises(SagaInputError, match=message):
        transfer_payload(sender, receiver, amount)  # type: ignore[arg-type]


def test_a_refused_transfer_writes_nothing(manager: ShardManager) -> None:
    initial = open_accounts(manager)
    with pytest.raises(SagaInputError):
        transfer(manager, 1, 2, "-1")
    assert saga_rows(manager) == {} and balances(manager) == initial


def test_saga_definitions_are_checked() -> None:
    def noop(conn: object, payload: object) -> None:
        return None

    with pytest.raises(SagaError, match="no steps"):
        Saga("empty", [])
    with pytest.raises(SagaError, match="unique"):
        Saga("twice", [Step("a", key=lambda p: 1, action=noop), Step("a", key=lambda p: 1, action=noop)])


def test_transfer_credits_example_runs(manager: ShardManager, capsys: pytest.CaptureFixture[str]) -> None:
    from examples.transfer_credits import run

    run(manager)

    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0:3] for line in lines][1:] == [
        ["transfer", "25:", "complete"],
        ["same", "id", "again:"],
        ["transfer", "1000:", "failed_insufficient_funds"],
        ["crash", "after", "the"],
        ["recover():", "1", "completed"],
    ]
    assert sorted(balances(manager).values()) == [Decimal("65.00"), Decimal("135.00")]  # 25 + 10 moved
