"""`shardkit sagas` during an online add lists each saga exactly once.

The real CLI mover is SIGKILLed inside a saga-log cut-over (the copies committed on the new shard,
the source's delete not committed): the log rows of that batch are on two servers until the mover
resumes. The listing (API and CLI) is taken in that window, checked against the servers queried
directly, and taken again after the move finished.
"""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal
from typing import Any

from click.testing import CliRunner
from sqlalchemy import select

from sa_shardkit import HashRing, ShardManager
from sa_shardkit.cli.rebalance import rebalance_command
from sa_shardkit.cli.sagas import sagas as sagas_command
from sa_shardkit.rebalance import install_ring
from sa_shardkit.saga import flush_completion_marks, sagas_table, transfer
from sa_shardkit.saga import log as saga_log
from sa_shardkit.saga.inspect import list_sagas
from tests.rebalance_kill import kill_mover_at, url_args
from tests.saga_support import seed_ring_fleet

FOUR = HashRing(["shard-1", "shard-2", "shard-3", "shard-4"])
FIVE = FOUR.add_shard("shard-5")
CUSTOMERS, FINISHED, OPEN = 40, 60, 20


def _on_servers(manager: ShardManager, shard_ids: tuple[str, ...]) -> list[tuple[str, str]]:
    """(shard, saga id) of every log row, read from each server directly."""
    rows = []
    for shard_id in shard_ids:
        with manager.connect(shard_id) as conn:
            rows += [(shard_id, i) for i in conn.execute(select(sagas_table.c.saga_id)).scalars()]
            conn.rollback()
    return rows


def _cli_ids(urls: dict[str, str]) -> list[str]:
    args = [a for u in urls.values() for a in ("--url", u)]
    result = CliRunner().invoke(sagas_command, [*args, "--all", "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    assert data["unreachable"] == {}
    return [s["saga_id"] for s in data["sagas"]]


def test_sagas_listed_once_in_a_killed_log_cut_over(manager: ShardManager, shard5_url: str) -> None:
    seed_ring_fleet(manager, FOUR, CUSTOMERS, Decimal(100))
    install_ring(manager, FOUR)
    ids = []
    for n in range(FINISHED):
        a, b = 1 + n % CUSTOMERS, 1 + (n * 7 + 3) % CUSTOMERS
        saga_id = f"listed-{n}"
        if a != b:
            assert transfer(manager, a, b, 1, transfer_id=saga_id).status == "complete"
            ids.append(saga_id)
    for n in range(OPEN):  # open sagas under a live lease, as a running worker leaves them
        saga_id = f"open-{n}"
        with manager.connect(FOUR.get_shard(saga_id)) as conn, conn.begin():
            assert saga_log.create(conn, saga_id, "credit_transfer", {"n": n}, "worker", 3600)
        ids.append(saga_id)
    assert flush_completion_marks(manager)

    urls = {s: manager.config(s).primary_url.render_as_string(False) for s in FOUR.shard_ids}
    urls["shard-5"] = shard5_url
    add = [*url_args(manager, FOUR.shard_ids), "--add", "shard-5", shard5_url]
    kill_mover_at(add, {"sql": "SET carried", "nth": 1})  # a log cut-over: target committed, source not

    with ShardManager.from_urls(urls) as five:
        on_servers = _on_servers(five, FIVE.shard_ids)
        twice = [i for i, n in Counter(i for _, i in on_servers).items() if n > 1]
        assert twice, "the kill left no log row on two servers: the window was not hit"

        listing = list_sagas(five, include_finished=True)
        listed = [s.saga_id for s in listing.sagas]
        assert not [i for i, n in Counter(listed).items() if n > 1], "a saga listed twice"
        assert sorted(listed) == sorted(ids)
        assert not listing.unreachable
        for info in listing.sagas:  # each from the shard its row lives on now: the source's
            if info.saga_id in twice:
                assert info.home_shard == FOUR.get_shard(info.saga_id), info
        open_listed = [s.saga_id for s in list_sagas(five).sagas]
        assert sorted(open_listed) == sorted(i for i in ids if i.startswith("open-"))
        cli = _cli_ids(urls)
        assert sorted(cli) == sorted(ids)

    result = CliRunner().invoke(rebalance_command, [*url_args(manager, FOUR.shard_ids), "--resume"])
    assert result.exit_code == 0, result.output
    with ShardManager.from_urls(urls) as five:
        listing = list_sagas(five, include_finished=True)
        assert sorted(s.saga_id for s in listing.sagas) == sorted(ids)
        for info in listing.sagas:
            assert info.home_shard == FIVE.get_shard(info.saga_id), info
        assert sorted(_cli_ids(urls)) == sorted(ids)
