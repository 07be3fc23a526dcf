"""squawk (general PostgreSQL migration safety), run on each revision's rendered SQL, findings passed through.

squawk ships as a binary in the ``squawk-cli`` wheel (``pip install 'sa_shardkit[lint]'``). Its rules
are not re-implemented here; this module only decides how serious each one is on a live fleet (a lock
or a table rewrite happens once per shard) and ties its line numbers back to Alembic operations. When
the binary is missing, the lint says so and the sharding rules still run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MigrationError
from .findings import SquawkStatus

SQUAWK_ENV = "SHARDKIT_SQUAWK"
"""Path of the squawk binary to use, overriding the one found on ``PATH``."""

INSTALL_HINT = "pip install 'sa_shardkit[lint]' (or pip install squawk-cli)"

ERROR_RULES = frozenset(
    {
        "adding-field-with-default",
        "adding-foreign-key-constraint",
        "adding-not-nullable-field",
        "adding-required-field",
        "adding-serial-primary-key-field",
        "ban-alter-domain-with-add-constraint",
        "ban-concurrent-index-creation-in-transaction",
        "ban-create-domain-with-constraint",
        "ban-drop-database",
        "ban-truncate-cascade",
        "changing-column-type",
        "constraint-missing-not-valid",
        "disallowed-unique-constraint",
        "require-concurrent-index-creation",
        "require-concurrent-index-deletion",
        "syntax-error",
    }
)
"""squawk rules that block or break a live fleet (long locks, table rewrites, failing writes): errors.
Every other squawk rule is a warning."""

CONTRACT_RULES = frozenset({"ban-drop-column", "ban-drop-table", "renaming-column", "renaming-table"})
"""squawk rules about drops and renames: sa_shardkit's contract-step rules decide these (an Alembic
``op.drop_column`` is judged by them; squawk's finding still counts for raw SQL in ``op.execute``)."""


@dataclass(frozen=True)
class SquawkIssue:
    """One squawk finding in one SQL file."""

    name: str
    """The key of the SQL passed to :func:`run_squawk` (the revision id)."""
    line: int
    """1-based."""
    rule: str
    level: str
    message: str
    help: str | None


def find_squawk(path: str | None = None) -> tuple[str | None, str | None]:
    """``(binary, None)`` or ``(None, why it is missing)``: ``path``, else ``$SHARDKIT_SQUAWK``, else PATH."""
    explicit = path or os.environ.get(SQUAWK_ENV)
    if explicit:
        found = shutil.which(explicit)
        if found:
            return found, None
        source = "given path" if path else f"{SQUAWK_ENV}"
        return None, f"squawk not found at {explicit!r} ({source}); {INSTALL_HINT}"
    found = shutil.which("squawk") or shutil.which("squawk", path=str(Path(sys.executable).parent))
    if found:
        return found, None
    return None, f"squawk is not installed, so the general PostgreSQL rules did not run: {INSTALL_HINT}"


def squawk_status(path: str | None = None) -> tuple[str | None, SquawkStatus]:
    """The binary to run (or ``None``) and a status line for the report."""
    binary, missing = find_squawk(path)
    if binary is None:
        return None, SquawkStatus(available=False, message=missing)
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, SquawkStatus(
            available=False, message=f"squawk at {binary!r} cannot run: {exc}; {INSTALL_HINT}"
        )
    said = ((out.stdout or out.stderr).strip().splitlines() or [""])[0][:120]
    if out.returncode != 0 or not said.startswith("squawk"):
        why = f"exit code {out.returncode}" if out.returncode else f"--version says {said!r}"
        return None, SquawkStatus(
            available=False, message=f"{binary!r} is not a working squawk ({why}); {INSTALL_HINT}"
        )
    version = out.stdout.strip().removeprefix("squawk ").strip() or None
    return binary, SquawkStatus(available=True, version=version)


def run_squawk(
    binary: str,
    sql_by_name: Mapping[str, str],
    *,
    pg_version: str | None = None,
    config: str | None = None,
) -> dict[str, list[SquawkIssue]]:
    """Run squawk once over one SQL file per entry; its issues by entry name, in file order."""
    issues: dict[str, list[SquawkIssue]] = {name: [] for name in sql_by_name}
    if not sql_by_name:
        return issues
    with tempfile.TemporaryDirectory(prefix="shardkit-lint-") as tmp:
        by_path: dict[str, str] = {}
        for index, (name, sql) in enumerate(sql_by_name.items()):
            file = Path(tmp) / f"{index:04d}.sql"
            file.write_text(sql)
            by_path[str(file)] = name
        command = [binary, "--reporter", "json"]
        if pg_version:
            command += ["--pg-version", pg_version]
        if config:
            command += ["--config", config]
        result = subprocess.run(command + list(by_path), capture_output=True, text=True, timeout=300)
    failed = MigrationError(
        f"squawk failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()[:500]}"
    )
    if result.returncode not in (0, 1) or not result.stdout.strip():  # 1: issues found, as JSON
        raise failed
    try:
        raw: Sequence[dict[str, object]] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise failed from None
    for item in raw:
        owner = by_path.get(str(item.get("file")))
        if owner is None:
            continue
        issues[owner].append(
            SquawkIssue(
                name=owner,
                line=int(str(item.get("line", 0))) + 1,
                rule=str(item.get("rule_name")),
                level=str(item.get("level")),
                message=str(item.get("message")),
                help=str(item["help"]) if item.get("help") else None,
            )
        )
    return issues
