"""The body of ``migrations/env.py``: run Alembic's current command on every shard, one after another.

Alembic's ``multidb`` template runs *different* migrations per database. Shards share one schema, so
here every revision runs on every shard:

- **online**, each shard in its own connection and one transaction (PostgreSQL DDL is transactional,
  so a failing revision leaves that shard at its previous revision); shards go in configuration order
  (reverse order for ``downgrade``); the run stops at the first failing shard; reachability of every
  target shard is checked before the first one is touched;
- **offline** (``--sql``), one clearly delimited SQL script per shard (``-x sql_dir=DIR``: one file
  per shard);
- **read-only** commands (``current``...) visit every shard and report each one;
- **autogenerate** (``revision --autogenerate``) compares the models with one reference shard
  (``-x reference=ID``, or ``shardkit_reference_shard`` in ``[alembic]``, else the first shard), and
  warns when other shards are at a different revision.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from alembic import context as alembic_context
from alembic.autogenerate import compare_metadata
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from ..config import ShardConfig
from ..errors import ConfigError, MigrationError, ShardKitError
from ..manager import ShardManager
from .api_keys import REPORT_ATTRIBUTE
from .library import library_table_filter, with_library_filter
from .parallel import CHILD_ARG, child_argv, migrate_in_parallel, write_outcome
from .plan import MigrationPlan, PreMigrateHook
from .report import MigrationReport, ShardMigrationError, ShardOutcome, ShardState
from .status import FleetStatus, RevisionState, ShardRevision, classify, fleet_status, read_heads
from .targets import SECTION, requested_shards, select_shards, settings_from_alembic_config
from .timeouts import apply_timeouts, migration_timeouts, set_statement

log = logging.getLogger("sa_shardkit.alembic")

# Alembic tells env.py what to do only through the function it runs per database; its name is stable.
_COMMANDS = {
    "upgrade": "upgrade",
    "downgrade": "downgrade",
    "do_stamp": "stamp",
    "display_version": "current",
    "retrieve_migrations": "revision",
    "nothing": "revision",
    "do_ensure_version": "ensure_version",
    "show_current": "show",
    "_display_current_history": "history",
    "edit_current": "edit",
}
_MUTATING = ("upgrade", "downgrade", "stamp", "ensure_version")

MIGRATION_LOCK_ID = 0x5348_4B4D
"""PostgreSQL advisory lock (session-level) held on a shard while it is migrated: two concurrent
``alembic upgrade`` runs would otherwise race on the same shard."""

_RELATIVE = re.compile(r"[+-]\d+$")
"""``+1``, ``-2``, ``ae10+1``: resolved per shard against its own current revision."""

TargetMetadata = MetaData | Sequence[MetaData] | None


def run_migrations(
    target_metadata: TargetMetadata = None,
    *,
    before_migrate: Iterable[PreMigrateHook] = (),
    section: str = SECTION,
    environment: EnvironmentContext | None = None,
    **configure_options: Any,
) -> MigrationReport | None:
    """Run the command Alembic is executing on every selected shard; call it from ``env.py``.

    :param target_metadata: the models' ``MetaData`` (or a list of them), for autogenerate.
    :param before_migrate: hooks called with the :class:`MigrationPlan` of an ``upgrade``,
        ``downgrade`` or ``stamp`` before any shard is touched (a linter, a confirmation prompt...).
    :param section: the ini section listing the shards (default ``[shardkit]``).
    :param environment: the ``EnvironmentContext``; default: the one Alembic is running.
    :param configure_options: passed to ``context.configure()`` for every shard (``compare_type``,
        ``include_object``, ``process_revision_directives``...).

    A failure anywhere raises :class:`ShardMigrationError` (an Alembic ``CommandError``: the
    ``alembic`` command prints one ``FAILED:`` line and exits non-zero) after the per-shard summary
    has been printed. Configuration errors (no shards, unknown ``-x shard=``) are raised as
    ``CommandError`` before anything connects.
    """
    env = environment or _running_environment()
    if configure_options.get("transaction_per_migration"):
        raise CommandError("sa_shardkit runs each shard's migration in one transaction")
    try:
        runner = _FleetRun(env, target_metadata, section, configure_options)
        return runner.run(list(before_migrate))
    except CommandError:
        raise
    except ShardKitError as error:
        raise CommandError(str(error)) from error


def _running_environment() -> EnvironmentContext:
    env = getattr(alembic_context, "_proxy", None)
    if not isinstance(env, EnvironmentContext):
        raise CommandError("sa_shardkit.alembic.run_migrations() runs from env.py, inside an Alembic command")
    return env


class _FleetRun:
    """One Alembic command over the fleet; each ``_run_*`` method is one mode."""

    def __init__(
        self,
        env: EnvironmentContext,
        target_metadata: TargetMetadata,
        section: str,
        configure_options: dict[str, Any],
    ) -> None:
        self.env = env
        self.config = env.config
        self.metadata = target_metadata
        self.options = with_library_filter(target_metadata, configure_options)
        self.x_args: dict[str, str] = env.get_x_argument(as_dictionary=True)
        fn = env.context_opts.get("fn")
        name = getattr(fn, "__name__", "") if fn is not None else ""
        self.command = _COMMANDS.get(name, name or "command")
        self.autogenerate = "revision_context" in env.context_opts
        self.all_shards = settings_from_alembic_config(self.config, section)
        self.settings = select_shards(self.all_shards, requested_shards(self.x_args))
        self.child_report = self.x_args.get(CHILD_ARG)
        self.parallel = _workers(self.x_args.get("parallel"))
        self.timeouts = migration_timeouts(self.config, self.x_args)

    # -- dispatch ----------------------------------------------------------------------------------

    def run(self, hooks: list[PreMigrateHook]) -> MigrationReport | None:
        if self.autogenerate or self.command == "revision":
            self._run_on_reference()
            return None
        order = self._order()
        if self.command in ("upgrade", "downgrade", "stamp"):
            self._check_destination()
            plan = MigrationPlan(
                command=self.command,
                shard_ids=tuple(s.id for s in order),
                destination=self._destination(),
                starting=self._starting(),
                offline=self.env.is_offline_mode(),
                config=self.config,
                script=self.env.script,
                x_args=self.x_args,
            )
            if not self.child_report:  # a -x parallel child: the parent ran the hooks
                for hook in hooks:
                    hook(plan)
        if self.env.is_offline_mode():
            self._run_offline(order)
            return None
        if self.command in _MUTATING:
            try:
                report = self._run_mutating(order)
            except ShardMigrationError as error:
                self._report_to_parent(error.report)
                raise
            self._report_to_parent(report)
            return self._keep(report)
        return self._keep(self._run_read_only(order))

    def _keep(self, report: MigrationReport) -> MigrationReport:
        """Leave the report where :mod:`sa_shardkit.alembic.api` (``upgrade(config)``...) finds it."""
        self.config.attributes[REPORT_ATTRIBUTE] = report
        return report

    def _order(self) -> list[ShardConfig]:
        shards = list(self.settings.shards)
        return shards[::-1] if self.command == "downgrade" else shards

    def _destination(self) -> str | None:
        value = self.env.context_opts.get("destination_rev")
        if isinstance(value, (tuple, list)):
            return ",".join(map(str, value))
        return None if value is None else str(value)

    def _check_destination(self) -> None:
        """An unknown target revision is an error before any shard is touched (not on shard 1)."""
        value = self.env.context_opts.get("destination_rev")
        values = value if isinstance(value, (tuple, list)) else [value]
        for rev in values:
            if isinstance(rev, str) and not _RELATIVE.search(rev):
                self.env.script.get_revisions(rev)  # raises CommandError: Can't locate revision ...

    def _starting(self) -> str | None:
        value = self.env.context_opts.get("starting_rev")
        return None if value is None else str(value)

    def _configure(self, **kw: Any) -> None:
        self.env.configure(target_metadata=self.metadata, **{**self.options, **kw})

    def _print(self, message: str) -> None:
        self.config.print_stdout(message)

    # -- online, changing the schema -----------------------------------------------------------------

    def _run_mutating(self, order: list[ShardConfig]) -> MigrationReport:
        ids = [s.id for s in order]
        with ShardManager(self.settings) as manager:
            before = {s.shard_id: s for s in fleet_status(manager, self.env.script).shards}
            down = [i for i in ids if before[i].error is not None]
            if down:
                outcomes = [
                    ShardOutcome(i, ShardState.UNAVAILABLE, error=before[i].error)
                    if i in down
                    else _not_attempted([i], before)[0]
                    for i in ids
                ]
                return self._fail(outcomes, cause=None)
            unknown = self._unknown_revisions(before.values())
            if unknown:  # Alembic would fail there anyway, after the shards before it had migrated
                outcomes = [
                    ShardOutcome(i, ShardState.FAILED, before[i].heads, before[i].heads, unknown[i])
                    if i in unknown
                    else _not_attempted([i], before)[0]
                    for i in ids
                ]
                return self._fail(outcomes, cause=None)
            if self.parallel > 1 and self.command != "ensure_version" and len(ids) > 1:
                return self._run_parallel(ids, before)
            outcomes = []
            for position, shard_id in enumerate(ids):
                heads = before[shard_id].heads
                self._print(f"shardkit: [{position + 1}/{len(ids)}] {shard_id}: {self.command}")
                try:
                    after = self._migrate_one(manager, shard_id)
                except KeyboardInterrupt:
                    # the shard's transaction rolled back with its connection; say where the fleet stands
                    outcomes.append(ShardOutcome(shard_id, ShardState.FAILED, heads, heads, "interrupted"))
                    outcomes += _not_attempted(ids[position + 1 :], before)
                    self._print(MigrationReport(self.command, self._destination(), tuple(outcomes)).summary())
                    raise
                except Exception as error:  # noqa: BLE001 - recorded, then raised as ShardMigrationError
                    now = _heads_after_failure(manager, shard_id, heads)
                    outcomes.append(
                        ShardOutcome(shard_id, ShardState.FAILED, heads, now, one_line_reason(error))
                    )
                    outcomes += _not_attempted(ids[position + 1 :], before)
                    return self._fail(outcomes, cause=error)
                state = ShardState.UP_TO_DATE if after == heads else ShardState.MIGRATED
                outcomes.append(ShardOutcome(shard_id, state, heads, after))
        report = MigrationReport(self.command, self._destination(), tuple(outcomes))
        self._print(report.summary())
        return report

    def _run_parallel(self, ids: list[str], before: dict[str, ShardRevision]) -> MigrationReport:
        destination = self._destination() or "heads"

        def argv(shard_id: str, report: Path) -> list[str]:
            return child_argv(self.config, self.x_args, shard_id, self.command, destination, report)

        workers = min(self.parallel, len(ids))
        self._print(f"shardkit: {self.command} on {len(ids)} shard(s), {workers} at a time")
        heads = {i: before[i].heads for i in ids}
        outcomes = migrate_in_parallel(ids, workers, argv, heads, self._print)
        report = MigrationReport(self.command, self._destination(), tuple(outcomes))
        if not report.ok:
            return self._fail(outcomes, cause=None)
        self._print(report.summary())
        return report

    def _unknown_revisions(self, shards: Iterable[ShardRevision]) -> dict[str, str]:
        """Shards whose ``alembic_version`` names a revision the scripts lack: ``{shard: reason}``.

        Checked before any shard is touched, like stock Alembic's "Can't locate revision"; only
        ``stamp --purge`` (which replaces the version rows) may go on.
        """
        if self.command == "stamp" and self.env.context_opts.get("purge"):
            return {}
        return {
            s.shard_id: f"Can't locate revision identified by {','.join(s.heads)!r}: the migrations folder "
            "does not have it (deploy the code that has it, or `alembic stamp --purge` that shard)"
            for s in shards
            if s.state is RevisionState.UNKNOWN
        }

    def _refuse_unknown_offline(self, order: list[ShardConfig]) -> None:
        """``--sql`` renders from a given start, but a shard at an unknown revision could run none of
        it: refuse, as online. Shards that cannot be reached are not an error offline."""
        if self.command not in ("upgrade", "downgrade", "stamp"):
            return
        with ShardManager(self.settings) as manager:
            unknown = self._unknown_revisions(fleet_status(manager, self.env.script).shards)
        if unknown:
            raise MigrationError(
                f"shardkit: {self.command} --sql refused, nothing was written: "
                + "; ".join(f"shard {shard_id}: {reason}" for shard_id, reason in unknown.items())
            )

    def _report_to_parent(self, report: MigrationReport) -> None:
        if self.child_report and len(report.outcomes) == 1:
            write_outcome(self.child_report, report.outcomes[0])

    def _migrate_one(self, manager: ShardManager, shard_id: str) -> tuple[str, ...]:
        with manager.connect_direct(shard_id) as conn:  # session-level lock: never via PgBouncer
            self._configure(connection=conn)
            try:
                with self.env.begin_transaction():
                    lock_shard(conn, shard_id)
                    apply_timeouts(conn, self.timeouts)
                    self.env.run_migrations()
                    return tuple(sorted(self.env.get_context().get_current_heads()))
            finally:
                # The lock and the timeouts are session-level, so that they survive the commits of an
                # autocommit_block() (CREATE INDEX CONCURRENTLY); closing the session ends them.
                conn.invalidate()

    def _fail(self, outcomes: list[ShardOutcome], cause: BaseException | None) -> MigrationReport:
        report = MigrationReport(self.command, self._destination(), tuple(outcomes))
        self._print(report.summary())
        raise ShardMigrationError(report.verdict(), report) from cause

    # -- online, read-only -------------------------------------------------------------------------

    def _run_read_only(self, order: list[ShardConfig]) -> MigrationReport:
        outcomes: list[ShardOutcome] = []
        revisions: list[ShardRevision] = []
        script = self.env.script
        with ShardManager(self.settings) as manager:
            for shard in order:
                self._print(f"{shard.id} ({shard.safe_url()}):")
                try:
                    with manager.connect(shard.id) as conn:
                        self._configure(connection=conn)
                        with self.env.begin_transaction():
                            self.env.run_migrations()
                            heads = tuple(sorted(self.env.get_context().get_current_heads()))
                except Exception as error:  # noqa: BLE001 - reported per shard, raised after the loop
                    self._print(f"  error: {one_line_reason(error)}")
                    outcomes.append(ShardOutcome(shard.id, ShardState.FAILED, error=one_line_reason(error)))
                    revisions.append(
                        ShardRevision(shard.id, (), RevisionState.UNREACHABLE, one_line_reason(error))
                    )
                    continue
                outcomes.append(ShardOutcome(shard.id, ShardState.CHECKED, heads, heads))
                revisions.append(ShardRevision(shard.id, heads, classify(script, heads)))
        status = FleetStatus(tuple(revisions), tuple(sorted(script.get_heads())))
        self._print(status.describe())
        report = MigrationReport(self.command, None, tuple(outcomes))
        if not report.ok:
            raise ShardMigrationError(report.verdict(), report)
        if _flag(self.x_args.get("strict")) and not status.in_sync:
            raise ShardMigrationError(status.describe().splitlines()[-1], report)
        return report

    # -- offline (--sql) ---------------------------------------------------------------------------

    def _run_offline(self, order: list[ShardConfig]) -> None:
        self._refuse_unknown_offline(order)
        sql_dir = self.x_args.get("sql_dir")
        directory = Path(sql_dir) if sql_dir else None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        for shard in order:
            banner = f"{shard.id} ({shard.safe_url()})"
            buffer: TextIO | None = None
            try:
                if directory is not None:
                    path = directory / f"{shard.id}.sql"
                    buffer = path.open("w", encoding="utf-8")
                    self._print(f"shardkit: {shard.id}: writing {path}")
                options: dict[str, Any] = {
                    "url": shard.primary_url,
                    "literal_binds": True,
                    "dialect_opts": {"paramstyle": "named"},
                }
                if buffer is not None:
                    options["output_buffer"] = buffer
                self._configure(**options)
                self.env.static_output(f"-- ===== shardkit: BEGIN shard {banner} =====\n")
                for name, value in self.timeouts.items():  # session-level, as online
                    self.env.static_output(f"{set_statement(name, value)};\n\n")
                with self.env.begin_transaction():
                    self.env.run_migrations()
                self.env.static_output(f"-- ===== shardkit: END shard {shard.id} =====\n\n")
            finally:
                if buffer is not None:
                    buffer.close()

    # -- autogenerate ------------------------------------------------------------------------------

    def _run_on_reference(self) -> None:
        reference = self._reference_shard()
        with ShardManager(self.all_shards) as manager:
            status = fleet_status(manager, self.env.script)
            _warn_if_shards_differ(status, reference)
            ref = next(s for s in status.shards if s.shard_id == reference)
            if ref.error is not None:
                raise MigrationError(f"reference shard {reference!r} is unreachable: {ref.error}")
            if self.metadata is not None and self.autogenerate:
                _warn_if_schemas_differ(manager, status, reference, self.metadata)
            log.info("comparing the models with reference shard %s", reference)
            with manager.connect(reference) as conn:
                self._configure(connection=conn)
                with self.env.begin_transaction():
                    self.env.run_migrations()

    def _reference_shard(self) -> str:
        chosen = (
            self.x_args.get("reference")
            or self.config.get_main_option("shardkit_reference_shard")
            or self.settings.shard_ids[0]
        )
        if chosen not in self.all_shards.shard_ids:
            raise ConfigError(
                f"unknown reference shard {chosen!r}; configured shards: {', '.join(self.all_shards.shard_ids)}"
            )
        return chosen


def _heads_after_failure(manager: ShardManager, shard_id: str, before: tuple[str, ...]) -> tuple[str, ...]:
    """Where a failed shard really is: its revision from before the run, unless an
    ``autocommit_block()`` committed some revisions of this run before the failure."""
    try:
        return read_heads(manager, shard_id)
    except SQLAlchemyError:
        return before  # unreachable now; its transaction cannot have committed after the failure


def _workers(value: str | None) -> int:
    """``-x parallel=N``: how many shards may migrate at once (default 1: one after another)."""
    if value is None or not value.strip():
        return 1
    try:
        workers = int(value)
    except ValueError:
        workers = 0
    if workers < 1:
        raise ConfigError(f"-x parallel={value!r}: expected a number of shards >= 1")
    return workers


def _not_attempted(shard_ids: list[str], before: dict[str, ShardRevision]) -> list[ShardOutcome]:
    return [ShardOutcome(i, ShardState.NOT_ATTEMPTED, before[i].heads, before[i].heads) for i in shard_ids]


def _warn_if_shards_differ(status: FleetStatus, reference: str) -> None:
    ref = next(s for s in status.shards if s.shard_id == reference)
    for shard in status.shards:
        if shard.shard_id == reference:
            continue
        if shard.error is not None:
            log.warning("shard %s could not be checked: %s", shard.shard_id, shard.error)
        elif shard.heads != ref.heads:
            log.warning(
                "shard %s is at %s but reference shard %s is at %s: shards differ, and the new "
                "revision is generated against %s only (run `shardkit migrations status`)",
                shard.shard_id,
                ",".join(shard.heads) or "base",
                reference,
                ",".join(ref.heads) or "base",
                reference,
            )


def _warn_if_schemas_differ(
    manager: ShardManager, status: FleetStatus, reference: str, metadata: MetaData | Sequence[MetaData]
) -> None:
    """Shards at the reference's revision whose tables still differ from it (hand-made changes)."""
    ref_heads = next(s.heads for s in status.shards if s.shard_id == reference)
    same_revision = [s.shard_id for s in status.shards if s.error is None and s.heads == ref_heads]
    diffs: dict[str, set[str]] = {}
    for shard_id in same_revision:
        with manager.connect(shard_id) as conn:
            context = MigrationContext.configure(conn, opts={"include_name": library_table_filter(metadata)})
            found = [d for md in _as_list(metadata) for d in compare_metadata(context, md)]
            diffs[shard_id] = {_diff_key(d) for d in found}
    for shard_id in same_revision:
        differences = sorted(diffs[shard_id] ^ diffs[reference])
        if differences:
            log.warning(
                "shard %s has the same revision as reference shard %s but a different schema "
                "(models vs shard, on one of them only: %s); the new revision is generated against %s only",
                shard_id,
                reference,
                "; ".join(differences[:5]) + (" ..." if len(differences) > 5 else ""),
                reference,
            )


def _as_list(metadata: MetaData | Sequence[MetaData]) -> list[MetaData]:
    return [metadata] if isinstance(metadata, MetaData) else list(metadata)


def _diff_key(diff: Any) -> str:
    """A comparable description of one autogenerate difference (object names, not reprs)."""
    if isinstance(diff, list):
        return "; ".join(_diff_key(d) for d in diff)
    parts = [str(diff[0])]
    for item in diff[1:]:
        name = getattr(item, "name", None)
        parts.append(str(name) if name is not None else str(item))
    return " ".join(parts)


def lock_shard(conn: Connection, shard_id: str) -> None:
    """Refuse to migrate a shard that another migration run is migrating right now."""
    if conn.dialect.name != "postgresql":
        return
    got = conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID}).scalar()
    if not got:
        raise MigrationError(f"shard {shard_id!r}: another migration run holds the migration lock")


def one_line_reason(error: BaseException) -> str:
    """One line naming the error, never a password (DBAPI errors: the driver's own message)."""
    if isinstance(error, ShardKitError):
        return str(error).splitlines()[0]
    orig = getattr(error, "orig", None) or error
    message = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {message[0] if message else ''}".rstrip(": ")


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
