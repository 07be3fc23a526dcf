"""Deliberately unsafe revisions, one per lint rule (see tests/test_lint.py): never applied anywhere.

Each sets lock and statement timeouts, so squawk's timeout rules stay quiet and every file produces
exactly the one finding it is named after, checked against ``sa_shardkit.demo.models``.
"""
