"""A runner dying at any step boundary: recovery drives every saga to a final state, exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal

import pytest

from sa_shardkit import ShardManager
from sa_shardkit.saga import CREDIT_TRANSFER, SagaOptions, recover, transfer
from tests.saga_support import (
    SimulatedCrash,
    balances,
    crash_at,
    cross_shard_pair,
    expected_balances,
    open_accounts,
    receipt_count,
    run_until_killed,
    saga_rows,
)

LEASE = 0.5

SUCCESS_PATH = ["created", "do:debit", "log:debit", "do:credit"]
"""Every checkpoint of a transfer that completes, except the last (after it there is nothing to crash).

The debit commits with the saga's creation (same shard), so "created" and "do:debit" are one commit."""
REFUND_PATH = ["created", "do:debit", "log:debit", "do:credit", "log:credit"]
"""Every commit of a transfer whose credit is refused, before the refund makes it final."""


def crashing_at(point: str) -> SagaOptions:
    return SagaOptions(lease_seconds=LEASE, on_checkpoint=crash_at(point), retry_delay=0.05)


def crash_everywhere(manager: ShardManager, points: list[str], receiver_of: dict[str, int]) -> None:
    for point in points:
        sender = cross_shard_pair(manager)[0]
        with pytest.raises(SimulatedCrash):
            transfer(manager, sender, receiver_of[point], 5, transfer_id=point, options=crashing_at(point))
    stuck = {sid for sid, row in saga_rows(manager).items() if row["finished_at"] is None}
    assert stuck == set(points)  # the crash really left every saga half-done
    time.sleep(LEASE + 0.2)  # the dead runners' leases run out


def test_crash_at_every_boundary_of_a_successful_transfer_then_recovery_completes_it_once(
    manager: ShardManager,
) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    crash_everywhere(manager, SUCCESS_PATH, dict.fromkeys(SUCCESS_PATH, receiver))

    report = recover(manager, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=LEASE))

    assert sorted(report.completed) == sorted(SUCCESS_PATH) and not report.pending
    assert {row["status"] for row in saga_rows(manager).values()} == {"complete"}
    assert balances(manager) == expected_balances(manager, initial)
    assert balances(manager)[sender] == initial[sender] - 5 * len(SUCCESS_PATH)
    for point in SUCCESS_PATH:
        assert receipt_count(manager, point, "credit") == 1


def test_crash_at_every_boundary_of_a_refused_credit_then_recovery_refunds_once(
    manager: ShardManager,
) -> None:
    initial = open_accounts(manager)
    sender = cross_shard_pair(manager)[0]
    ghost = next(k for k in range(1000, 2000) if manager.shard_for(k) != manager.shard_for(sender))
    crash_everywhere(manager, REFUND_PATH, dict.fromkeys(REFUND_PATH, ghost))

    report = recover(manager, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=LEASE))

    assert sorted(report.failed) == sorted(REFUND_PATH) and not report.pending
    assert {row["status"] for row in saga_rows(manager).values()} == {"failed_unknown_receiver"}
    assert balances(manager) == initial
    for point in REFUND_PATH:
        assert receipt_count(manager, point, "debit", "undo") == 1


WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from sa_shardkit import ShardManager
    from sa_shardkit.saga import SagaOptions, transfer

    urls, point, sender, receiver = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    def die(saga_id, checkpoint):
        if checkpoint == point:
            os.kill(os.getpid(), signal.SIGKILL)

    manager = ShardManager.from_urls(urls)
    transfer(manager, sender, receiver, 5, transfer_id=point, options=SagaOptions(lease_seconds=1, on_checkpoint=die))
    """
)


@pytest.mark.parametrize("point", ["do:credit"])  # credited, not yet logged: the subtle one
def test_sigkilled_worker_is_finished_by_recovery_exactly_once(
    manager: ShardManager, shard_urls: list[str], point: str
) -> None:
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    worker = subprocess.run(
        [sys.executable, "-c", WORKER, ",".join(shard_urls), point, str(sender), str(receiver)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert worker.returncode == -signal.SIGKILL, worker.stderr
    assert saga_rows(manager)[point]["finished_at"] is None
    assert receipt_count(manager, point, "credit") == (1 if point == "do:credit" else 0)

    time.sleep(1.2)  # the killed process renews nothing: its lease runs out
    report = recover(manager, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=1))

    assert report.completed == [point]
    assert saga_rows(manager)[point]["status"] == "complete"
    assert balances(manager)[receiver] == initial[receiver] + Decimal(5)
    assert balances(manager) == expected_balances(manager, initial)
    assert receipt_count(manager, point, "credit") == 1


def test_a_retry_right_after_a_sigkill_takes_the_saga_over_once_the_lease_ran_out(
    manager: ShardManager, shard_urls: list[str]
) -> None:
    """Defaults only (no lease or wait options): the retry waits out the dead runner's lease,
    takes the saga over and finishes it, instead of failing with SagaPendingError."""
    initial = open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    run_until_killed(DEFAULT_WORKER, ",".join(shard_urls), sender, receiver)
    row = saga_rows(manager)["retry-me"]
    assert row["finished_at"] is None and row["lease_until"] is not None  # open, under a lease

    outcome = transfer(manager, sender, receiver, 5, transfer_id="retry-me")  # right away, defaults

    assert outcome.status == "complete"
    row = saga_rows(manager)["retry-me"]
    assert row["status"] == "complete" and row["attempts"] == 1  # taken over exactly once
    assert SagaOptions().wait_seconds > SagaOptions().lease_seconds  # the default retry outwaits a lease
    assert balances(manager)[receiver] == initial[receiver] + Decimal(5)
    assert balances(manager) == expected_balances(manager, initial)
    assert receipt_count(manager, "retry-me", "credit") == 1


DEFAULT_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from sa_shardkit import ShardManager
    from sa_shardkit.saga import SagaOptions, transfer

    urls, sender, receiver = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])

    def die(saga_id, checkpoint):
        if checkpoint == "do:credit":
            os.kill(os.getpid(), signal.SIGKILL)

    manager = ShardManager.from_urls(urls)
    transfer(manager, sender, receiver, 5, transfer_id="retry-me", options=SagaOptions(on_checkpoint=die))
    """
)
