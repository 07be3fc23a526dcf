"""`shardkit migrations lint`: check revisions for what is unsafe on a sharded fleet before they run."""

from __future__ import annotations

from pathlib import Path

import click
from alembic.config import Config
from alembic.script import ScriptDirectory

from ..alembic import fleet_status, settings_from_alembic_config
from ..config import ShardConfig, ShardSettings, settings_from_env
from ..errors import ConfigError
from ..lint import (
    LintReport,
    lint_targets,
    render_json,
    render_text,
    script_directory,
    targets_for_fleet,
    targets_from_files,
    targets_from_script_directory,
)
from ..lint.defaults import project_on_sys_path, with_ini_defaults
from ..lint.revisions import LintTarget
from ..manager import ShardManager

SECTION = "shardkit"


@click.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="alembic.ini (default: ./alembic.ini): the migrations directory, [shardkit] shards and lint_models.",
)
@click.option("--url", "urls", multiple=True, metavar="URL", help="Shard URL for --pending (repeatable).")
@click.option("--migrations", "location", type=click.Path(file_okay=False), help="Migrations directory.")
@click.option("--from", "lower", metavar="REV", help="Lint what `upgrade FROM:TO` applies (FROM excluded).")
@click.option("--to", "upper", metavar="REV", default="heads", show_default=True, help="Last revision.")
@click.option(
    "--pending",
    is_flag=True,
    help="Lint what `upgrade TO` would apply on the configured shards now (connects to read revisions).",
)
@click.option("--models", metavar="MODULE[:ATTR]", help="The deployed models, e.g. myapp.models:Base.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--strict", is_flag=True, help="Warnings fail the lint too.")
@click.option("--no-squawk", is_flag=True, help="Run only the sharding rules.")
@click.option(
    "--lock-timeout",
    metavar="VALUE",
    help="The lock_timeout the env sets per shard (default: shardkit_lock_timeout in alembic.ini).",
)
@click.option(
    "--statement-timeout",
    metavar="VALUE",
    help="The statement_timeout the env sets per shard (default: shardkit_statement_timeout in alembic.ini).",
)
def lint(
    files: tuple[str, ...],
    config_path: str | None,
    urls: tuple[str, ...],
    location: str | None,
    lower: str | None,
    upper: str,
    pending: bool,
    models: str | None,
    fmt: str,
    strict: bool,
    no_squawk: bool,
    lock_timeout: str | None,
    statement_timeout: str | None,
) -> None:
    """Lint revision FILES, or the revisions of the migrations directory (all, --from/--to, --pending).

    Exit code 1 when a finding is an error (or a warning, with --strict).
    """
    ini = _ini(config_path)
    project_on_sys_path(ini)  # `--models examples.x:Base` from the project root, as Alembic does
    given = {"models": models, "lock_timeout": lock_timeout, "statement_timeout": statement_timeout}
    defaults = with_ini_defaults(given, ini)  # the same defaults as lint_script_directory()
    if files:
        if pending or lower:
            raise click.UsageError("give revision FILES or --from/--pending, not both")
        targets = targets_from_files(files)
    else:
        script = _script(ini, location)
        targets = _pending(ini, urls, script, upper) if pending else _range(script, lower, upper)
    report = lint_targets(targets, squawk=not no_squawk, strict=strict, **defaults)
    _emit(report, fmt)


def _emit(report: LintReport, fmt: str) -> None:
    click.echo(render_json(report) if fmt == "json" else render_text(report))
    if not report.ok:
        raise SystemExit(1)


def _ini(config_path: str | None) -> Path | None:
    path = Path(config_path or "alembic.ini")
    if path.exists():
        return path
    if config_path:
        raise ConfigError(f"config file {config_path!r} does not exist")
    return None


def _script(ini: Path | None, location: str | None) -> ScriptDirectory:
    if location:
        return script_directory(location)
    if ini is not None:
        return ScriptDirectory.from_config(Config(str(ini)))
    if Path("migrations").is_dir():
        return script_directory("migrations")
    raise ConfigError("no migrations directory: pass --migrations DIR or --config alembic.ini")


def _range(script: ScriptDirectory, lower: str | None, upper: str) -> list[LintTarget]:
    return targets_from_script_directory(script, lower=lower, upper=upper)


def _pending(
    ini: Path | None, urls: tuple[str, ...], script: ScriptDirectory, upper: str
) -> list[LintTarget]:
    settings: ShardSettings
    if urls:
        settings = ShardSettings(tuple(ShardConfig(id=f"shard-{i}", url=u) for i, u in enumerate(urls, 1)))
    elif ini is not None:
        settings = settings_from_alembic_config(Config(str(ini)))
    else:
        settings = settings_from_env()
    with ShardManager(settings) as manager:
        status = fleet_status(manager, script)
    down = [f"{s.shard_id} ({s.error})" for s in status.shards if s.error]
    if down:
        raise ConfigError(
            f"cannot read the revision of shard(s) {', '.join(down)}; lint --from/--to offline instead"
        )
    return targets_for_fleet(script, [s.heads for s in status.shards], upper=upper)
