"""A throwaway copy of the project's Alembic setup pointed at the test shards, and direct shard probes.

The copy (env.py, script template, every revision of ``migrations/versions``) lives in a temp dir, so
a test can add a revision of its own (chained onto the real head) without touching the repository.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import textwrap
from argparse import Namespace
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

REPO = Path(__file__).resolve().parent.parent


class AlembicProject:
    """``migrations/`` and ``alembic.ini`` copied into ``root``, with ``[shardkit]`` listing the shards."""

    def __init__(self, root: Path, shards: dict[str, str], *, list_shards_in_ini: bool = True) -> None:
        self.root = root
        self.migrations = root / "migrations"
        shutil.copytree(
            REPO / "migrations", self.migrations, ignore=shutil.ignore_patterns("__pycache__", "README")
        )
        self.versions = self.migrations / "versions"
        self.shards = shards
        ini = (REPO / "alembic.ini").read_text()
        ini = ini.replace("script_location = %(here)s/migrations", f"script_location = {self.migrations}")
        if list_shards_in_ini:
            section = f"[shardkit]\nshards = {', '.join(shards)}\n" + "".join(
                f"{shard_id}.url = {url}\n" for shard_id, url in shards.items()
            )
            ini = ini.replace("[shardkit]\n", section, 1)
        self.ini = root / "alembic.ini"
        self.ini.write_text(ini)
        self.stdout = io.StringIO()

    def config(self, *x: str) -> Config:
        """An Alembic Config as ``alembic -c <ini> -x ...`` builds it; output goes to ``self.stdout``."""
        config = Config(
            str(self.ini), stdout=self.stdout, output_buffer=self.stdout, cmd_opts=Namespace(x=list(x))
        )
        config.attributes["configure_logger"] = False  # keep pytest's log capture
        return config

    def output(self) -> str:
        """Everything printed since the last call."""
        text_ = self.stdout.getvalue()
        self.stdout.seek(0)
        self.stdout.truncate()
        return text_

    @property
    def head(self) -> str:
        heads = ScriptDirectory.from_config(self.config()).get_heads()
        assert len(heads) == 1, heads
        return heads[0]

    def add_revision(self, rev_id: str, upgrade: str, downgrade: str = "pass") -> str:
        """Write a revision on top of the current head; returns its id."""

        def block(code: str) -> str:
            return textwrap.indent(textwrap.dedent(code).strip(), "    ")

        source = (
            f'"""Test revision {rev_id}."""\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
            f"revision = {rev_id!r}\ndown_revision = {self.head!r}\nbranch_labels = None\ndepends_on = None\n\n\n"
            f"def upgrade():\n{block(upgrade)}\n\n\ndef downgrade():\n{block(downgrade)}\n"
        )
        (self.versions / f"{rev_id}_test.py").write_text(source)
        return rev_id

    def cli(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """``alembic -c <ini> ARGV`` in a subprocess: exit code and output as an operator sees them."""
        return subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(self.ini), *argv],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.root,
        )


def revision_on(url: str) -> tuple[str, ...]:
    """The ``alembic_version`` rows of one shard, read directly (empty: never migrated)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return ()
            return tuple(sorted(r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))))
    finally:
        engine.dispose()


def tables_on(url: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def columns_on(url: str, table: str) -> set[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return {c["name"] for c in inspect(conn).get_columns(table)}
    finally:
        engine.dispose()


def interval_on(url: str) -> tuple[Any, Any]:
    """The (started, finished) row a test revision recorded in table ``ran`` on one shard."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT started, finished FROM ran")).one()
            return row[0], row[1]
    finally:
        engine.dispose()


def execute_on(url: str, *statements: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


@contextmanager
def shardkit_warnings() -> Iterator[list[str]]:
    """Warnings of ``sa_shardkit.alembic``, captured on that logger (env.py may reconfigure the root)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("sa_shardkit.alembic")
    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def lines_mentioning(output: str, words: Sequence[str]) -> list[str]:
    return [line for line in output.splitlines() if all(w in line for w in words)]
