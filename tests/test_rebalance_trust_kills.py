"""The CLI mover SIGKILLed inside its trusted transactions while writers run, then ``--resume``.

The mover skips foreign-key triggers on the targets' COPY and the sources' deletes
(``sa_shardkit/rebalance/trusted_rows.py``). It is killed (tests/rebalance_kill.py: frozen at an
exact statement, then SIGKILL) right before a trusted statement, in the middle of the trusted
COPY, after the trusted deletes were queued, at the statement that ends the trust, and at a
moment after a batch; writers (tests/trust_support.py) insert, update and delete moving keys
throughout, the resumed move included. Then every server is checked with plain SQL: no orphan,
no row off its ring shard or on two servers, exactly the committed rows.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from click.testing import CliRunner

from sa_shardkit import HashRing, ShardConfig, ShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.rebalance import install_ring
from tests.rebalance_data import seed
from tests.rebalance_kill import kill_mover_at, url_args
from tests.trust_support import ExactWriters, check_consistent, seeded_expectation, watching_trust

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS, ORDERS_EACH, ITEMS_EACH = 300, 2, 1

STOPS = {
    "before a trusted statement": {"sql": "'session_replication_role', 'replica'", "nth": 3},
    "mid trusted COPY": {"sql": "FROM STDIN", "nth": 5},
    "trusted deletes queued, watermark not": {"sql": "SET watermark", "nth": 2},
    "at the end of the trust": {"sql": "'session_replication_role', 'origin'", "nth": 2},
    "some time after a cut-over": {"sql": "SET watermark", "nth": 1, "delay": 0.1},
}


@pytest.mark.parametrize("stop", list(STOPS.values()), ids=list(STOPS))
def test_a_killed_trusted_move_resumed_under_writers_is_consistent(
    manager: ShardManager, shard5_url: str, monkeypatch: pytest.MonkeyPatch, stop: dict[str, Any]
) -> None:
    seed(manager, FOUR, CUSTOMERS, ORDERS_EACH, ITEMS_EACH)
    install_ring(manager, FOUR)
    manager.add_shard(ShardConfig(id="shard-5", url=shard5_url))  # the application knows the new shard
    writers = ExactWriters(manager, seeded_expectation(CUSTOMERS, ORDERS_EACH, ITEMS_EACH), CUSTOMERS)
    urls = url_args(manager, FOUR.shard_ids)
    writers.start()
    try:
        time.sleep(0.2)
        kill_mover_at([*urls, "--add", "shard-5", shard5_url, "--batch-size", "10"], stop)
        time.sleep(0.2)  # writers on the killed move's fleet
        with watching_trust(monkeypatch) as trust:
            result = CliRunner().invoke(rebalance_command, [*urls, "--resume"])
        assert result.exit_code == 0, result.output
        time.sleep(0.2)  # and on the new ring
    finally:
        writers.finish()
    assert not writers.errors, writers.errors[:5]
    assert writers.ops["delete"] and writers.ops["new order"] and writers.ops["orphan refused"], writers.ops
    batches = re.search(r"in\s+([\d,]+)\s+batches", result.output)
    assert batches is not None, result.output
    if int(batches.group(1).replace(",", "")):  # the killed run may have moved every row already
        assert 1 in trust.source and 1 in trust.target, (
            trust.source,
            trust.target,
        )  # the resumed run trusted too
    check_consistent(manager, FIVE, [*FOUR.shard_ids, "shard-5"], writers.expected)
