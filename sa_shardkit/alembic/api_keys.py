"""Names shared by the sharded env and the Python API (kept apart so neither imports the other)."""

from __future__ import annotations

REPORT_ATTRIBUTE = "shardkit_report"
"""``Config.attributes`` key under which the sharded env leaves the report of the command it ran."""
