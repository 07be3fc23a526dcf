"""A shard that is down, frozen (SIGSTOP) or rejects the password: every session path names it.

Keyed ``get()``, keyed ``select``, ``flush`` and ``commit`` raise ``ShardUnavailableError`` with the
shard id (never the password); a scatter with ``allow_partial=True`` reports it in ``shard_errors``;
a process whose scatter met a frozen shard still exits. The hang guard is pytest-timeout (no timed
assertion): a frozen server would otherwise block these tests forever.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from sa_shardkit import ShardedSession, ShardManager
from sa_shardkit.aio import AsyncShardManager
from sa_shardkit.demo.models import Customer
from sa_shardkit.errors import ShardUnavailableError
from tests.cli_support import PASSWORD, require_password
from tests.fleet import TestFleet
from tests.session_support import create_schema

TIMEOUTS = {"connect_timeout": 2, "query_timeout": 3}
WRONG = "not-the-" + PASSWORD
FAULTS = ["down", "frozen", "password"]


def _server(shard_id: str) -> int:
    return int(shard_id.rsplit("-", 1)[1]) - 1  # shard-N is fleet server N-1


def _key_on(manager: ShardManager, shard_id: str) -> int:
    return next(k for k in range(1, 10_000) if manager.shard_for(k) == shard_id)


@contextmanager
def _faulty_manager(fleet: TestFleet, shard_map: dict[str, str], fault: str) -> Iterator[ShardManager]:
    """A schema'd manager whose shard-2 suffers ``fault`` once the block's ``fault()`` is called."""
    victim = "shard-2"
    urls = dict(shard_map)
    if fault == "password":
        urls[victim] = require_password(fleet.server(_server(victim))).replace("@", f":{WRONG}@", 1)
    with ShardManager.from_urls(urls, **TIMEOUTS) as manager:
        with ShardManager.from_urls(shard_map) as owner:
            create_schema(owner)
        yield manager


def _break(fleet: TestFleet, fault: str) -> None:
    server = fleet.server(_server("shard-2"))
    if fault == "down":
        server.stop()
    elif fault == "frozen":
        server.pause()


def _check(error: ShardUnavailableError) -> None:
    assert error.shard_id == "shard-2"
    assert "'shard-2'" in str(error)
    assert WRONG not in str(error) and PASSWORD not in str(error)


def _get(session: Session, key: int) -> Any:
    return session.get(Customer, key)


def _select(session: Session, key: int) -> Any:
    return session.scalars(select(Customer).where(Customer.customer_id == key)).all()


def _flush(session: Session, key: int) -> Any:
    session.add(Customer(customer_id=key, name="new"))
    session.flush()


def _commit(session: Session, key: int) -> Any:
    session.add(Customer(customer_id=key, name="new"))
    session.commit()


PATHS: dict[str, Callable[[Session, int], Any]] = {
    "get": _get,
    "select": _select,
    "flush": _flush,
    "commit": _commit,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("path", list(PATHS))
def test_each_path_names_the_unavailable_shard(
    pg_fleet: TestFleet, shard_map: dict[str, str], fault: str, path: str
) -> None:
    with _faulty_manager(pg_fleet, shard_map, fault) as manager:
        key = _key_on(manager, "shard-2")
        if fault != "password":  # a pooled connection first, as in a running app
            with ShardedSession(manager=manager) as warm:
                warm.get(Customer, key)
        _break(pg_fleet, fault)
        with ShardedSession(manager=manager) as session, pytest.raises(ShardUnavailableError) as raised:
            PATHS[path](session, key)
        _check(raised.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["down", "frozen"])
def test_commit_after_the_shard_failed_mid_transaction(
    pg_fleet: TestFleet, shard_map: dict[str, str], fault: str
) -> None:
    with _faulty_manager(pg_fleet, shard_map, fault) as manager:
        key = _key_on(manager, "shard-2")
        with ShardedSession(manager=manager) as session:
            session.add(Customer(customer_id=key, name="written"))
            session.flush()  # the INSERT reached shard-2; then it fails before COMMIT
            _break(pg_fleet, fault)
            with pytest.raises(ShardUnavailableError) as raised:
                session.commit()
        _check(raised.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", FAULTS)
def test_allow_partial_reports_the_shard_unavailable(
    pg_fleet: TestFleet, shard_map: dict[str, str], fault: str
) -> None:
    with _faulty_manager(pg_fleet, shard_map, fault) as manager:
        if fault != "password":
            with ShardedSession(manager=manager) as warm:
                warm.scalars(select(Customer)).all()
        _break(pg_fleet, fault)
        with ShardedSession(manager=manager) as session:
            result = session.execute(select(Customer).execution_options(allow_partial=True))
            assert result.scalars().all() == []
        assert list(result.shard_errors) == ["shard-2"]
        error = result.shard_errors["shard-2"]
        assert isinstance(error, ShardUnavailableError)
        _check(error)


SCRIPT = """
import sys
from sqlalchemy import select, text
from sa_shardkit import ShardManager, ShardedSession
from sa_shardkit.demo.models import Customer

manager = ShardManager.from_urls(dict(arg.split("=", 1) for arg in sys.argv[1:]), connect_timeout=2)
with ShardedSession(manager=manager) as session:
    session.scalars(select(Customer)).all()  # pooled connections to every shard
print("ready", flush=True)
sys.stdin.readline()  # the test freezes shard-2 now
with ShardedSession(manager=manager) as session:
    result = session.execute(select(Customer).execution_options(allow_partial=True))
    result.all()
print("missing", ",".join(result.shard_errors), flush=True)
"""


@pytest.mark.timeout(180)
def test_a_process_exits_after_its_scatter_met_a_frozen_shard(
    pg_fleet: TestFleet, shard_map: dict[str, str]
) -> None:
    with ShardManager.from_urls(shard_map) as owner:
        create_schema(owner)
    args = [f"{s}={u}" for s, u in shard_map.items()]
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        pg_fleet.server(_server("shard-2")).pause()
        child.stdin.write("go\n")
        child.stdin.flush()
        out = child.stdout.read()  # EOF only once the process is gone
        assert child.wait(timeout=120) == 0
    assert "missing shard-2" in out


@pytest.mark.timeout(120)
def test_a_statement_on_a_server_that_froze_mid_query_is_bounded(
    pg_fleet: TestFleet, shard_map: dict[str, str]
) -> None:
    with _faulty_manager(pg_fleet, shard_map, "frozen") as manager:
        freeze = threading.Timer(0.5, _break, (pg_fleet, "frozen"))
        with ShardedSession(manager=manager) as session, pytest.raises(ShardUnavailableError) as raised:
            session.connection(bind_arguments={"shard_id": "shard-2"})
            freeze.start()  # the 2 s sleep would end after the freeze: only the query timeout ends it
            session.execute(text("SELECT pg_sleep(2)"), bind_arguments={"shard_id": "shard-2"})
        freeze.join()
        _check(raised.value)
        assert "within 3s" in str(raised.value)


async def _async_path(
    manager: ShardManager, fleet: TestFleet, fault: str, path: str, key: int
) -> ShardUnavailableError:
    """Run ``path`` through an AsyncSession after ``fault``; the error it raised."""
    async with AsyncShardManager(manager) as shards:
        Session = shards.sessionmaker()  # noqa: N806
        if fault != "password":  # a pooled connection first, as in a running app
            async with Session() as session:
                await session.get(Customer, key)
        _break(fleet, fault)
        async with Session() as session:
            try:
                if path == "get":
                    await session.get(Customer, key)
                elif path == "select":
                    (await session.scalars(select(Customer).where(Customer.customer_id == key))).all()
                else:
                    session.add(Customer(customer_id=key, name="new"))
                    await session.flush()
            except ShardUnavailableError as error:
                return error
    raise AssertionError(f"async {path} on a broken shard raised nothing")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("path", ["get", "select", "flush"])
def test_each_async_path_names_the_unavailable_shard(
    pg_fleet: TestFleet, shard_map: dict[str, str], fault: str, path: str
) -> None:
    """The async engines are guarded like the sync ones: the shard is named, the wait bounded by
    its connect/query timeout (pytest-timeout catches a hang)."""
    with _faulty_manager(pg_fleet, shard_map, fault) as manager:
        key = _key_on(manager, "shard-2")
        error = asyncio.run(_async_path(manager, pg_fleet, fault, path, key))
    _check(error)
