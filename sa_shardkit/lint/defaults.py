"""What ``alembic.ini`` tells the lint, read in one place so the CLI and the Python API agree.

The sharded env sets ``shardkit_lock_timeout`` / ``shardkit_statement_timeout`` (``[alembic]``) on
every shard, so squawk must not ask revisions to set them; ``lint_models`` (``[shardkit]``) names the
deployed models. ``shardkit migrations lint`` and ``lint_script_directory()`` / ``lint_files()``
both start from these values (explicit arguments win), so they give one answer.
"""

from __future__ import annotations

import configparser
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "alembic.ini"

_KEYS = (
    ("models", "shardkit", "lint_models"),
    ("lock_timeout", "alembic", "shardkit_lock_timeout"),
    ("statement_timeout", "alembic", "shardkit_statement_timeout"),
)


def ini_defaults(config: str | os.PathLike[str] | None = DEFAULT_CONFIG) -> dict[str, str]:
    """``models`` / ``lock_timeout`` / ``statement_timeout`` from ``config`` (missing file: none)."""
    if config is None or not Path(config).is_file():
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config)
    found = {name: parser.get(section, key, fallback="").strip() for name, section, key in _KEYS}
    return {name: value for name, value in found.items() if value}


def with_ini_defaults(
    options: Mapping[str, Any], config: str | os.PathLike[str] | None = DEFAULT_CONFIG
) -> dict[str, Any]:
    """``options`` with what ``config`` sets filled in where an option is missing or None."""
    merged: dict[str, Any] = dict(ini_defaults(config))
    merged.update({name: value for name, value in options.items() if value is not None})
    return merged


def project_on_sys_path(config: str | os.PathLike[str] | None = DEFAULT_CONFIG) -> None:
    """Make ``--models examples.x:Base`` importable as Alembic does: its ``prepend_sys_path``
    entries (relative to the working directory; ``.`` when the ini has none) go first on sys.path."""
    entries = ["."]
    if config is not None and Path(config).is_file():
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(config)
        raw = parser.get("alembic", "prepend_sys_path", fallback=".")
        separator = os.pathsep if parser.get("alembic", "path_separator", fallback="") == "os" else None
        entries = [e.strip() for e in (raw.split(separator) if separator else raw.replace(",", " ").split())]
    for entry in reversed([e for e in entries if e]):
        path = os.path.abspath(entry)
        if path not in sys.path:
            sys.path.insert(0, path)
