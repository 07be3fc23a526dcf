"""SQLAlchemy's own ``test/ext/test_horizontal_shard.py``, from the sdist of the installed version.

:func:`suite_tree` unpacks the test file and what it needs (the pytest plugin under
``lib/sqlalchemy/testing/plugin``, ``test/conftest.py``, ``test/requirements.py``, ``setup.cfg`` and
``pyproject.toml`` for the pytest settings) into a directory; ``ours=True`` replaces its import of
the stock ``ShardedSession`` by ``from sa_shardkit import ShardedSession`` and adds one test that
fails unless the module really uses ours. :func:`run_suite` runs it with pytest as shipped and
returns every test's outcome from the JUnit XML report.

The sdist is cached under ``~/.cache/sa_shardkit`` (``SHARDKIT_CACHE`` overrides); a missing sdist is
fetched with ``pip download``, and any failure to get it fails the test (never a skip).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import sqlalchemy

import sa_shardkit

STOCK_IMPORT = "from sqlalchemy.ext.horizontal_shard import ShardedSession\n"
OUR_IMPORT = "from sa_shardkit import ShardedSession\n"
SUITE = "test/ext/test_horizontal_shard.py"
MEMBERS = (
    "lib/sqlalchemy/testing/plugin/",
    "test/__init__.py",
    "test/conftest.py",
    "test/requirements.py",
    "test/ext/__init__.py",
    SUITE,
    "setup.cfg",
    "pyproject.toml",
)
SUBSTITUTION_CHECK = """\
import sa_shardkit
from sqlalchemy.testing import fixtures
from test.ext import test_horizontal_shard


class SubstitutionTest(fixtures.TestBase):
    def test_suite_uses_sa_shardkit(self):
        assert test_horizontal_shard.ShardedSession is sa_shardkit.ShardedSession
"""
SUBSTITUTION_TEST = "test.ext.test_zz_substituted.SubstitutionTest::test_suite_uses_sa_shardkit"
PROJECT_ROOT = Path(sa_shardkit.__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("SHARDKIT_CACHE", Path.home() / ".cache" / "sa_shardkit"))


def sdist() -> Path:
    """The sdist of the installed SQLAlchemy (downloaded once, then reused)."""
    version = sqlalchemy.__version__
    target = cache_dir() / "sdist"
    found = sorted(target.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "SQLAlchemy"]
    done = subprocess.run(
        [*command, f"SQLAlchemy=={version}", "-d", str(target)], capture_output=True, text=True, timeout=900
    )
    found = sorted(target.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if done.returncode != 0 or not found:
        raise AssertionError(
            f"could not download the SQLAlchemy {version} sdist (needed for its shard suite):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return found[0]


def suite_tree(root: Path, *, ours: bool) -> Path:
    """Unpack the suite into ``root``; with ``ours``, substitute sa_shardkit's ShardedSession."""
    with tarfile.open(sdist()) as archive:
        prefix = archive.getnames()[0].split("/")[0] + "/"
        wanted = [
            m for m in archive.getmembers() if m.isfile() and m.name.removeprefix(prefix).startswith(MEMBERS)
        ]
        for member in wanted:
            member.name = member.name.removeprefix(prefix)
        archive.extractall(root, members=wanted, filter="data")
    suite = root / SUITE
    if not suite.exists():
        raise AssertionError(f"{SUITE} is not in {sdist()}")
    if ours:
        source = suite.read_text()
        if source.count(STOCK_IMPORT) != 1:
            raise AssertionError(f"the substitution matched {source.count(STOCK_IMPORT)} lines, not 1")
        suite.write_text(source.replace(STOCK_IMPORT, OUR_IMPORT))
        (root / "test/ext/test_zz_substituted.py").write_text(SUBSTITUTION_CHECK)
    return root


def run_suite(root: Path, dburi: str | None = None) -> dict[str, str]:
    """Run the unpacked suite with pytest; ``{test id: passed|failed|error|skipped}``."""
    report = root / "junit.xml"
    command = [sys.executable, "-m", "pytest", "test/ext", "-q", "-p", "no:cacheprovider"]
    command += [f"--junitxml={report}", *(["--dburi", dburi] if dburi else [])]
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run(
        command,
        cwd=root,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if not report.exists():
        raise AssertionError(f"the suite did not run:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    outcomes: dict[str, str] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcomes[name] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(
            next(iter(kinds), ""), "passed"
        )
    return outcomes
