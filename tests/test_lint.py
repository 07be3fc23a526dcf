"""`shardkit migrations lint`: unsafe revisions are caught, one finding each; safe ones lint clean.

No database is needed here: revisions are rendered offline (as `alembic upgrade --sql` does). The
`-x lint=1` hook on real shards is specified in tests/test_lint_hook.py.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sa_shardkit.cli.lint import lint
from sa_shardkit.errors import NotShardedError
from sa_shardkit.lint import Severity, lint_files, lint_script_directory
from sa_shardkit.lint.squawk import SQUAWK_ENV

REPO = Path(__file__).resolve().parent.parent
UNSAFE = REPO / "tests" / "lint_revisions"
EXAMPLE = REPO / "examples" / "expand_contract"
DEMO_MODELS = "sa_shardkit.demo.models:Base"
EXAMPLE_MODELS = "examples.expand_contract.models:Base"

EXPECTED = {
    "rename_column.py": [("shardkit:rename-outside-contract", Severity.ERROR)],
    "drop_without_contract.py": [("shardkit:drop-outside-contract", Severity.ERROR)],
    "pk_without_shard_key.py": [("shardkit:shard-key-in-primary-key", Severity.ERROR)],
    "fk_without_shard_key.py": [("shardkit:shard-key-in-foreign-key", Severity.ERROR)],
    "index_not_concurrent.py": [("squawk:require-concurrent-index-creation", Severity.ERROR)],
    "not_null_without_default.py": [("squawk:adding-required-field", Severity.ERROR)],
    "unique_without_shard_key.py": [("shardkit:shard-key-in-unique", Severity.ERROR)],
    "nullable_shard_key.py": [
        ("shardkit:shard-key-not-null", Severity.ERROR),
        ("squawk:ban-drop-not-null", Severity.WARNING),
    ],
    "contract_drops_mapped.py": [("shardkit:contract-drops-mapped", Severity.ERROR)],
}


UNDECLARED_TABLE = 'op.create_table("invoices", sa.Column("invoice_id", sa.BigInteger(), primary_key=True))'
"""A new table that no model maps: warnings only."""


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(lint, list(args), catch_exceptions=False)


def write_revision(directory: Path, rev: str, *upgrade: str, doc: str = "") -> Path:
    """A revision file ``<rev>_test.py`` (no parent) whose ``upgrade()`` runs the given lines."""
    path = directory / f"{rev}_test.py"
    header = f'"""{doc}"""\n' if doc else ""
    path.write_text(
        f'{header}import sqlalchemy as sa\nfrom alembic import op\n\nrevision = "{rev}"\ndown_revision = None\n\n\n'
        "def upgrade():\n" + "".join(f"    {line}\n" for line in upgrade)
    )
    return path


def test_every_unsafe_revision_has_an_expectation() -> None:
    assert sorted(p.name for p in UNSAFE.glob("[a-z]*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_unsafe_revision_produces_exactly_its_finding(name: str) -> None:
    report = lint_files([UNSAFE / name], models=DEMO_MODELS)
    assert report.squawk.available, report.squawk.message
    assert [(f.rule_id, f.severity) for f in report.findings] == EXPECTED[name]
    assert not report.ok


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_unsafe_revision_exits_non_zero(name: str) -> None:
    result = run_cli(str(UNSAFE / name), "--models", DEMO_MODELS)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1].startswith("FAILED: 1 revision checked, 1 error")


def test_output_is_one_line_per_finding_grouped_by_revision() -> None:
    files = [str(UNSAFE / n) for n in sorted(EXPECTED)]
    result = run_cli(*files, "--models", DEMO_MODELS)
    lines = result.output.splitlines()
    headers = [line for line in lines if line and not line.startswith(" ") and line[0] == "u"]
    findings = [line for line in lines if line.startswith("  ")]
    assert len(headers) == len(EXPECTED)
    assert len(findings) == sum(len(v) for v in EXPECTED.values())
    rename = next(line for line in findings if "rename-outside-contract" in line)
    # revision, operation, rule, why and fix on the one line
    assert (
        "u0000000001  alter_column customers.name -> full_name  [shardkit:rename-outside-contract]" in rename
    )
    assert "breaks running code" in rename and "fix: never rename" in rename
    assert lines[-1].startswith("FAILED: 9 revisions checked, 9 errors, 1 warning [sharding rules + squawk")


def test_json_output_lists_findings_for_tools() -> None:
    result = run_cli(str(UNSAFE / "drop_without_contract.py"), "--models", DEMO_MODELS, "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["ok"] is False and data["errors"] == 1
    (finding,) = data["revisions"][0]["findings"]
    assert finding == {
        "revision": "u0000000002",
        "operation": "drop_column orders.status",
        "rule": "shardkit:drop-outside-contract",
        "severity": "error",
        "why": finding["why"],
        "fix": finding["fix"],
        "line": finding["line"],
    }
    assert "shardkit_contract = True" in finding["fix"]


def test_project_migrations_lint_without_errors() -> None:
    report = lint_script_directory(REPO / "migrations", models=DEMO_MODELS)
    assert report.revisions, "migrations/versions holds no revision"
    assert report.ok, [f.rule_id for f in report.findings]
    assert not [f for f in report.findings if f.source.value == "shardkit"]


def test_expand_contract_example_lints_clean_against_the_deployed_models() -> None:
    result = run_cli("--migrations", str(EXAMPLE), "--models", EXAMPLE_MODELS)
    assert result.exit_code == 0, result.output
    assert (
        result.output.strip().splitlines()[-1].startswith("clean: 2 revisions checked, no errors or warnings")
    )


def test_contract_step_is_refused_while_the_models_still_map_the_column() -> None:
    report = lint_script_directory(EXAMPLE, models=DEMO_MODELS)
    assert [(f.revision, f.rule_id) for f in report.findings] == [
        ("a1e5c0de0002", "shardkit:contract-drops-mapped")
    ]


def test_from_to_lints_only_the_revisions_an_upgrade_applies() -> None:
    report = lint_script_directory(EXAMPLE, lower="a1e5c0de0001", upper="heads", models=EXAMPLE_MODELS)
    assert [r.revision for r in report.revisions] == ["a1e5c0de0002"]
    assert report.revisions[0].contract


def test_missing_squawk_is_reported_and_sharding_rules_still_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(SQUAWK_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no squawk on PATH ...
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))  # ... nor next to the interpreter
    result = run_cli(str(UNSAFE / "rename_column.py"), str(UNSAFE / "index_not_concurrent.py"))
    assert result.exit_code == 1
    assert "note: squawk is not installed, so the general PostgreSQL rules did not run" in result.output
    assert "pip install 'sa_shardkit[lint]'" in result.output
    assert "[shardkit:rename-outside-contract]" in result.output
    assert "squawk:" not in result.output.replace("squawk not found", "")
    assert result.output.splitlines()[-1].endswith("[sharding rules]")


def test_squawk_path_that_does_not_exist_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SQUAWK_ENV, "/nonexistent/squawk")
    report = lint_files([UNSAFE / "rename_column.py"])
    assert not report.squawk.available
    assert report.squawk.message is not None
    assert report.squawk.message.startswith("squawk not found at '/nonexistent/squawk' (SHARDKIT_SQUAWK)")


def test_reference_table_write_is_noted_as_going_to_every_shard(tmp_path: Path) -> None:
    revision = write_revision(
        tmp_path,
        "r1",
        "op.execute(\"SET LOCAL lock_timeout = '2s'\")",
        "op.execute(\"SET LOCAL statement_timeout = '1min'\")",
        "op.execute(\"INSERT INTO products (sku, name, price) VALUES ('A-1', 'Anvil', 9.50)\")",
        doc="Seed a product.",
    )
    report = lint_files([revision], models=DEMO_MODELS)
    assert [(f.rule_id, f.severity) for f in report.findings] == [
        ("shardkit:reference-table-write", Severity.NOTE)
    ]
    assert report.ok


def test_drop_in_raw_sql_outside_a_contract_step_is_an_error(tmp_path: Path) -> None:
    revision = write_revision(
        tmp_path,
        "r2",
        "op.execute(\"SET LOCAL lock_timeout = '2s'\")",
        "op.execute(\"SET LOCAL statement_timeout = '1min'\")",
        'op.execute("ALTER TABLE orders DROP COLUMN status")',
    )
    report = lint_files([revision], models=DEMO_MODELS)
    assert [(f.rule_id, f.severity) for f in report.findings] == [("squawk:ban-drop-column", Severity.ERROR)]


def test_revision_that_cannot_render_offline_is_an_error(tmp_path: Path) -> None:
    revision = write_revision(tmp_path, "r3", 'raise RuntimeError("needs a live connection")')
    report = lint_files([revision], models=DEMO_MODELS)
    assert [f.rule_id for f in report.findings] == ["shardkit:offline-render"]
    assert "needs a live connection" in report.findings[0].why


def test_without_models_the_contract_rules_still_run() -> None:
    report = lint_files(  # config=None: not even alembic.ini's lint_models
        [UNSAFE / "drop_without_contract.py", UNSAFE / "pk_without_shard_key.py"], config=None
    )
    assert [f.rule_id for f in report.findings] == ["shardkit:drop-outside-contract"]
    assert any("no models given" in note for note in report.notes)


def test_timeouts_set_by_the_env_are_rendered_and_satisfy_squawk() -> None:
    timeout_rules = {"squawk:require-lock-timeout", "squawk:require-statement-timeout"}
    without = lint_script_directory(REPO / "migrations", models=DEMO_MODELS, config=None)  # no alembic.ini
    with_env = lint_script_directory(
        REPO / "migrations", models=DEMO_MODELS, lock_timeout="5s", statement_timeout="15min"
    )
    assert timeout_rules <= {f.rule_id for f in without.findings}
    assert not timeout_rules & {f.rule_id for f in with_env.findings}
    assert all(
        r.sql.startswith("BEGIN;\n\nSET LOCAL lock_timeout = '5s';\n\nSET LOCAL statement_timeout = '15min';")
        for r in with_env.revisions
    )


def test_the_projects_own_migrations_print_that_they_are_clean() -> None:
    # The timeouts come from alembic.ini (shardkit_lock_timeout / shardkit_statement_timeout), as the env's.
    for strict in ([], ["--strict"]):
        result = run_cli("--config", str(REPO / "alembic.ini"), *strict)
        assert result.exit_code == 0, result.output
        assert re.fullmatch(
            r"clean: \d+ revisions checked, no errors or warnings \[sharding rules \+ squawk [\d.]+\]",
            result.output.strip(),
        )


def test_new_table_no_model_maps_is_a_warning(tmp_path: Path) -> None:
    revision = write_revision(tmp_path, "r4", UNDECLARED_TABLE)
    # autoincrement=True by default: squawk's prefer-identity comes too, as a warning
    report = lint_files([revision], models=DEMO_MODELS)
    assert [(f.rule_id, f.severity) for f in report.findings if f.source.value == "shardkit"] == [
        ("shardkit:undeclared-table", Severity.WARNING)
    ]
    assert report.ok


def test_malformed_shard_declaration_in_the_models_is_a_clear_error() -> None:
    class Base(DeclarativeBase):
        pass

    class Account(Base):
        __tablename__ = "accounts"
        __shard_key__ = "account_id"
        __shard_reference__ = True
        account_id: Mapped[int] = mapped_column(primary_key=True)

    with pytest.raises(NotShardedError, match="Account declares both __shard_key__ and __shard_reference__"):
        lint_files([UNSAFE / "rename_column.py"], models=Base)


def test_a_binary_that_is_not_squawk_is_named_and_sharding_rules_still_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SQUAWK_ENV, "/bin/true")
    report = lint_files([UNSAFE / "rename_column.py"])
    assert report.squawk.message is not None
    assert report.squawk.message.startswith("'/bin/true' is not a working squawk")
    assert [f.rule_id for f in report.findings] == ["shardkit:rename-outside-contract"]


def test_strict_makes_warnings_fail(tmp_path: Path) -> None:
    revision = write_revision(tmp_path, "r5", UNDECLARED_TABLE)
    args = ["--models", DEMO_MODELS, str(revision)]  # a table no model maps: warnings only
    relaxed = run_cli(*args)
    assert relaxed.exit_code == 0 and relaxed.output.splitlines()[-1].startswith("ok:")
    assert "warning r5" in relaxed.output
    strict = run_cli(*args, "--strict")
    assert strict.exit_code == 1
    assert strict.output.splitlines()[-1].startswith("FAILED:") and "(strict)" in strict.output
