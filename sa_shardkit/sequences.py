"""Fleet-wide id sequences: hi-lo blocks reserved from one row on a designated shard.

Per-shard ``SERIAL`` columns hand out the same numbers on every shard, so a shard key (or any id that
must be unique across the fleet) needs one allocator for the fleet. As in Vitess sequences, each
sequence is a row ``(name, next_id)`` in ``shardkit_sequences`` on one shard (the first configured
shard unless told otherwise). A process reserves a block of ``block_size`` ids with one
``UPDATE ... SET next_id = next_id + block RETURNING next_id`` in its own committed transaction, then
hands the block out from memory (thread-safe).

Why an id is never issued twice: a block is handed out only after the UPDATE that moved ``next_id``
past it has committed, and PostgreSQL's row lock serialises concurrent UPDATEs, so every committed
UPDATE reserves a disjoint range. A crash loses only the unissued rest of the block: ids have gaps
(up to ``block_size - 1`` per process restart), never repeats. Ids are increasing per process, not
globally ordered across processes.

Usage::

    class Customer(Base):
        __tablename__ = "customers"
        __shard_key__ = "customer_id"
        customer_id: Mapped[int] = mapped_column(BigInteger, primary_key=True,
                                                 default=ShardSequence("customers"))

    session.add(Customer(name="Ada"))    # the sharded session assigns customer_id before routing
    manager.next_id("customers")         # or ask directly
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Column, MetaData, String, Table, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm.base import instance_state

from .errors import ConfigError, SequenceError

if TYPE_CHECKING:
    from sqlalchemy.orm import Mapper

    from .manager import ShardManager

DEFAULT_BLOCK_SIZE = 1000
"""Ids reserved per round trip to the sequence shard (at most this many lost per process crash)."""

sequence_metadata = MetaData()
"""sa_shardkit's sequence table; include it in ``run_migrations([...])`` so autogenerate keeps it."""

sequences_table = Table(
    "shardkit_sequences",
    sequence_metadata,
    Column("name", String(100), primary_key=True),
    Column("next_id", BigInteger, nullable=False),
    comment="sa_shardkit fleet-wide sequences: the next unreserved id of each (used on one shard)",
)


def create_sequence_tables(manager: ShardManager) -> None:
    """Create ``shardkit_sequences`` on every shard (existing tables are left alone).

    Only the sequence shard's table holds rows; the others exist so the same migrations run on
    every shard and another shard can be designated later.
    """
    for shard_id in manager.shard_ids:
        sequence_metadata.create_all(manager.engine(shard_id), checkfirst=True)


@dataclass
class _Block:
    next: int = 0
    end: int = 0  # exclusive


class ShardSequence:
    """A column default that takes ids from the fleet-wide sequence ``name``.

    The sharded session assigns it at flush, before the row is routed (so it works for the shard key
    itself). ``start`` is the first id a new sequence hands out; ``block_size`` overrides the
    allocator's default for this sequence.
    """

    def __init__(self, name: str, *, start: int = 1, block_size: int | None = None) -> None:
        if not name or len(name) > 100:
            raise ConfigError(f"a sequence name must be 1-100 characters, got {name!r}")
        if block_size is not None and block_size < 1:
            raise ConfigError(f"sequence {name!r}: block_size must be at least 1, got {block_size}")
        self.name = name
        self.start = start
        self.block_size = block_size
        _declared.append(name)

    def __call__(self, context: Any) -> int:
        # Reached only when a row is inserted without the sharded session's flush (plain Core).
        raise SequenceError(
            f"ShardSequence({self.name!r}) is assigned by ShardedSession at flush; for a Core INSERT "
            f"pass the value from manager.next_id({self.name!r})"
        )

    def __repr__(self) -> str:
        return f"ShardSequence({self.name!r})"


class SequenceAllocator:
    """Hands out ids of fleet-wide sequences for one process (one per manager; thread-safe).

    :param shard_id: the shard holding the sequence rows (default: the first configured shard).
        Every process of the fleet must use the same one; the first allocation of a sequence checks
        that no other shard already holds its row.
    :param block_size: ids reserved per round trip (default :data:`DEFAULT_BLOCK_SIZE`).
    """

    def __init__(
        self, manager: ShardManager, *, shard_id: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        if block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {block_size}")
        self.manager = manager
        self.shard_id = shard_id if shard_id is not None else manager.shard_ids[0]
        manager.config(self.shard_id)  # UnknownShardError for a bad id
        self.block_size = block_size
        self._blocks: dict[str, _Block] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def next_id(self, name: str, *, start: int = 1, block_size: int | None = None) -> int:
        """The next id of sequence ``name`` (created at ``start`` on first use)."""
        return self.next_ids(name, 1, start=start, block_size=block_size)[0]

    def next_ids(self, name: str, count: int, *, start: int = 1, block_size: int | None = None) -> list[int]:
        """``count`` ids of sequence ``name``, increasing (a flush of many rows asks once)."""
        lock = self._lock_for(name)
        out: list[int] = []
        with lock:
            block = self._blocks.setdefault(name, _Block())
            while len(out) < count:
                if block.next >= block.end:
                    size = max(block_size or self.block_size, min(count - len(out), 100_000))
                    block.next, block.end = self._reserve(name, size, start)
                take = min(count - len(out), block.end - block.next)
                out.extend(range(block.next, block.next + take))
                block.next += take
        return out

    def _lock_for(self, name: str) -> threading.Lock:
        lock = self._locks.get(name)
        if lock is None:
            with self._guard:
                lock = self._locks.setdefault(name, threading.Lock())
        return lock

    def _reserve(self, name: str, size: int, start: int) -> tuple[int, int]:
        """Reserve ``[first, end)`` with a committed UPDATE on the sequence shard."""
        bump = (
            update(sequences_table)
            .where(sequences_table.c.name == name)
            .values(next_id=sequences_table.c.next_id + size)
            .returning(sequences_table.c.next_id)
        )
        for _ in range(2):
            with self.manager.connect(self.shard_id) as conn:
                try:
                    end = conn.execute(bump).scalar()
                except ProgrammingError as error:
                    raise SequenceError(
                        f"sequence {name!r}: table shardkit_sequences is missing on shard "
                        f"{self.shard_id!r}; run the migrations (or create_sequence_tables(manager))"
                    ) from error
                conn.commit()
            if end is not None:
                return int(end) - size, int(end)
            self._create(name, start)
        raise SequenceError(f"sequence {name!r} could not be created on shard {self.shard_id!r}")

    def _create(self, name: str, start: int) -> None:
        elsewhere = [s for s in self._shards_holding(name) if s != self.shard_id]
        if elsewhere:
            raise ConfigError(
                f"sequence {name!r} lives on shard {elsewhere[0]!r}, but this process allocates from "
                f"{self.shard_id!r}: every process must use the same sequence shard"
            )
        row = pg_insert(sequences_table).values(name=name, next_id=start)
        with self.manager.connect(self.shard_id) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(row.on_conflict_do_nothing(index_elements=["name"]))
            else:  # pragma: no cover - PostgreSQL is the supported backend
                conn.execute(insert(sequences_table).values(name=name, next_id=start))
            conn.commit()

    def _shards_holding(self, name: str) -> list[str]:
        found: list[str] = []
        for shard_id in self.manager.shard_ids:
            with self.manager.connect(shard_id) as conn:
                exists = conn.execute(text("SELECT to_regclass('shardkit_sequences')")).scalar()
                if (
                    exists
                    and conn.execute(
                        select(sequences_table.c.name).where(sequences_table.c.name == name)
                    ).first()
                ):
                    found.append(shard_id)
        return found


def sequence_columns(mapper: Mapper[Any]) -> list[tuple[str, ShardSequence]]:
    """``(attribute, sequence)`` for every column of ``mapper`` whose default is a ShardSequence."""
    cached = _columns_cache.get(mapper)
    if cached is None:
        cached = []
        for prop in mapper.column_attrs:
            for column in prop.columns:
                default = getattr(column, "default", None)
                arg = getattr(default, "arg", None)
                if isinstance(arg, ShardSequence):
                    cached.append((prop.key, arg))
        _columns_cache[mapper] = cached
    return cached


_columns_cache: weakref.WeakKeyDictionary[Any, list[tuple[str, ShardSequence]]] = weakref.WeakKeyDictionary()


_declared: list[str] = []
"""Names of every ShardSequence made in this process: none, and flushes skip looking for them."""


def any_sequence_declared() -> bool:
    return bool(_declared)


def assign_sequence_ids(allocator: SequenceAllocator, instances: Iterable[object]) -> None:
    """Give every new instance an id from its ShardSequence columns that are still unset."""
    wanted: dict[str, list[tuple[object, str]]] = {}
    specs: dict[str, ShardSequence] = {}
    for obj in instances:
        for attribute, sequence in sequence_columns(instance_state(obj).mapper):
            if obj.__dict__.get(attribute) is None:
                wanted.setdefault(sequence.name, []).append((obj, attribute))
                specs[sequence.name] = sequence
    for name, targets in wanted.items():
        spec = specs[name]
        ids = allocator.next_ids(name, len(targets), start=spec.start, block_size=spec.block_size)
        for (obj, attribute), value in zip(targets, ids, strict=True):
            setattr(obj, attribute, value)
