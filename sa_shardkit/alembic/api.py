"""The fleet's migrations from Python: Alembic's commands returning the per-shard report, and one
ad-hoc statement run on every shard in turn with the same stop-at-the-first-failure rules.

``upgrade(config, "head")`` is ``alembic upgrade head`` (same env.py, same guarantees) without a
subprocess: it returns the :class:`MigrationReport` and raises :class:`ShardMigrationError` (whose
``.report`` says where it stopped) instead of printing ``FAILED:`` and exiting.
"""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..manager import ShardManager
from .api_keys import REPORT_ATTRIBUTE
from .environment import lock_shard, one_line_reason
from .report import MigrationReport, ShardMigrationError, ShardOutcome, ShardState
from .status import read_heads
from .timeouts import apply_timeouts

ConfigSource = Config | str | os.PathLike[str]


def alembic_config(
    config: ConfigSource, *, shards: Iterable[str] | None = None, x: Mapping[str, str] | None = None
) -> Config:
    """An Alembic ``Config`` for ``config`` (a path to ``alembic.ini`` or a Config), with
    ``-x`` arguments ``x`` and ``shards`` (``-x shards=...``) applied."""
    x_args = [f"{name}={value}" for name, value in (x or {}).items()]
    if shards is not None:
        x_args.append(f"shards={','.join(shards)}")
    if isinstance(config, Config):
        existing = list(getattr(config.cmd_opts, "x", None) or [])
        config.cmd_opts = Namespace(**{**vars(config.cmd_opts or Namespace()), "x": existing + x_args})
        return config
    cfg = Config(os.fspath(config), cmd_opts=Namespace(x=x_args))
    cfg.attributes["configure_logger"] = False  # a library call: leave the application's logging alone
    return cfg


def _report(config: Config) -> MigrationReport:
    report = config.attributes.pop(REPORT_ATTRIBUTE, None)
    if not isinstance(report, MigrationReport):
        raise ShardMigrationError(
            "the Alembic env did not report per shard: its env.py must call sa_shardkit.alembic.run_migrations()",
            MigrationReport("unknown", None, ()),
        )
    return report


def upgrade(config: ConfigSource, revision: str = "head", **kw: Any) -> MigrationReport:
    """``alembic upgrade REVISION`` on every shard (or ``shards=[...]``); the per-shard report."""
    cfg = alembic_config(config, shards=kw.pop("shards", None), x=kw.pop("x", None))
    command.upgrade(cfg, revision, **kw)
    return _report(cfg)


def downgrade(config: ConfigSource, revision: str, **kw: Any) -> MigrationReport:
    """``alembic downgrade REVISION``, shards in reverse configuration order; the per-shard report."""
    cfg = alembic_config(config, shards=kw.pop("shards", None), x=kw.pop("x", None))
    command.downgrade(cfg, revision, **kw)
    return _report(cfg)


def stamp(config: ConfigSource, revision: str, **kw: Any) -> MigrationReport:
    """``alembic stamp REVISION`` (``purge=True`` as ``--purge``); the per-shard report."""
    cfg = alembic_config(config, shards=kw.pop("shards", None), x=kw.pop("x", None))
    command.stamp(cfg, revision, **kw)
    return _report(cfg)


def current(config: ConfigSource, **kw: Any) -> MigrationReport:
    """Each shard's revision (``ShardOutcome.after``), as ``alembic current`` reads it."""
    cfg = alembic_config(config, shards=kw.pop("shards", None), x=kw.pop("x", None))
    command.current(cfg, **kw)
    return _report(cfg)


def run_on_every_shard(
    manager: ShardManager,
    statement: str,
    *,
    shard_ids: Iterable[str] | None = None,
    transaction: bool = True,
    lock_timeout: str | None = "5s",
    statement_timeout: str | None = None,
) -> MigrationReport:
    """Run one ad-hoc, idempotent DDL statement on every shard in turn (the design's ``runMigration``).

    Like a migration run: every target shard must answer before the first is touched; shards go in
    configuration order, each in one transaction (``transaction=False`` for ``CREATE INDEX
    CONCURRENTLY``) under the migration advisory lock and ``lock_timeout``; the first failure stops
    the run and raises :class:`ShardMigrationError` with the report. Re-running after a fix is safe
    only if the statement is idempotent (``IF NOT EXISTS``), which is why it should be.
    """
    ids = list(shard_ids) if shard_ids is not None else list(manager.shard_ids)
    for shard_id in ids:
        manager.config(shard_id)  # UnknownShardError before anything runs
    health = manager.health()
    down = [i for i in ids if not health[i].reachable]
    if down:
        _fail(
            MigrationReport(
                "statement",
                None,
                tuple(
                    ShardOutcome(i, ShardState.UNAVAILABLE, error=health[i].error)
                    if i in down
                    else ShardOutcome(i, ShardState.NOT_ATTEMPTED)
                    for i in ids
                ),
            )
        )
    timeouts = {
        n: v for n, v in (("lock_timeout", lock_timeout), ("statement_timeout", statement_timeout)) if v
    }
    outcomes: list[ShardOutcome] = []
    for position, shard_id in enumerate(ids):
        heads = read_heads(manager, shard_id)
        try:
            with manager.connect_direct(shard_id) as conn:  # session-level lock: never via PgBouncer
                try:
                    _run_one(conn, shard_id, statement, transaction, timeouts)
                finally:
                    conn.invalidate()  # the lock and the timeouts are session-level
        except Exception as error:  # noqa: BLE001 - recorded in the report, raised below
            outcomes.append(ShardOutcome(shard_id, ShardState.FAILED, heads, heads, one_line_reason(error)))
            outcomes += [ShardOutcome(i, ShardState.NOT_ATTEMPTED) for i in ids[position + 1 :]]
            _fail(MigrationReport("statement", None, tuple(outcomes)))
        outcomes.append(ShardOutcome(shard_id, ShardState.APPLIED, heads, heads))
    return MigrationReport("statement", None, tuple(outcomes))


def _run_one(
    conn: Connection,
    shard_id: str,
    statement: str,
    transaction: bool,
    timeouts: Mapping[str, str],
) -> None:
    if not transaction:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
    lock_shard(conn, shard_id)  # the same advisory lock as a migration run
    apply_timeouts(conn, timeouts)
    conn.execute(text(statement))
    if transaction:
        conn.commit()


def _fail(report: MigrationReport) -> NoReturn:
    raise ShardMigrationError(report.verdict(), report)
