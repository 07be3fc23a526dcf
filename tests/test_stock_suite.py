"""The drop-in promise, tested with SQLAlchemy's own shard suite (see tests/stock_suite.py).

``test/ext/test_horizontal_shard.py`` from the installed SQLAlchemy's sdist runs as shipped and
with ``from sa_shardkit import ShardedSession`` substituted, on SQLite and on a PostgreSQL server of
the test fleet; every test the stock session passes must pass with ours. Stock's outcomes depend
only on SQLAlchemy, Python and the server version, so they are cached next to the sdist.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psycopg
import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from tests.fleet import TestFleet
from tests.stock_suite import SUBSTITUTION_TEST, cache_dir, run_suite, suite_tree

SUITE_DATABASE = "sa_stock_suite"


def _stock_outcomes(tmp_path: Path, backend: str, dburi: str | None) -> dict[str, str]:
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    cached = cache_dir() / f"stock-outcomes-{sqlalchemy.__version__}-py{python}-{backend}.json"
    if cached.exists():
        outcomes: dict[str, str] = json.loads(cached.read_text())
        return outcomes
    outcomes = run_suite(suite_tree(tmp_path / "stock", ours=False), dburi)
    if list(outcomes.values()).count("passed") > 100:  # never cache a broken run
        cached.write_text(json.dumps(outcomes, indent=1, sort_keys=True))
    return outcomes


def _compare(stock: dict[str, str], ours: dict[str, str]) -> None:
    stock_passed = sorted(name for name, outcome in stock.items() if outcome == "passed")
    assert len(stock_passed) > 100, f"the stock suite passed only {len(stock_passed)} tests: {stock}"
    assert ours.get(SUBSTITUTION_TEST) == "passed", "the suite did not run with sa_shardkit.ShardedSession"
    regressions = {name: ours.get(name, "not run") for name in stock_passed if ours.get(name) != "passed"}
    assert not regressions, f"{len(regressions)} tests pass with stock but not with ours: {regressions}"
    ours_passed = list(ours.values()).count("passed")
    # The figures the closing notes cite: `pytest -s tests/test_stock_suite.py` prints them.
    print(f"\nstock {len(stock_passed)} of {len(stock)} passed; ours {ours_passed} of {len(ours)} passed")


@pytest.fixture
def suite_dburi(pg_fleet: TestFleet) -> tuple[str, str]:
    """A fresh database on the first fleet server for the suite, and the server's version."""
    url = make_url(pg_fleet.urls[0])
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
    ) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SUITE_DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {SUITE_DATABASE}")
        version = str(conn.info.server_version)
    return url.set(database=SUITE_DATABASE).render_as_string(hide_password=False), version


@pytest.mark.timeout(1800)  # two runs of a 200-test suite on a busy 2-core machine
def test_stock_shard_suite_passes_on_sqlite(tmp_path: Path) -> None:
    stock = _stock_outcomes(tmp_path, "sqlite", None)
    ours = run_suite(suite_tree(tmp_path / "ours", ours=True))
    _compare(stock, ours)


@pytest.mark.timeout(1800)
def test_stock_shard_suite_passes_on_postgresql(tmp_path: Path, suite_dburi: tuple[str, str]) -> None:
    dburi, version = suite_dburi
    stock = _stock_outcomes(tmp_path, f"postgresql{version}", dburi)
    ours = run_suite(suite_tree(tmp_path / "ours", ours=True), dburi)
    _compare(stock, ours)
