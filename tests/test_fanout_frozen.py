"""A frozen shard (a real SIGSTOP) under the fan-out loops, with more shards than one loop serves.

31 warm shards run on two lean loops (``LEAN_SHARDS`` = 16 here) or, with a statement listener,
as two greenlet hubs (16 + 15 on two threads, :data:`HUB_SHARDS`); the server holding
one of them is SIGSTOPped. ``query_all_shards``/``run_on_all`` must name that shard within its
connect timeout (partial: in ``shard_errors``; otherwise raised), and the process must then exit
normally while the server is still frozen (no thread left waiting on it). The fan-out runs in a
child process, so a hang or a stuck exit is seen as such.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from sa_shardkit.scatter.connected import HUB_SHARDS
from tests.fleet import TestFleet
from tests.many_shards import many_databases

FROZEN = "shard-4"  # the only shard on server 3 that the child uses (the rest are on servers 0-2)

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from sa_shardkit import ShardConfig, ShardManager, ShardUnavailableError

    from sqlalchemy import event
    import sa_shardkit.scatter.lean as lean

    urls, path = json.loads(sys.argv[1]), sys.argv[2]
    configs = [ShardConfig(id=s, url=u, connect_timeout=1.0) for s, u in urls.items()]
    manager = ShardManager(configs)
    lean.LEAN_SHARDS = 16  # 31 shards: two lean loops, on two threads
    if path == "hub":  # a statement listener: every shard on the greenlet hubs (16 per thread)
        for engine in manager.engines.values():
            event.listen(engine, "before_cursor_execute", lambda *args: None)
    manager.run_on_all("SELECT 1")  # every pool holds an idle connection: all shards on the hub
    manager.query_all_shards("SELECT 1")
    print("warm", flush=True)
    sys.stdin.readline()  # the parent froze the server meanwhile
    report = {}
    started = time.monotonic()
    result = manager.query_all_shards("SELECT current_database() AS db", allow_partial=True)
    report["partial_rows"] = len(result.all())
    report["partial_errors"] = {s: [type(e).__name__, str(e)] for s, e in result.shard_errors.items()}
    report["missing"] = list(result.missing_shards)
    report["partial_seconds"] = time.monotonic() - started
    for path in ("query_all_shards", "run_on_all"):
        started = time.monotonic()
        try:
            getattr(manager, path)("SELECT 1")
        except ShardUnavailableError as error:
            report[path] = [error.shard_id, str(error), time.monotonic() - started]
        else:
            report[path] = None
    print(json.dumps(report), flush=True)
    """
)


@pytest.fixture(scope="module")
def forty(pg_fleet: TestFleet) -> Iterator[dict[str, str]]:
    with many_databases(pg_fleet, 40, "frozenhub") as shards:
        yield shards


@pytest.mark.parametrize("path", ["lean", "hub"])
def test_a_frozen_shard_under_several_hubs_is_named_and_the_process_exits(
    pg_fleet: TestFleet, forty: dict[str, str], path: str
) -> None:
    servers = pg_fleet.urls
    server_of = {s: forty[s].rsplit("/", 1)[0] for s in forty}
    frozen_server = server_of[FROZEN]
    shards = {s: u for s, u in forty.items() if server_of[s] != frozen_server or s == FROZEN}
    assert len(shards) == 31 > 16 == HUB_SHARDS and frozen_server == servers[3].rsplit("/", 1)[0]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(shards), path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = pg_fleet.server(3)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "warm"
        assert server.pause() > 0
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=120)  # a hang (or a stuck exit) fails here
    finally:
        child.kill()
        server.resume()
    assert child.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["partial_rows"] == 30 and report["missing"] == [FROZEN]
    assert list(report["partial_errors"]) == [FROZEN]
    kind, message = report["partial_errors"][FROZEN]
    assert kind == "ShardUnavailableError" and FROZEN in message
    for path in ("query_all_shards", "run_on_all"):
        assert report[path] is not None, f"{path} did not raise"
        shard_id, message, seconds = report[path]
        assert shard_id == FROZEN and FROZEN in message
        assert seconds < 60  # bounded by the 1 s connect timeout, not by query_timeout (300 s)
