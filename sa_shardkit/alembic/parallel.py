"""``-x parallel=N``: migrate up to N shards at once, one ``alembic`` process per shard.

Alembic's ``op`` and ``context`` are process-wide proxies, so two shards cannot be migrated by one
process at the same time. Each shard gets its own child, ``alembic -c <ini> -x shard=<id> <command>``,
running the same env.py; the child writes its :class:`ShardOutcome` to a JSON file for the parent's
summary. After the first failure no further shard is started (those already running finish).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alembic.config import Config

from .report import ShardOutcome, ShardState

CHILD_ARG = "shardkit_child"
"""``-x`` key telling env.py it runs for a parent: no hooks (the parent ran them), write a report."""

_OWN_ARGS = ("parallel", "shard", "shards", CHILD_ARG)


def write_outcome(path: str, outcome: ShardOutcome) -> None:
    """The child's side: its one shard's outcome, for the parent to read."""
    data = {
        "shard_id": outcome.shard_id,
        "state": outcome.state.name,
        "before": list(outcome.before),
        "after": list(outcome.after),
        "error": outcome.error,
    }
    Path(path).write_text(json.dumps(data))


def _read_outcome(path: Path) -> ShardOutcome | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return ShardOutcome(
        data["shard_id"],
        ShardState[data["state"]],
        tuple(data["before"]),
        tuple(data["after"]),
        data["error"],
    )


def child_argv(
    config: Config, x_args: Mapping[str, str], shard_id: str, command: str, destination: str, report: Path
) -> list[str]:
    """``alembic`` for one shard, with the parent's ``-x`` arguments and ini file."""
    if config.config_file_name is None:
        raise ValueError("-x parallel needs an ini file (alembic -c FILE)")
    argv = [sys.executable, "-m", "alembic", "-c", str(config.config_file_name)]
    if config.config_ini_section != "alembic":
        argv += ["-n", config.config_ini_section]
    for key, value in x_args.items():
        if key not in _OWN_ARGS:
            argv += ["-x", f"{key}={value}"]
    argv += ["-x", f"shard={shard_id}", "-x", f"{CHILD_ARG}={report}", command, destination]
    return argv


def migrate_in_parallel(
    shard_ids: list[str],
    workers: int,
    argv_for: Callable[[str, Path], list[str]],
    before: Mapping[str, tuple[str, ...]],
    progress: Callable[[str], None],
) -> list[ShardOutcome]:
    """Run one child per shard, at most ``workers`` at once, in ``shard_ids`` order of start."""
    stop = threading.Event()
    lock = threading.Lock()

    def one(shard_id: str, directory: Path) -> ShardOutcome:
        if stop.is_set():
            return ShardOutcome(shard_id, ShardState.NOT_ATTEMPTED, before[shard_id], before[shard_id])
        report = directory / f"{shard_id}.json"
        with lock:
            progress(f"shardkit: {shard_id}: started")
        result = subprocess.run(argv_for(shard_id, report), capture_output=True, text=True)
        outcome = _read_outcome(report)
        if outcome is None:  # the child died before it could report (import error, killed...)
            lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
            reason = lines[-1].strip() if lines else f"alembic exited with code {result.returncode}"
            outcome = ShardOutcome(shard_id, ShardState.FAILED, before[shard_id], before[shard_id], reason)
        if not outcome.ok:
            stop.set()
        with lock:
            progress(f"shardkit: {shard_id}: {outcome.state.value}")
        return outcome

    with tempfile.TemporaryDirectory(prefix="shardkit-parallel-") as tmp:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardkit-migrate") as pool:
            return list(pool.map(lambda s: one(s, Path(tmp)), shard_ids))
