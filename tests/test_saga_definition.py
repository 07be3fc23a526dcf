"""A user-defined saga over three shards: steps run where their keys route, compensations in reverse."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from sa_shardkit import Saga, SagaStepFailed, ShardManager, Step, run_saga
from sa_shardkit.demo.models import Customer
from sa_shardkit.saga import create_saga_tables, session_step
from tests.saga_support import balances, cross_shard_pair, open_accounts, receipt_count, saga_rows

TRAIL = "CREATE TABLE trail (key bigint, saga_id text, step text, kind text, at timestamptz DEFAULT clock_timestamp())"


def mark(step: str, kind: str) -> Any:
    def write(conn: Connection, payload: Any) -> None:
        if kind == "do" and payload.get("refuse") == step:
            raise SagaStepFailed("nope", f"step {step} refused")
        conn.execute(
            text("INSERT INTO trail (key, saga_id, step, kind) VALUES (:key, :saga, :step, :kind)"),
            {"key": payload[step], "saga": payload["id"], "step": step, "kind": kind},
        )

    return write


THREE_SHARDS = Saga(
    "three_shards",
    [
        Step(name, key=lambda p, n=name: p[n], action=mark(name, "do"), compensation=mark(name, "undo"))
        for name in "abc"
    ],
    home_key=lambda p: p["home"],
)


def keys_on_four_shards(manager: ShardManager) -> dict[str, int]:
    """Keys a, b, c and home, each on a different shard."""
    by_shard: dict[str, int] = {}
    for key in range(1, 1000):
        by_shard.setdefault(manager.shard_for(key), key)
    first_four = [by_shard[s] for s in sorted(by_shard)][:4]
    return dict(zip(["a", "b", "c", "home"], first_four, strict=True))


def trail(manager: ShardManager) -> list[tuple[str, str, str]]:
    """(shard, step, kind) of every trail row, in commit-time order."""
    rows = []
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).connect() as conn:
            for step, kind, at in conn.execute(text("SELECT step, kind, at FROM trail")):
                rows.append((at, shard_id, step, kind))
    return [(shard, step, kind) for _, shard, step, kind in sorted(rows)]


def setup(manager: ShardManager) -> dict[str, int]:
    create_saga_tables(manager)
    for shard_id in manager.shard_ids:
        with manager.engine(shard_id).begin() as conn:
            conn.execute(text(TRAIL))
    return keys_on_four_shards(manager)


def test_each_step_runs_on_the_shard_its_key_routes_to_and_the_log_on_the_home_shard(
    manager: ShardManager,
) -> None:
    keys = setup(manager)

    outcome = run_saga(manager, THREE_SHARDS, {**keys, "id": "s-1"}, saga_id="s-1")

    assert outcome.status == "complete"
    assert trail(manager) == [(manager.shard_for(keys[s]), s, "do") for s in "abc"]
    assert saga_rows(manager)["s-1"]["shard"] == manager.shard_for("s-1") == outcome.home_shard


def test_a_generated_saga_id_lives_on_the_home_keys_shard(manager: ShardManager) -> None:
    keys = setup(manager)

    outcome = run_saga(manager, THREE_SHARDS, {**keys, "id": "generated"})

    assert outcome.status == "complete"
    assert saga_rows(manager)[outcome.saga_id]["shard"] == manager.shard_for(keys["home"])


def test_a_refused_step_compensates_the_completed_ones_in_reverse_order(manager: ShardManager) -> None:
    keys = setup(manager)

    outcome = run_saga(manager, THREE_SHARDS, {**keys, "id": "s-2", "refuse": "c"}, saga_id="s-2")

    assert outcome.status == "failed_nope" and outcome.failure == "nope"
    shard = {s: manager.shard_for(keys[s]) for s in "abc"}
    assert trail(manager) == [
        (shard["a"], "a", "do"),
        (shard["b"], "b", "do"),
        (shard["b"], "b", "undo"),
        (shard["a"], "a", "undo"),
    ]


def orm_add(delta_sign: int) -> Any:
    def step(session: Session, payload: Any) -> None:
        customer = session.get(Customer, payload["to"] if delta_sign > 0 else payload["from"])
        if customer is None:
            raise SagaStepFailed("unknown_customer")
        customer.balance += delta_sign * Decimal(payload["amount"])
        session.commit()  # joins the runner's transaction: commits nothing by itself
        if customer.balance < 0:
            raise SagaStepFailed("insufficient_funds")  # so this still rolls the debit back

    return step


def orm_undo(delta_sign: int) -> Any:
    def step(session: Session, payload: Any) -> None:
        customer = session.get(Customer, payload["to"] if delta_sign > 0 else payload["from"])
        assert customer is not None
        customer.balance -= delta_sign * Decimal(payload["amount"])

    return step


ORM_TRANSFER = Saga(
    "orm_transfer",
    [
        Step(
            "debit",
            key=lambda p: p["from"],
            action=session_step(orm_add(-1)),
            compensation=session_step(orm_undo(-1)),
        ),
        Step(
            "credit",
            key=lambda p: p["to"],
            action=session_step(orm_add(+1)),
            compensation=session_step(orm_undo(+1)),
        ),
    ],
)


def test_orm_steps_receive_a_session_on_their_shard(manager: ShardManager) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)

    outcome = run_saga(
        manager, ORM_TRANSFER, {"from": sender, "to": receiver, "amount": "12.50"}, saga_id="orm-1"
    )

    assert outcome.status == "complete"
    after = balances(manager)  # each server read directly
    assert after[sender] == initial[sender] - Decimal("12.50")
    assert after[receiver] == initial[receiver] + Decimal("12.50")
    assert receipt_count(manager, "orm-1", "credit", shard_ids=[manager.shard_for(receiver)]) == 1


def test_an_orm_step_refusing_after_session_commit_leaves_nothing(manager: ShardManager) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)

    outcome = run_saga(
        manager, ORM_TRANSFER, {"from": sender, "to": receiver, "amount": "500"}, saga_id="orm-2"
    )

    assert outcome.status == "failed_insufficient_funds"
    assert balances(manager) == initial  # the step's session.commit() did not commit the debit
