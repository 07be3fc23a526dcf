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


def row_key(terms: Sequence[SortTerm]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """A key function for whole rows: the tuple of every term's key part."""
    parts = [(term.index, term.part()) for term in terms]
    if len(parts) == 1:
        index, part = parts[0]
        return lambda row: (part(row[index]),)
    return lambda row: tuple(part(row[index]) for index, part in parts)
