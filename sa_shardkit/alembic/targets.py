"""Which shards an Alembic command runs on: the application's own shard list, narrowed by ``-x``.

Shards come from the ``[shardkit]`` section of the Alembic config (``alembic.ini``) when it lists
shards, else from ``SHARD_<N>_URL`` environment variables: the same sources the application reads,
so there is no second list of URLs to keep in sync. ``-x shard=ID`` / ``-x shards=ID,ID`` narrow
the run; an unknown id is an error before anything connects.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from alembic.config import Config

from ..config import ShardSettings, settings_from_env, settings_from_mapping, with_shards
from ..errors import ConfigError, UnknownShardError

SECTION = "shardkit"


def settings_from_alembic_config(config: Config, section: str = SECTION) -> ShardSettings:
    """The fleet: ``[shardkit]`` of the Alembic config if it names shards, else ``SHARD_<N>_URL``."""
    values = config.get_section(section) or {}
    if values.get("shards", "").strip():
        where = f"{config.config_file_name or 'alembic config'} [{section}]"
        return settings_from_mapping(values, where=where)
    try:
        return settings_from_env()
    except ConfigError:
        raise ConfigError(
            f"no shards configured: list them in the [{section}] section of "
            f"{config.config_file_name or 'the Alembic config'} (shards = ..., <id>.url = ...) "
            "or set SHARD_1_URL, SHARD_2_URL, ..."
        ) from None


def requested_shards(x_args: Mapping[str, str]) -> list[str] | None:
    """The ids named by ``-x shard=`` and ``-x shards=`` (None: every shard)."""
    raw = [x_args[name] for name in ("shard", "shards") if name in x_args]
    if not raw:
        return None
    ids = [s for value in raw for s in re.split(r"[,\s]+", value.strip()) if s]
    if not ids:
        raise ConfigError("-x shard=/shards= names no shard")
    return list(dict.fromkeys(ids))


def select_shards(settings: ShardSettings, requested: list[str] | None) -> ShardSettings:
    """``settings`` narrowed to ``requested``, keeping configuration order (the fixed run order)."""
    if requested is None:
        return settings
    unknown = [s for s in requested if s not in settings.shard_ids]
    if unknown:
        raise UnknownShardError(
            f"unknown shard(s) {', '.join(map(repr, unknown))}; configured shards: "
            f"{', '.join(settings.shard_ids)}. Nothing was run."
        )
    wanted = set(requested)
    return with_shards(settings, [s for s in settings.shards if s.id in wanted])
