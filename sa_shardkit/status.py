"""What every shard and replica looks like right now: the data behind ``shardkit status``.

Every server is asked in parallel, each bounded by its connect timeout, so one dead server costs one
timeout, not one per shard. A fleet is *healthy* when every primary and replica answers, every
replica is within its lag bound, the shards agree on their Alembic revision (are at the scripts'
head when the scripts are known), and every shard of the ring the shards store is in this
configuration (a shard it lacks is listed, not counted, and makes the fleet unhealthy).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from .alembic.status import RevisionState, classify
from .manager import ShardHealth, ShardManager
from .ring_state import ShardState, read_fleet_state

COUNT_TIMEOUT = "10s"
"""How long one shard may spend counting rows before its counts are reported as unknown."""

_TABLES_SQL = text(
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
    "AND c.relname <> 'alembic_version' AND c.relname NOT LIKE 'shardkit\\_%' ORDER BY c.relname"
)
_ESTIMATE_SQL = text(
    "SELECT c.relname, c.reltuples::bigint FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relname = ANY(:names)"
)


_CONNECTIONS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


@dataclass(frozen=True)
class NodeStatus:
    """One server (a shard's primary or its replica) as seen by the status check."""

    shard_id: str
    role: str
    """``"primary"`` or ``"replica"``."""
    url: str
    """Password masked."""
    reachable: bool
    latency_ms: float | None = None
    server_version: str | None = None
    revision: tuple[str, ...] | None = None
    """Alembic ``alembic_version`` rows; None when the table does not exist."""
    revision_state: str | None = None
    row_counts: Mapping[str, int | None] = field(default_factory=dict)
    """Rows per table (None: counting timed out); primaries only."""
    ring_share: float | None = None
    lag_seconds: float | None = None
    connections: int | None = None
    """Client connections to this shard's database on the server (every client, this check excluded)."""
    problem: str | None = None
    """Why this server makes the fleet unhealthy (down, lagging, behind), or None."""
    configured: bool = True
    """False for a shard of the stored ring this configuration lacks (never contacted)."""


@dataclass(frozen=True)
class FleetStatusReport:
    """Every primary and replica, and the scripts' head when the Alembic scripts are known."""

    nodes: tuple[NodeStatus, ...]
    script_heads: tuple[str, ...] | None = None
    exact_counts: bool = True
    ring_version: int | None = None
    """The ring version the shards store (``shardkit rebalance``); None: the configured ring."""
    unlisted: tuple[str, ...] = ()
    """Shards of the stored ring this configuration lacks (their rows are not counted)."""

    @property
    def healthy(self) -> bool:
        return all(node.problem is None for node in self.nodes)

    @property
    def problems(self) -> list[str]:
        return [f"{node.shard_id} {node.role}: {node.problem}" for node in self.nodes if node.problem]

    def total_rows(self) -> int:
        """Rows counted on every primary that answered (a lower bound when one did not)."""
        return sum(n for node in self.nodes for n in node.row_counts.values() if n is not None)

    @property
    def counts_complete(self) -> bool:
        """Did every shard of the ring (and every configured one) report every count?"""
        primaries = [node for node in self.nodes if node.role == "primary"]
        return all(node.reachable and None not in node.row_counts.values() for node in primaries)

    @property
    def tables(self) -> list[str]:
        names = {t for node in self.nodes for t in node.row_counts}
        return sorted(names)


def collect_status(
    manager: ShardManager, *, script: ScriptDirectory | None = None, exact_counts: bool = True
) -> FleetStatusReport:
    """Ask every primary and replica of ``manager`` how it is (in parallel; never raises for a dead shard)."""
    health = manager.health()
    ring_version, ring, shares = _ring_shares(manager)
    jobs = list(health.values())

    def one(h: ShardHealth) -> NodeStatus:
        replica = h.role == "replica"
        engine = manager.replica_engine(h.shard_id) if replica else None
        engine = engine or manager.engine(h.shard_id)
        base = NodeStatus(
            shard_id=h.shard_id,
            role=h.role,
            url=engine.url.render_as_string(hide_password=True),
            reachable=h.reachable,
            latency_ms=h.latency_ms,
            ring_share=None if replica else shares.get(h.shard_id),
        )
        if not h.reachable:
            reason = (h.error or "").partition(" is unavailable: ")[2] or h.error
            return _replace(base, problem=f"unreachable: {reason}")
        try:
            with engine.connect() as conn:
                # "15.20 (Debian 15.20-0+deb12u1)" -> "15.20"
                version = str(conn.execute(text("SHOW server_version")).scalar()).split(" ")[0]
                revision = _revision(conn)
                connections = int(conn.execute(text(_CONNECTIONS)).scalar_one())
                counts = {} if replica else _row_counts(conn, exact_counts)
        except Exception as error:  # noqa: BLE001 - reported per server, not raised
            return _replace(base, reachable=False, problem=f"failed while inspecting: {_first_line(error)}")
        node = _replace(
            base, server_version=version, revision=revision, row_counts=counts, connections=connections
        )
        if replica:
            lag = manager.replicas.status(h.shard_id, refresh=True)
            node = _replace(node, lag_seconds=lag.lag_seconds, problem=None if lag.usable else lag.reason)
        return node

    with ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix="shardkit-status") as pool:
        nodes = list(pool.map(one, jobs))
    unlisted = tuple(s for s in ring if not manager.has_shard(s))
    for shard_id in unlisted:
        nodes.append(
            NodeStatus(
                shard_id=shard_id,
                role="primary",
                url="-",
                reachable=False,
                configured=False,
                ring_share=shares.get(shard_id),
                problem=(
                    f"on the stored ring (version {ring_version}) but not in this configuration: its rows "
                    f"are not counted and this process cannot route its keys; add {shard_id}.url"
                ),
            )
        )
    order = {shard_id: i for i, shard_id in enumerate((*manager.shard_ids, *unlisted))}
    nodes.sort(key=lambda n: (order.get(n.shard_id, len(order)), n.role != "primary"))
    heads = tuple(sorted(script.get_heads())) if script is not None else None
    judged = tuple(_judge_revisions(nodes, script))
    return FleetStatusReport(judged, heads, exact_counts, ring_version, unlisted)


def _ring_shares(manager: ShardManager) -> tuple[int | None, tuple[str, ...], dict[str, float]]:
    """The ring the application routes by (the stored version when the shards have one): its
    version, every member (old and new while a move is in flight) and each one's share."""
    states: list[ShardState] = []
    for shard_id in manager.shard_ids:  # each shard alone: one that is down is reported per node
        try:
            states.extend(read_fleet_state(manager, [shard_id]).values())
        except SQLAlchemyError:
            continue
    if not states:
        return None, manager.configured_ring.shard_ids, manager.configured_ring.shares()
    state = max((s.state for s in states), key=lambda st: st.version)
    return state.version, state.shard_ids, state.ring.shares()


def _judge_revisions(nodes: list[NodeStatus], script: ScriptDirectory | None) -> list[NodeStatus]:
    """Mark primaries behind the scripts' head or, without scripts, disagreeing with the others."""
    primaries = [n for n in nodes if n.role == "primary" and n.reachable and n.problem is None]
    judged: dict[int, NodeStatus] = {}
    if script is not None:
        for node in primaries:
            state = classify(script, node.revision or ())
            problem = None if state is RevisionState.AT_HEAD else f"migrations {state.value}"
            judged[id(node)] = _replace(node, revision_state=state.value, problem=problem)
    elif len({n.revision for n in primaries}) > 1:
        for node in primaries:
            judged[id(node)] = _replace(
                node, revision_state="differs", problem="Alembic revision differs between shards"
            )
    return [judged.get(id(n), n) for n in nodes]


def _revision(conn: Connection) -> tuple[str, ...] | None:
    if conn.execute(text("SELECT to_regclass('alembic_version')")).scalar() is None:
        return None
    return tuple(sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()))


def _row_counts(conn: Connection, exact: bool) -> dict[str, int | None]:
    names = list(conn.execute(_TABLES_SQL).scalars())
    counts: dict[str, int | None] = {}
    if not exact:
        # reltuples is -1 for a table never analyzed (or vacuumed): that is "unknown", not 0 rows,
        # so those tables are counted (under the same statement timeout) instead of estimated
        counts = {name: int(n) for name, n in conn.execute(_ESTIMATE_SQL, {"names": names}) if n >= 0}
        names = [name for name in names if name not in counts]
        if not names:
            return counts
    conn.execute(text(f"SET LOCAL statement_timeout = '{COUNT_TIMEOUT}'"))  # this read-only transaction
    for name in names:
        quoted = conn.dialect.identifier_preparer.quote(name)
        try:
            with conn.begin_nested():
                counts[name] = int(conn.execute(text(f"SELECT count(*) FROM {quoted}")).scalar_one())
        except Exception:  # noqa: BLE001 - a timed-out count is reported as unknown
            counts[name] = None
    return counts


def _first_line(error: BaseException) -> str:
    reason = getattr(error, "orig", None) or error
    lines = str(reason).strip().splitlines()
    return lines[0] if lines else type(reason).__name__


def _replace(node: NodeStatus, **changes: object) -> NodeStatus:
    return replace(node, **changes)  # type: ignore[arg-type]
