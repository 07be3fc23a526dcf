"""Deprecated: the session flush fence is always on now (:mod:`sa_shardkit.flush_fence`)."""

from __future__ import annotations


def install() -> None:
    """Does nothing: every manager-routed ShardedSession flush is fenced already."""
