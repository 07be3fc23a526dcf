"""The merged result of a scatter: an ordinary SQLAlchemy ``Result`` that also says what is missing."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Result
from sqlalchemy.engine.result import IteratorResult, ResultMetaData, SimpleResultMetaData


class ScatterResult(IteratorResult[Any]):
    """Rows merged from several shards; closing it closes every shard's result.

    ``missing_shards`` lists the shards that did not answer (only ever non-empty when the query
    opted into ``allow_partial=True``); ``shard_errors`` holds why.
    """

    missing_shards: tuple[str, ...]
    shard_errors: Mapping[str, BaseException]
    shard_ids: tuple[str, ...]

    def __init__(
        self,
        metadata: ResultMetaData,
        rows: Iterator[Any],
        *,
        sources: Sequence[Result[Any]] | dict[str, Result[Any]] = (),
        shard_ids: Sequence[str] = (),
        shard_errors: Mapping[str, BaseException] | None = None,
        closes_sources: bool = False,
    ) -> None:
        # ``closes_sources``: ``rows`` closes (and removes from ``sources``) every source itself
        # once taken, so no generator needs to wrap each row to close them at the end
        super().__init__(metadata, rows if closes_sources else self._closing(rows))
        self._sources: dict[Any, Result[Any]] = (
            sources if isinstance(sources, dict) else dict(enumerate(sources))
        )
        """The shards' results still open; a dict is kept as is (its owner may close and remove
        a source early)."""
        self.shard_ids = tuple(shard_ids)
        self.shard_errors = dict(shard_errors or {})
        self.missing_shards = tuple(self.shard_errors)

    def _closing(self, rows: Iterator[Any]) -> Iterator[Any]:
        # release the shards' results (and server-side cursors) as soon as the merge is done
        yield from rows
        self._close_sources()

    def _close_sources(self) -> None:
        sources, self._sources = self._sources, {}
        for source in sources.values():
            source.close()

    def _soft_close(self, hard: bool = False, **kw: Any) -> None:
        super()._soft_close(hard=hard, **kw)
        self._close_sources()


def visible_metadata(source: Result[Any], hidden: int, keys: Sequence[str] | None = None) -> ResultMetaData:
    """Metadata of ``source`` without its ``hidden`` trailing columns, for rows already processed."""
    frozen = source._metadata
    if not isinstance(frozen, SimpleResultMetaData) or frozen._tuplefilter or frozen._translated_indexes:
        frozen = frozen._for_freeze()  # an ORM result's metadata is already a plain one: no copy
    assert isinstance(frozen, SimpleResultMetaData)
    names = list(frozen._keys)
    count = len(names) - hidden
    extras = [frozen._keymap[name][2] for name in names[:count]]
    create_filters = frozen._create_unique_filters
    trimmed_filters = None
    if create_filters is not None:
        original = create_filters

        def trimmed_filters(result: Any) -> Sequence[Any]:
            return list(original(result))[:count]

    return SimpleResultMetaData(
        list(keys) if keys is not None else names[:count],
        extra=extras,
        _create_unique_filters=trimmed_filters,
    )
