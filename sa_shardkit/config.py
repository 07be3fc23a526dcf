"""Shard configuration: one :class:`ShardConfig` per shard, from code, env vars or an ini/TOML file.

The same file Alembic reads (``alembic.ini``) can carry a ``[shardkit]`` section, so the application,
the migrations and the CLI share one list of URLs::

    [shardkit]
    shards = shard-1, shard-2
    shard-1.url = postgresql+psycopg://app@db1/app
    shard-1.replica_url = postgresql+psycopg://app@db1-replica/app
    shard-2.url = postgresql+psycopg://app@db2/app
    shard-2.weight = 2
    pool_size = 20

Environment variables use the design's names: ``SHARD_<N>_URL`` (shard id ``shard-<N>``), optional
``SHARD_<N>_REPLICA_URL`` and ``SHARD_<N>_WEIGHT``; ``SHARDKIT_VNODES`` and ``SHARDKIT_POOL_SIZE``
set ring and pool options.
"""

from __future__ import annotations

import configparser
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError, DuplicateShardError
from .ring import DEFAULT_VNODES

_ENV_URL = re.compile(r"^SHARD_(\d+)_URL$")


@dataclass(frozen=True)
class ShardConfig:
    """How to reach one shard and how to pool its connections."""

    id: str
    url: str | URL
    replica_url: str | URL | None = None
    weight: float = 1
    pool_size: int = 20
    max_overflow: int = 10
    pool_recycle: float = 30.0
    """Seconds after which an idle connection is replaced (the design's idle timeout)."""
    connect_timeout: float = 3.0
    """Seconds a new connection (and a pooled one's pre-ping) may take before the shard is unavailable."""
    query_timeout: float | None = 300.0
    """Seconds a statement, commit or rollback may wait for the server before the client drops the
    connection and raises ShardUnavailableError (a frozen server never answers); None: no bound.
    Per statement: ``execution_options(shardkit_query_timeout=...)``."""
    pool_timeout: float = 10.0
    fence_timeout: float | None = 5.0
    """Seconds a write, scatter or saga listing waits for a rebalance cut-over holding this shard's
    fence (its state row, while the shard is a move's source) before it raises
    FenceTimeoutError naming the shard (a frozen mover otherwise blocks them until
    ``query_timeout``); a cut-over normally holds it ~``MoveOptions.fence_seconds``. None: no bound."""
    pool_pre_ping: bool = True
    max_replica_lag: float = 5.0
    """Seconds the replica may trail the primary before reads fall back to the primary."""
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    pgbouncer: bool = False
    """``url`` (and ``replica_url``) reach PgBouncer in transaction pooling mode: psycopg's prepared
    statements are turned off (``prepare_threshold=None``), and work that needs session state
    (migrations' and the rebalance mover's advisory locks) uses ``direct_url``."""
    direct_url: str | URL | None = None
    """The shard's PostgreSQL itself, bypassing PgBouncer: for session-level locks and settings."""

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ConfigError(f"shard id must be a non-empty string, got {self.id!r}")
        object.__setattr__(self, "url", _parse_url(self.id, "url", self.url))
        if self.replica_url is not None:
            object.__setattr__(self, "replica_url", _parse_url(self.id, "replica_url", self.replica_url))
        if self.direct_url is not None:
            object.__setattr__(self, "direct_url", _parse_url(self.id, "direct_url", self.direct_url))
        weight = self.weight
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise ConfigError(f"shard {self.id!r}: weight must be > 0, got {weight!r}")
        if self.pool_size < 1:
            raise ConfigError(f"shard {self.id!r}: pool_size must be >= 1, got {self.pool_size!r}")
        if self.connect_timeout <= 0:
            raise ConfigError(f"shard {self.id!r}: connect_timeout must be > 0")
        if self.query_timeout is not None and self.query_timeout <= 0:
            raise ConfigError(f"shard {self.id!r}: query_timeout must be > 0 (or None for no bound)")
        if self.fence_timeout is not None and self.fence_timeout <= 0:
            raise ConfigError(f"shard {self.id!r}: fence_timeout must be > 0 (or None for no bound)")

    @property
    def primary_url(self) -> URL:
        assert isinstance(self.url, URL)
        return self.url

    @property
    def direct(self) -> URL:
        """The URL for session-level work: ``direct_url``, or ``url`` when no pooler is in between.

        Raises :class:`ConfigError` for a shard behind PgBouncer without ``direct_url``: under
        transaction pooling a session-level advisory lock or ``SET`` would land on whichever server
        connection PgBouncer picks, and outlive or miss the work it was meant to guard.
        """
        if self.direct_url is not None:
            assert isinstance(self.direct_url, URL)
            return self.direct_url
        if self.pgbouncer:
            raise ConfigError(
                f"shard {self.id!r} is reached through PgBouncer (pgbouncer = true): migrations, "
                "the rebalance mover and lookup writes hold session-level advisory locks, which "
                f"transaction pooling breaks; set {self.id}.direct_url to the shard's PostgreSQL itself"
            )
        return self.primary_url

    @property
    def replica(self) -> URL | None:
        assert self.replica_url is None or isinstance(self.replica_url, URL)
        return self.replica_url

    def safe_url(self) -> str:
        """The primary URL with its password masked, for messages and logs."""
        return self.primary_url.render_as_string(hide_password=True)


@dataclass(frozen=True)
class ShardSettings:
    """Everything a :class:`~sa_shardkit.manager.ShardManager` is built from."""

    shards: tuple[ShardConfig, ...]
    vnodes: int = DEFAULT_VNODES

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("no shards configured")
        seen: set[str] = set()
        for shard in self.shards:
            if shard.id in seen:
                raise DuplicateShardError(f"shard id {shard.id!r} is configured twice")
            seen.add(shard.id)

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.shards)


def _parse_url(shard_id: str, name: str, value: str | URL) -> URL:
    if isinstance(value, URL):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"shard {shard_id!r}: {name} is missing")
    try:
        url = make_url(value.strip())
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise ConfigError(f"shard {shard_id!r}: {name} is not a database URL") from None
    _check_backend(shard_id, name, url)
    return url


SUPPORTED_BACKENDS = ("postgresql", "sqlite")
"""PostgreSQL is the product; SQLite only backs ``shardkit demo``'s embedded shards."""


def _check_backend(shard_id: str, name: str, url: URL) -> None:
    """Refuse a URL SQLAlchemy could not use here, in one line, before any engine exists."""
    scheme = url.drivername
    where = f"shard {shard_id!r}: {name} scheme {scheme + '://'!r}"
    if url.get_backend_name() == "postgres":
        raise ConfigError(f"{where} is not a SQLAlchemy dialect: use postgresql+psycopg://")
    if url.get_backend_name() not in SUPPORTED_BACKENDS:
        raise ConfigError(f"{where}: sa_shardkit supports PostgreSQL only (postgresql+psycopg://...)")
    try:
        url.get_dialect().import_dbapi()
    except (ArgumentError, ImportError) as error:  # NoSuchModuleError is an ArgumentError
        raise ConfigError(f"{where}: driver not available ({error})") from None


def _flag(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


_POOL_KEYS: dict[str, Callable[[str], Any]] = {
    "pool_size": int,
    "max_overflow": int,
    "pool_recycle": float,
    "connect_timeout": float,
    "query_timeout": float,
    "pool_timeout": float,
    "fence_timeout": float,
    "pool_pre_ping": _flag,
    "max_replica_lag": float,
    "pgbouncer": _flag,
}


def _pool_options(source: Mapping[str, str], where: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, convert in _POOL_KEYS.items():
        if key in source:
            try:
                options[key] = convert(source[key])
            except ValueError:
                raise ConfigError(f"{where}: {key} = {source[key]!r} is not valid") from None
    return options


def _weight(raw: str, where: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{where}: weight {raw!r} is not a number") from None


def settings_from_env(environ: Mapping[str, str] | None = None) -> ShardSettings:
    """Read ``SHARD_<N>_URL`` / ``_REPLICA_URL`` / ``_DIRECT_URL`` / ``_WEIGHT`` (ids ``shard-<N>``)."""
    env = os.environ if environ is None else environ
    numbers = sorted(int(m.group(1)) for name in env if (m := _ENV_URL.match(name)))
    if not numbers:
        raise ConfigError("no SHARD_<N>_URL environment variables are set (e.g. SHARD_1_URL)")
    missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
    if missing:  # a forgotten variable would silently build a smaller ring and misroute every key
        names = ", ".join(f"SHARD_{n}_URL" for n in missing)
        raise ConfigError(
            f"{names} is not set but SHARD_{numbers[-1]}_URL is: shards are numbered 1..N without gaps"
        )
    defaults = _pool_options(
        {k[len("SHARDKIT_") :].lower(): v for k, v in env.items() if k.startswith("SHARDKIT_")},
        "environment",
    )
    shards = []
    for n in numbers:
        weight = env.get(f"SHARD_{n}_WEIGHT")
        shards.append(
            ShardConfig(
                id=f"shard-{n}",
                url=env[f"SHARD_{n}_URL"],
                replica_url=env.get(f"SHARD_{n}_REPLICA_URL") or None,
                direct_url=env.get(f"SHARD_{n}_DIRECT_URL") or None,
                weight=_weight(weight, f"SHARD_{n}_WEIGHT") if weight else 1,
                **defaults,
            )
        )
    vnodes = env.get("SHARDKIT_VNODES")
    return ShardSettings(tuple(shards), vnodes=int(vnodes) if vnodes else DEFAULT_VNODES)


def settings_from_file(path: str | os.PathLike[str], section: str = "shardkit") -> ShardSettings:
    """Read a ``[shardkit]`` section from an ini file (e.g. ``alembic.ini``) or a TOML file."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    if file.suffix == ".toml":
        return _settings_from_toml(file, section)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(file)
    if not parser.has_section(section):
        raise ConfigError(f"{file}: no [{section}] section")
    values = dict(parser.items(section))
    if not values.get("shards", "").strip():
        return _env_instead_of(f"{file} [{section}]")
    return settings_from_mapping(values, where=f"{file} [{section}]")


def _env_instead_of(where: str) -> ShardSettings:
    """A ``[shardkit]`` section that lists no shards defers to ``SHARD_<N>_URL``, as Alembic's env does."""
    try:
        return settings_from_env()
    except ConfigError as error:
        if "no SHARD_<N>_URL" not in str(error):
            raise  # a gap or a bad URL in the variables: say that, not "no shards"
        raise ConfigError(
            f"{where} lists no shards (shards = shard-1, ... and shard-1.url = ...) "
            "and no SHARD_<N>_URL environment variable is set"
        ) from None


def settings_from_mapping(values: Mapping[str, str], *, where: str = "config") -> ShardSettings:
    """Build settings from flat ``shards`` / ``<id>.url`` / ``<id>.weight`` / pool keys."""
    values = {k.strip().lower(): str(v).strip() for k, v in values.items()}
    raw_ids = values.get("shards", "")
    ids = [s.strip() for s in re.split(r"[,\s]+", raw_ids) if s.strip()]
    if not ids:
        raise ConfigError(f"{where}: 'shards' lists no shard ids")
    defaults = _pool_options(values, where)
    shards = []
    for shard_id in ids:
        url = values.get(f"{shard_id}.url")
        if not url:
            raise ConfigError(f"{where}: shard {shard_id!r} has no '{shard_id}.url'")
        own = _pool_options(
            {k[len(shard_id) + 1 :]: v for k, v in values.items() if k.startswith(f"{shard_id}.")},
            f"{where} shard {shard_id!r}",
        )
        weight = values.get(f"{shard_id}.weight")
        shards.append(
            ShardConfig(
                id=shard_id,
                url=os.path.expandvars(url),
                replica_url=os.path.expandvars(values[f"{shard_id}.replica_url"])
                if values.get(f"{shard_id}.replica_url")
                else None,
                direct_url=os.path.expandvars(values[f"{shard_id}.direct_url"])
                if values.get(f"{shard_id}.direct_url")
                else None,
                weight=_weight(weight, f"{where} {shard_id}.weight") if weight else 1,
                **{**defaults, **own},
            )
        )
    vnodes = values.get("vnodes")
    return ShardSettings(tuple(shards), vnodes=int(vnodes) if vnodes else DEFAULT_VNODES)


def _settings_from_toml(file: Path, section: str) -> ShardSettings:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    data = tomllib.loads(file.read_text())
    table = data.get(section) or data.get("tool", {}).get(section)
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: no [{section}] table")
    shards_table = table.get("shards")
    if not isinstance(shards_table, list) or not shards_table:
        raise ConfigError(f"{file}: [{section}] needs a [[{section}.shards]] array with id and url")
    defaults = {k: v for k, v in table.items() if k in _POOL_KEYS}
    shards = [ShardConfig(**{**defaults, **entry}) for entry in shards_table]
    return ShardSettings(tuple(shards), vnodes=int(table.get("vnodes", DEFAULT_VNODES)))


def with_shards(settings: ShardSettings, shards: Iterable[ShardConfig]) -> ShardSettings:
    """A copy of ``settings`` with a different shard list (used when a shard is added or removed)."""
    return replace(settings, shards=tuple(shards))
