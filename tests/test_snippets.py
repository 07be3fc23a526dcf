"""Every documented snippet works as written: the ```python and ```bash blocks of README.md and docs/.

One test per page (pages are found anew each run, so a new docs page is covered without editing this
file). Conventions and the skip marker: tests/snippets.py and docs/development.md#snippets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config

from sa_shardkit import ShardManager
from sa_shardkit.testing import LocalPostgres
from tests.cli_support import clean_env
from tests.fleet import TestFleet
from tests.replica_support import ready_replica
from tests.snippets import REPO, Snippet, pages, run_python, snippets

PROJECT_FILES = ("alembic.ini", "migrations", "examples", ".squawk.toml", "pyproject.toml")
BASH_TIMEOUT = 300

# Names a page's text says the reader has, beyond `manager` (e.g. "give a shard a streaming replica").
Givens = Callable[[pytest.FixtureRequest], dict[str, Any]]


def _replica_urls(request: pytest.FixtureRequest) -> dict[str, Any]:
    fleet: TestFleet = request.getfixturevalue("pg_fleet")
    replica: LocalPostgres = request.getfixturevalue("pg_replica")
    ready_replica(fleet.server(0), replica)
    return {"primary": fleet.server(0).url, "replica": replica.url}


def _fifth_server(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"URL5": request.getfixturevalue("shard5_url")}


PAGE_GIVENS: dict[str, Givens] = {
    "docs/concepts/replicas.md": _replica_urls,
    "docs/concepts/rebalancing.md": _fifth_server,
}


@pytest.fixture(scope="module")
def package_only_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PYTHONPATH entry holding only this checkout's sa_shardkit: the project root is NOT importable
    unless a command puts the cwd on sys.path itself (as Alembic's prepend_sys_path does)."""
    shim = tmp_path_factory.mktemp("pythonpath")
    (shim / "sa_shardkit").symlink_to(REPO / "sa_shardkit")
    return shim


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh copy of the files a user's checkout has next to alembic.ini."""
    root = tmp_path / "project"
    root.mkdir()
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy(source, root / name)
    return root


@pytest.fixture
def fleet_env(shard_urls: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """SHARD_<N>_URL for the reset fleet, set in this process too (for ShardManager.from_env())."""
    env = {f"SHARD_{i}_URL": url for i, url in enumerate(shard_urls, 1)}
    for name in [n for n in os.environ if n.startswith("SHARD_") or n.startswith("SHARDKIT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def migrate_to_head(project: Path) -> None:
    config = Config(str(project / "alembic.ini"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def run_bash(snippet: Snippet, project: Path, env: dict[str, str], pythonpath: Path) -> None:
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", snippet.code],
        cwd=project,
        env=clean_env({**env, "PYTHONPATH": str(pythonpath)}),
        capture_output=True,
        text=True,
        timeout=BASH_TIMEOUT,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{snippet.where}: bash block exited {result.returncode}\n--- block\n{snippet.code}"
            f"--- stdout (end)\n{result.stdout[-3000:]}\n--- stderr (end)\n{result.stderr[-3000:]}",
            pytrace=False,
        )


def _dispose_managers(namespace: dict[str, Any]) -> None:
    for value in namespace.values():
        if isinstance(value, ShardManager):
            value.dispose()


@pytest.fixture
def page_namespace(fleet_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A real module (SQLAlchemy resolves a model's annotations through ``sys.modules``)."""
    module = types.ModuleType("__snippets__")
    sys.modules[module.__name__] = module
    namespace: dict[str, Any] = module.__dict__
    namespace["manager"] = ShardManager.from_env()
    try:
        yield namespace
    finally:
        _dispose_managers(namespace)
        del sys.modules[module.__name__]


def _page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


@pytest.mark.parametrize("page", pages(), ids=_page_id)
def test_every_snippet_of_the_page_runs(
    page: Path,
    request: pytest.FixtureRequest,
    project: Path,
    fleet_env: dict[str, str],
    package_only_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blocks = [s for s in snippets(page) if s.skip is None]
    if not blocks:
        pytest.skip("no runnable python/bash block")
    monkeypatch.chdir(project)
    migrate_to_head(project)
    namespace: dict[str, Any] = request.getfixturevalue("page_namespace")
    givens = PAGE_GIVENS.get(_page_id(page))
    if givens is not None:
        namespace.update(givens(request))
    for snippet in blocks:
        if snippet.lang == "bash":
            run_bash(snippet, project, fleet_env, package_only_path)
            continue
        try:
            run_python(snippet, namespace)
        except Exception as error:  # noqa: BLE001 - reported with the block that raised it
            pytest.fail(
                f"{snippet.where}: python block raised {type(error).__name__}: {error}\n--- block\n{snippet.code}",
                pytrace=False,
            )


MAX_SKIPPED = 16
"""The explicit list stays small: a new placeholder needs a reason, and past this, a runnable example."""


def test_skip_markers_are_few_and_give_a_reason() -> None:
    skipped = [s for page in pages() for s in snippets(page) if s.skip is not None]
    assert all(s.skip for s in skipped)
    assert len(skipped) <= MAX_SKIPPED, "\n".join(f"{s.where}: {s.skip}" for s in skipped)
