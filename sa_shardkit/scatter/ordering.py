"""Python sort keys that order values exactly as PostgreSQL's ``ORDER BY`` does.

Each shard returns its rows already sorted; the k-way merge only has to compare rows from different
shards, so the key must agree with the server: ``NULLS LAST`` for ascending and ``NULLS FIRST`` for
descending unless stated, ``NaN`` above every number, enum labels in declaration order. Text compares
by code point, which is PostgreSQL's ``C`` collation (see docs/concepts/scatter.md for other collations).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


class _Descending:
    """Wraps a key part so that it sorts in reverse."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Descending) -> bool:
        return bool(other.value < self.value)

    def __gt__(self, other: _Descending) -> bool:
        return bool(other.value > self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and bool(self.value == other.value)

    def __hash__(self) -> int:
        return hash(self.value)


def _is_nan(value: Any) -> bool:
    if isinstance(value, float):
        return value != value
    if isinstance(value, Decimal):
        return value.is_nan()
    return False


@dataclass(frozen=True)
class SortTerm:
    """One ``ORDER BY`` term: where its value sits in a row and how it sorts."""

    index: int
    descending: bool = False
    nulls_first: bool | None = None
    """``None`` means PostgreSQL's default: NULLS FIRST when descending, NULLS LAST otherwise."""
    ranks: Mapping[Any, int] | None = None
    """Positions of an ENUM's values in declaration order (PostgreSQL sorts enums by that order)."""

    def part(self) -> Callable[[Any], Any]:
        """A function mapping this term's value to a comparable key part."""
        nulls_first = self.descending if self.nulls_first is None else self.nulls_first
        null_key = (0,) if nulls_first else (2,)
        wrap: Callable[[Any], Any] = _Descending if self.descending else _identity
        positions = self.ranks

        def key(value: Any) -> Any:
            if value is None:
                return null_key
            if positions is not None:
                value = positions[value]
            if _is_nan(value):
                return (1, wrap((1,)))
            return (1, wrap((0, value)))

        return key


def _identity(value: Any) -> Any:
    return value


def row_key(
    terms: Sequence[SortTerm], indexes: Sequence[int] | None = None
) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """A key function for whole rows, ordering them as :meth:`SortTerm.part` keys would.

    ``indexes`` overrides where each term's value sits in the row. One call per row, and one flat
    tuple per key (three slots a term: NULL placement, NaN placement, value) rather than nested
    tuples: the merge of a LIMIT scatter computes a key for every row it looks at, and every
    container allocated there counts towards the garbage collector's next pass.
    """
    spec = [
        (
            term.index if indexes is None else indexes[n],
            0 if (term.descending if term.nulls_first is None else term.nulls_first) else 2,
            term.ranks,
            term.descending,
        )
        for n, term in enumerate(terms)
    ]
    if len(spec) == 1:
        index, null_slot, ranks, descending = spec[0]
        nan_slot = -1 if descending else 1

        def one(row: Sequence[Any]) -> tuple[Any, ...]:
            value = row[index]
            if value is None:
                return (null_slot, 0, None)
            if ranks is not None:
                value = ranks[value]
            if (
                (value != value)
                if isinstance(value, float)
                else (isinstance(value, Decimal) and value.is_nan())
            ):
                return (1, nan_slot, None)
            return (1, 0, _Descending(value) if descending else value)

        return one

    def key(row: Sequence[Any]) -> tuple[Any, ...]:
        parts: list[Any] = []
        for index, null_slot, ranks, descending in spec:
            value = row[index]
            if value is None:
                parts += (null_slot, 0, None)
                continue
            if ranks is not None:
                value = ranks[value]
            if (
                (value != value)
                if isinstance(value, float)
                else (isinstance(value, Decimal) and value.is_nan())
            ):
                parts += (1, -1 if descending else 1, None)
                continue
            parts += (1, 0, _Descending(value) if descending else value)
        return tuple(parts)

    return key
