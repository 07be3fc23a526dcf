"""The PostgreSQL timeouts the sharded env sets on each shard's migration session.

``lock_timeout`` bounds how long a DDL statement queues for a table lock behind application
transactions (without it, an ``ALTER TABLE`` stuck behind one long transaction blocks every later
query on that table for as long as it waits); ``statement_timeout`` bounds how long one statement
may run. Each is ``-x NAME=VALUE`` or ``shardkit_NAME`` in ``[alembic]``. The env and the lint read
them here, so the lint renders exactly the ``SET`` the env runs and squawk checks what really runs.
"""

from __future__ import annotations

from collections.abc import Mapping

from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Connection

TIMEOUT_SETTINGS = ("lock_timeout", "statement_timeout")
"""The settings, in the order they are set (``-x NAME=`` / ``shardkit_NAME`` in ``[alembic]``)."""


def migration_timeouts(config: Config, x_args: Mapping[str, str]) -> dict[str, str]:
    """The timeouts a run sets on every shard: ``-x`` first, then ``alembic.ini``; unset ones omitted."""
    found = {
        name: x_args.get(name) or config.get_main_option(f"shardkit_{name}") for name in TIMEOUT_SETTINGS
    }
    return {name: value.strip() for name, value in found.items() if value and value.strip()}


def set_statement(name: str, value: str, *, local: bool = False) -> str:
    """``SET [LOCAL] name = 'value'`` (the literal quoted): the line offline SQL and the lint show."""
    quoted = value.replace("'", "''")
    return f"SET {'LOCAL ' if local else ''}{name} = '{quoted}'"


def apply_timeouts(conn: Connection, timeouts: Mapping[str, str]) -> None:
    """Set the timeouts for the whole session, so they also hold across an ``autocommit_block()``."""
    if conn.dialect.name != "postgresql":
        return
    for name, value in timeouts.items():
        conn.execute(text("SELECT set_config(:name, :value, false)"), {"name": name, "value": value})
