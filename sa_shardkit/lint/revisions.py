"""The revisions to lint: from an Alembic script directory (a range, like ``upgrade A:B``) or from files.

A revision marks itself as a *contract step* (it drops or renames what older code still used, and is
applied only after that code is gone) with a module-level ``shardkit_contract = True``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import cast

from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from alembic.util.pyfiles import load_module_py

from ..errors import MigrationError

CONTRACT_MARKER = "shardkit_contract"
"""Module-level flag of a contract-step revision: ``shardkit_contract = True``."""


@dataclass(frozen=True)
class LintTarget:
    """One revision module to lint."""

    revision: str
    path: str
    module: ModuleType

    @property
    def message(self) -> str:
        doc = (self.module.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @property
    def contract(self) -> bool:
        return getattr(self.module, CONTRACT_MARKER, False) is True


def targets_from_files(paths: Iterable[str | os.PathLike[str]]) -> list[LintTarget]:
    """Load revision files in the order given (each is imported, as Alembic would)."""
    targets = []
    for raw in paths:
        path = Path(raw).resolve()
        if not path.is_file():
            raise MigrationError(f"revision file {str(raw)!r} does not exist")
        module_id = f"_shardkit_lint_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        module = load_module_py(module_id, path)
        revision = getattr(module, "revision", None)
        targets.append(LintTarget(str(revision or path.stem), str(path), module))
    return targets


def targets_from_script_directory(
    script: ScriptDirectory, *, lower: str | Sequence[str] | None = None, upper: str = "heads"
) -> list[LintTarget]:
    """The revisions ``alembic upgrade lower:upper`` would apply, in the order it applies them.

    ``lower`` (a revision, or a shard's current heads) is where the shards already are, so it is
    excluded; ``None``/``"base"`` starts from the base. ``upper`` may be relative (``+1``).
    """
    current: str | tuple[str, ...]
    if lower is None or lower == "base":
        current = ()
    else:
        current = lower if isinstance(lower, str) else tuple(lower)
    try:
        # Alembic's own `upgrade` passes a shard's current heads (a tuple) here, as we do.
        steps = script._upgrade_revs(upper, cast(str, current))
    except CommandError as exc:
        raise MigrationError(
            f"cannot resolve the revisions from {lower or 'base'} to {upper}: {exc}"
        ) from None
    return [_target(step.revision) for step in steps]


def targets_for_fleet(
    script: ScriptDirectory, current_heads: Sequence[Sequence[str]], upper: str = "heads"
) -> list[LintTarget]:
    """Every revision that ``upgrade upper`` applies on at least one shard (union, in history order).

    ``current_heads`` holds each shard's current revision(s) (empty: a never-migrated shard).
    """
    order = {s.revision: i for i, s in enumerate(reversed(list(script.walk_revisions())))}
    found: dict[str, LintTarget] = {}
    for heads in current_heads or [()]:
        for target in targets_from_script_directory(script, lower=tuple(heads), upper=upper):
            found.setdefault(target.revision, target)
    return sorted(found.values(), key=lambda t: order.get(t.revision, -1))


def _target(script: Script) -> LintTarget:
    return LintTarget(script.revision, script.path, script.module)


def script_directory(location: str | os.PathLike[str]) -> ScriptDirectory:
    """An Alembic :class:`ScriptDirectory` for a migrations directory (its ``versions/`` inside)."""
    path = Path(location)
    if not path.is_dir():
        raise MigrationError(f"migrations directory {str(path)!r} does not exist")
    return ScriptDirectory(str(path))
