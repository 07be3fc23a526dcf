"""Prometheus text exposition of :class:`~sa_shardkit.events.QueryMetrics`, with no dependency.

Serve it from any HTTP endpoint (``Content-Type: text/plain; version=0.0.4``)::

    metrics = QueryMetrics()
    manager.events.add(metrics)
    body = prometheus_text(metrics)     # shardkit_queries_total{shard="shard-1",role="primary"} 42 ...

With ``prometheus_client`` instead, add a listener that observes a labelled histogram (see the
observability docs).
"""

from __future__ import annotations

from .events import QueryMetrics, QueryStats

_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("queries_total", "counter", "Statements run, per shard and role."),
    ("query_errors_total", "counter", "Statements that failed, per shard and role."),
    ("query_seconds_total", "counter", "Seconds spent in statements, per shard and role."),
    ("query_seconds_max", "gauge", "Longest statement so far, per shard and role."),
)


def _value(stats: QueryStats, family: str) -> float:
    return {
        "queries_total": stats.count,
        "query_errors_total": stats.errors,
        "query_seconds_total": stats.total_seconds,
        "query_seconds_max": stats.max_seconds,
    }[family]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(metrics: QueryMetrics, *, prefix: str = "shardkit") -> str:
    """The metrics' snapshot in the Prometheus text format (one series per shard and role)."""
    snapshot = sorted(metrics.snapshot().items())
    lines: list[str] = []
    for family, kind, help_text in _FAMILIES:
        name = f"{prefix}_{family}"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for (shard_id, role), stats in snapshot:
            value = _value(stats, family)
            shown = str(value) if isinstance(value, int) else repr(float(value))
            lines.append(f'{name}{{shard="{_label(shard_id)}",role="{_label(role)}"}} {shown}')
    return "\n".join(lines) + "\n"


__all__ = ["prometheus_text"]
