"""Step 1: the schema, created by the project's own Alembic migrations on every shard in turn."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from rich.console import RenderableType
from rich.text import Text

from ..alembic import fleet_status
from ..manager import ShardManager
from .models import Base

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
"""The repository's ``migrations/`` (next to the package in a source checkout / editable install)."""


def alembic_config(urls: dict[str, str], out: io.StringIO) -> Config:
    """An in-memory Alembic config: the project's scripts, ``[shardkit]`` listing these shards."""
    config = Config(stdout=out, output_buffer=out)
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_section_option("shardkit", "shards", ", ".join(urls))
    for shard_id, url in urls.items():
        config.set_section_option("shardkit", f"{shard_id}.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def shard_urls(manager: ShardManager, shard_ids: list[str] | None = None) -> dict[str, str]:
    return {s: _render(manager.config(s).url) for s in shard_ids or manager.shard_ids}


def migrate(
    manager: ShardManager, shard_ids: list[str] | None = None
) -> tuple[list[RenderableType], dict[str, Any]]:
    """``alembic upgrade head`` over the shards, as the CLI runs it; returns its per-shard report."""
    if not (MIGRATIONS / "env.py").exists():
        ids = shard_ids or list(manager.shard_ids)
        for shard_id in ids:
            Base.metadata.create_all(manager.engine(shard_id))
        note = Text(
            "The project's migrations/ directory is not next to this installation (a wheel install?), "
            "so the schema was created with metadata.create_all instead. From a source checkout, "
            "`alembic upgrade head` runs the revisions on every shard."
        )
        return [note], {"shards": len(ids), "at_head": 0, "head": "-", "migrated": 0, "at_head_all": True}
    out = io.StringIO()
    urls = shard_urls(manager, shard_ids)
    config = alembic_config(urls, out)
    command.upgrade(config, "head")
    script = ScriptDirectory.from_config(config)
    status = fleet_status(manager, script)
    wanted = set(urls)
    at_head = [r for r in status.shards if r.shard_id in wanted and r.at_head]
    report = [line for line in out.getvalue().splitlines() if line.startswith("  ") or "OK" in line]
    migrated = sum(1 for line in report if " migrated " in line)
    body: list[RenderableType] = [
        Text("alembic upgrade head  (migrations/env.py -> sa_shardkit.alembic.run_migrations)", style="dim"),
        Text("\n".join(report)),
    ]
    figures = {
        "shards": len(urls),
        "migrated": migrated,
        "at_head": len(at_head),
        "head": script.get_current_head() or "-",
        "at_head_all": len(at_head) == len(urls),
    }
    return body, figures


def _render(url: Any) -> str:
    return url if isinstance(url, str) else str(url.render_as_string(hide_password=False))
