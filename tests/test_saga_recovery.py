"""Recovery workers: several at once never share a saga, never touch a live one, and `shardkit recover`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from sa_shardkit import ShardManager
from sa_shardkit.cli import main
from sa_shardkit.saga import (
    CREDIT_TRANSFER,
    RecoveryReport,
    SagaOptions,
    credit_transfer_saga,
    recover,
    transfer,
)
from tests.saga_support import (
    SimulatedCrash,
    balances,
    crash_at,
    cross_shard_pair,
    expected_balances,
    open_accounts,
    saga_rows,
)

LEASE = 0.5


def leave_stuck(manager: ShardManager, count: int, saga: object = CREDIT_TRANSFER) -> list[str]:
    """``count`` transfers whose runner died after the debit, leases already run out."""
    ids = []
    for n in range(count):
        sender, receiver = cross_shard_pair(manager, start=1 + n % 8)
        with pytest.raises(SimulatedCrash):
            transfer(
                manager,
                sender,
                receiver,
                1,
                transfer_id=f"stuck-{n}",
                saga=saga,  # type: ignore[arg-type]
                options=SagaOptions(lease_seconds=LEASE, on_checkpoint=crash_at("log:debit")),
            )
        ids.append(f"stuck-{n}")
    time.sleep(LEASE + 0.2)
    return ids


def test_recovery_workers_running_at_once_each_claim_a_saga_exactly_once(
    manager: ShardManager, shard_map: dict[str, str]
) -> None:
    initial = open_accounts(manager)
    stuck = leave_stuck(manager, 24)
    start = threading.Barrier(3)

    def slow(saga_id: str, checkpoint: str) -> None:
        time.sleep(0.02)  # keep each claim open long enough for the workers to overlap

    def worker(_: int) -> RecoveryReport:
        with ShardManager.from_urls(shard_map) as own:  # its own connections, like another process
            start.wait()
            return recover(own, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=5, on_checkpoint=slow))

    with ThreadPoolExecutor(max_workers=3) as pool:
        reports = list(pool.map(worker, range(3)))

    claimed = Counter(saga_id for report in reports for saga_id in report.completed)
    assert sorted(claimed) == sorted(stuck) and set(claimed.values()) == {1}
    assert sum(1 for report in reports if report.completed) >= 2  # the work really was shared
    rows = saga_rows(manager)
    assert {rows[s]["attempts"] for s in stuck} == {1}  # no saga was ever claimed twice
    assert {rows[s]["status"] for s in stuck} == {"complete"}
    assert balances(manager) == expected_balances(manager, initial)


def test_recovery_never_touches_a_saga_whose_runner_is_alive(manager: ShardManager) -> None:
    open_accounts(manager)
    sender, receiver = cross_shard_pair(manager)
    paused, resume = threading.Event(), threading.Event()

    def slow_runner(saga_id: str, checkpoint: str) -> None:
        if checkpoint == "log:debit":
            paused.set()
            resume.wait(10)

    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(
            transfer,
            manager,
            sender,
            receiver,
            5,
            transfer_id="alive",
            options=SagaOptions(lease_seconds=LEASE, on_checkpoint=slow_runner),
        )
        assert paused.wait(10)
        time.sleep(LEASE * 3)  # far longer than the lease: only the heartbeat keeps it
        report = recover(manager, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=LEASE))
        row = saga_rows(manager)["alive"]
        resume.set()
        outcome = running.result(timeout=30)

    assert report.finished == 0 and not report.pending
    assert row["attempts"] == 0 and row["finished_at"] is None  # never claimed while its runner lived
    assert outcome.status == "complete"


def test_recovery_leaves_sagas_of_unknown_types_alone(manager: ShardManager) -> None:
    open_accounts(manager)
    stuck = leave_stuck(manager, 1, saga=credit_transfer_saga("gift_card_transfer"))

    report = recover(manager, [CREDIT_TRANSFER], options=SagaOptions(lease_seconds=LEASE))

    assert report.unknown_type == stuck and report.finished == 0
    assert saga_rows(manager)[stuck[0]]["attempts"] == 0


def test_cli_recover_one_pass_finishes_stuck_sagas(
    manager: ShardManager, shard_urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    initial = open_accounts(manager)
    leave_stuck(manager, 2)
    args = ["recover", "--lease", "1", *[arg for url in shard_urls for arg in ("--url", url)]]

    main(args)

    assert "2 completed, 0 compensated, 0 still pending" in capsys.readouterr().out
    assert {row["status"] for row in saga_rows(manager).values()} == {"complete"}
    assert balances(manager) == expected_balances(manager, initial)


def test_cli_recover_rejects_a_saga_reference_that_is_not_a_saga(
    shard_urls: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["recover", "--url", shard_urls[0], "--saga", "sa_shardkit.saga:recover"])
    assert exit_info.value.code == 2
    assert "not a sa_shardkit Saga" in capsys.readouterr().err


def test_cli_recover_loop_keeps_recovering_until_terminated(
    manager: ShardManager, shard_urls: list[str]
) -> None:
    initial = open_accounts(manager)
    urls = [arg for url in shard_urls for arg in ("--url", url)]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sa_shardkit",
            "recover",
            "--loop",
            "--interval",
            "0.2",
            "--lease",
            "1",
            *urls,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        stuck = leave_stuck(manager, 2)  # appear while the worker is already running
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = saga_rows(manager)
            if all(rows[s]["finished_at"] is not None for s in stuck):
                break
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert "recovery worker stopped" in out
    assert {saga_rows(manager)[s]["status"] for s in stuck} == {"complete"}
    assert balances(manager) == expected_balances(manager, initial)
