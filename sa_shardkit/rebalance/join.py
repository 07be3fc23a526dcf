"""A joining shard is made ready to serve before any key moves to it.

The fleet's shards agree on one Alembic revision (``alembic_version``). A joining shard is brought
to that revision through the project's own migrations (``alembic upgrade <revision>`` on that shard
only), so its schema, ``alembic_version`` and the library's tables (saga log and receipts, 2PC
decisions, sequences) are exactly what the others have; the rebalance then copies the reference
rows and only after that moves keys. If the revisions cannot be made equal (no migrations given,
an unknown revision on the new shard, a migration that fails), it refuses before anything moves.

A fleet that is not managed by Alembic (no shard has ``alembic_version``) gets the models' tables
(``create_all``) and, when the fleet has them, the saga tables, as before.
"""

from __future__ import annotations

import configparser
from collections.abc import Iterable
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from ..errors import RebalanceError
from ..manager import ShardManager
from ..saga.tables import saga_metadata
from .tables import TableSet

Revision = tuple[str, ...]


def alembic_config(path: str | None) -> Config | None:
    """The Alembic config at ``path`` (default ./alembic.ini) when it has ``[alembic] script_location``."""
    file = Path(path) if path else Path("alembic.ini")
    if not file.exists() or file.suffix == ".toml":
        return None
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(file)
    if not parser.has_option("alembic", "script_location"):
        return None
    return Config(str(file))


def shard_revision(conn: Connection) -> Revision | None:
    """The shard's ``alembic_version`` rows (sorted); None when the table does not exist."""
    if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
        return None
    return tuple(sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()))


def fleet_revision(manager: ShardManager, shard_ids: Iterable[str]) -> Revision | None:
    """The revision every shard of ``shard_ids`` is at; None when none uses Alembic.

    Shards that disagree raise :class:`RebalanceError` (migrate the fleet first).
    """
    found = manager.run_on_all(shard_revision, shard_ids=list(shard_ids), write=True)
    revisions = set(found.values())
    if len(revisions) > 1:
        listed = ", ".join(f"{s}: {_show(r)}" for s, r in found.items())
        raise RebalanceError(
            f"the shards are at different Alembic revisions ({listed}): run `shardkit migrations "
            "upgrade` first; nothing was moved"
        )
    return next(iter(revisions), None)


def prepare_joining_shard(
    manager: ShardManager,
    shard_id: str,
    fleet_shards: Iterable[str],
    spec: TableSet,
    migrations: Config | None,
) -> None:
    """Bring ``shard_id`` to the fleet's schema (see the module docstring); raises before any move."""
    fleet_ids = [s for s in fleet_shards if s != shard_id]
    wanted = fleet_revision(manager, fleet_ids)
    with manager.connect(shard_id) as conn:
        have = shard_revision(conn)
        conn.rollback()
    if wanted is None:
        if have:
            raise RebalanceError(
                f"joining shard {shard_id!r} is at Alembic revision {_show(have)}, but the fleet "
                "uses no Alembic revisions: use an empty database; nothing was moved"
            )
        _create_model_tables(manager, shard_id, spec, fleet_ids)
        return
    if have != wanted:
        if migrations is None:
            raise RebalanceError(
                f"the fleet is at Alembic revision {_show(wanted)} and joining shard {shard_id!r} at "
                f"{_show(have)}: pass the Alembic config (shardkit rebalance --config alembic.ini, or "
                "migrations=Config(...)) so the new shard is migrated first; nothing was moved"
            )
        _upgrade_one(migrations, manager, shard_id, wanted)
        with manager.connect(shard_id) as conn:
            have = shard_revision(conn)
            conn.rollback()
        if have != wanted:
            raise RebalanceError(
                f"joining shard {shard_id!r} is at Alembic revision {_show(have)} after the upgrade, "
                f"not the fleet's {_show(wanted)}; nothing was moved"
            )
    missing = [t.name for t in spec.tables if not inspect(manager.engine(shard_id)).has_table(t.name)]
    if missing:
        raise RebalanceError(
            f"joining shard {shard_id!r} at revision {_show(wanted)} lacks table(s) {', '.join(missing)} "
            "that move: the migrations do not create them; nothing was moved"
        )


def _upgrade_one(migrations: Config, manager: ShardManager, shard_id: str, revision: Revision) -> None:
    """``alembic upgrade`` of ``shard_id`` alone, to ``revision``, through the project's migrations."""
    url = manager.engine(shard_id).url.render_as_string(hide_password=False)
    config = Config(
        migrations.config_file_name,
        ini_section=migrations.config_ini_section,
        stdout=migrations.stdout,
        cmd_opts=migrations.cmd_opts,
        attributes=dict(migrations.attributes),
    )
    for section in ("alembic",):  # settings given in code (a Config without a file) carry over
        for name, value in (migrations.get_section(section) or {}).items():
            config.set_section_option(section, name, value.replace("%", "%%"))
    config.set_section_option("shardkit", "shards", shard_id)
    config.set_section_option("shardkit", f"{shard_id}.url", url.replace("%", "%%"))
    targets = list(revision) or ["base"]
    try:
        for target in targets:
            command.upgrade(config, target)
    except Exception as error:  # noqa: BLE001 - reported as a refusal, with its cause
        reason = str(error).strip().splitlines()
        raise RebalanceError(
            f"could not migrate joining shard {shard_id!r} to the fleet's revision {_show(revision)}: "
            f"{reason[0] if reason else type(error).__name__}; nothing was moved"
        ) from error


def _create_model_tables(manager: ShardManager, shard_id: str, spec: TableSet, fleet_ids: list[str]) -> None:
    engine = manager.engine(shard_id)
    for metadata in {t.metadata for t in spec.tables}:
        metadata.create_all(engine, tables=[t for t in spec.tables if t.metadata is metadata])
    if fleet_ids and inspect(manager.engine(fleet_ids[0])).has_table("shardkit_sagas"):
        saga_metadata.create_all(engine, checkfirst=True)


def _show(revision: Revision | None) -> str:
    if revision is None:
        return "none (no alembic_version table)"
    return ",".join(revision) or "base"
