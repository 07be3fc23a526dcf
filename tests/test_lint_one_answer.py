"""The Python lint API and `shardkit migrations lint` read the same alembic.ini defaults: one answer.

Run from a copy of the project (its alembic.ini sets the env's lock/statement timeouts, so squawk
must not ask each revision for them), through the real console script where the CLI is meant.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sa_shardkit.lint import lint_script_directory
from tests.cli_support import shardkit_script

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("alembic.ini", ".squawk.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    for name in ("migrations", "examples"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def findings(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    return sorted(
        (f["revision"], f["rule"], f["severity"]) for rev in report["revisions"] for f in rev["findings"]
    )


def test_the_api_and_the_cli_agree_on_the_projects_revisions(project: Path) -> None:
    api = lint_script_directory("migrations").to_dict()
    cli = shardkit_script("migrations", "lint", "--format", "json", cwd=project)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert findings(api) == findings(json.loads(cli.stdout))
    assert not [f for f in findings(api) if "timeout" in f[1]]  # the env's timeouts were applied


def test_without_the_ini_the_api_says_what_the_env_would_have_set(project: Path) -> None:
    api = lint_script_directory("migrations", config=None, models="sa_shardkit.demo.models:Base")
    if not api.squawk.available:
        pytest.skip("squawk is not installed: the timeout rules are squawk's")
    assert any("timeout" in f.rule_id for rev in api.revisions for f in rev.findings)


def test_lint_imports_the_projects_models_like_alembic_does(project: Path) -> None:
    """`--models examples...` from the project root, without PYTHONPATH=. (Alembic's prepend_sys_path)."""
    result = shardkit_script(
        "migrations",
        "lint",
        "--migrations",
        "examples/expand_contract",
        "--models",
        "examples.expand_contract.models:Base",
        cwd=project,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean: 2 revisions checked, no errors or warnings" in result.stdout
