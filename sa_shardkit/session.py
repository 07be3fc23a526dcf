"""The sharded ORM session: stock ``horizontal_shard.ShardedSession``, routed by a ShardManager.

``ShardedSession(manager=manager)`` (or ``manager.sessionmaker()``) derives every hook from the
hash ring and the models' declared shard keys (:mod:`sa_shardkit.routing` decides). Without a
manager it is the stock session: ``shard_chooser``, ``identity_chooser``, ``execute_chooser``,
``shards``, ``set_shard_id``, ``bind_arguments={"shard_id": ...}`` and ``identity_token`` keep their
meaning, and each one given alongside a manager overrides the derived hook.

What the manager-routed session adds at flush time, before anything is written:
unknown models raise :class:`NotShardedError`, a missing key :class:`ShardKeyMissingError`,
writes to a second shard in one transaction :class:`CrossShardTransactionError` (unless
``allow_cross_shard=True``), and a changed key that would move a stored row to another shard
:class:`ShardKeyChangeError`.
Reference-table rows are copied to every shard in the same session transaction.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence, Sized
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from weakref import ref

from sqlalchemy import and_, delete, event, insert, inspect, update
from sqlalchemy.engine import ChunkedIteratorResult, Connection, CursorResult, Result
from sqlalchemy.event.attr import _EmptyListener
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.horizontal_shard import (
    IdentityChooser,
    ShardChooser,
    ShardedQuery,
    execute_and_instances,
    set_shard_id,
)
from sqlalchemy.ext.horizontal_shard import ShardedSession as _StockShardedSession
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction
from sqlalchemy.orm.base import instance_state
from sqlalchemy.orm.context import QueryContext
from sqlalchemy.orm.loading import _load_on_pk_identity
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.schema import Table
from sqlalchemy.sql.selectable import Select
from sqlalchemy.sql.util import find_tables
from sqlalchemy.util import EMPTY_DICT, immutabledict

from .armed import Armed
from .declarative import SHARDING_BY_MAPPER_REF as _SHARDING
from .declarative import Sharding, sharding_of, table_sharding
from .errors import (
    CrossShardTransactionError,
    ScatterForbiddenError,
    ScatterWarning,
    ShardKeyChangeError,
    ShardKeyMissingError,
    StaleRingError,
    UnknownShardError,
    UnsupportedScatterError,
)
from .events import SHARD_COUNT
from .faults import named_unavailable
from .flush_fence import fence_planned, fence_statement
from .fused_write import begin_with_next_statement
from .replica_reads import REPLICA_OK, ReplicaChooser, may_read_from_replica, replica_bind
from .routing import (
    Route,
    follows_placement,
    group_insert_rows,
    identity_shard,
    insert_reason,
    keyed_select_shard,
    moving_reads_valid,
    reference_write_shards,
    ring_moved_on,
    route_identity,
    route_statement,
    shard_for_instance,
    shard_for_key,
    watch_moving_reads,
)
from .scatter import execute_scatter
from .scatter.ownership import for_move
from .scatter.writes import queued_writes

SCATTER_MODES = ("allow", "warn", "forbid")
"""``ShardedSession(scatter=...)``: what a statement that runs on several shards does."""

MAX_MOVING_READS = 20
OPTIMISTIC_SCATTERS = 3
"""Tries a scatter during a move makes unfenced before it holds the sources' fences while it runs."""
"""Reads of a key range that is mid-move re-run at most this often when cut-overs keep landing."""

if TYPE_CHECKING:
    from .manager import ShardManager

log = logging.getLogger("sa_shardkit.session")

__all__ = ["BindFactory", "ShardedSession", "add_session_hook", "set_shard_id"]

_DERIVED: Any = object()
"""A hook argument standing for "derive it from the manager"."""

ROUTED = "shardkit_routed"
"""Bind argument: the execution's ``shard_id`` is this library's routing answer already (``get()``)."""
ROUTE_HINT = "shardkit_route"
"""Bind argument: the route :meth:`ShardedSession._direct_shard` found for a SELECT it did not run."""
KEYED_READ = "shardkit_keyed_read"
"""Bind argument: where :func:`_execute_routed` notes the route of a keyed SELECT it let run on."""
OWN_EXECUTE_HOOKS: list[Callable[..., Any]] = []
"""This library's ``do_orm_execute`` listeners on ShardedSession (:func:`listen_execute`)."""
_OWN_HOOK_COUNT = [0]
"""``len(OWN_EXECUTE_HOOKS)``, kept by :func:`listen_execute` (read on every keyed read)."""
_ACTIVE_HOOKS: list[Callable[[Any], bool]] = []
"""Of those, the ``active`` checks of hooks with work only for some sessions (:func:`listen_execute`)."""
_ROW_COUNTING_DRIVERS = frozenset({"psycopg", "psycopg2", "psycopg_async"})
"""DBAPI drivers whose ``cursor.rowcount`` is the number of rows a SELECT returned."""

_PREPARE_FLUSH: list[tuple[Sized, Callable[..., None]]] = []
_AFTER_FLUSH: list[tuple[Sized, Callable[..., None]]] = []
_AFTER_COMMIT: list[tuple[Sized, Callable[..., None]]] = []
_TRANSACTION_END: list[tuple[Sized, Callable[..., None]]] = []
_SESSION_HOOKS = {
    "prepare_flush": _PREPARE_FLUSH,
    "after_flush": _AFTER_FLUSH,
    "after_commit": _AFTER_COMMIT,
    "transaction_end": _TRANSACTION_END,
}
"""Flush and transaction work of features above the session (:func:`add_session_hook`)."""


@functools.lru_cache(maxsize=1024)
def _token_load_options(shard_id: str) -> Any:
    """The ORM load options that ``identity_token=shard_id`` becomes, made once per shard."""
    return QueryContext.default_load_options + {"_identity_token": shard_id}


@functools.lru_cache(maxsize=1024)
def _identity_option(shard_id: str) -> Any:
    """The execution options of a directly routed SELECT: its rows' identity token is the shard.

    Given as the ORM load options that ``identity_token=`` becomes (what ``Session.get`` passes
    too), made once per shard: SQLAlchemy then has no option to turn into load options per
    statement (~10k instructions of a keyed read). The direct path runs only for a statement and
    session without execution options of their own, so there are none to merge with."""
    return immutabledict({"_sa_orm_load_options": _token_load_options(shard_id)})


_DEFAULT_LOAD_OPTIONS = QueryContext.default_load_options


def _load_by_token(
    session: Session,
    statement: Any,
    primary_key: Any,
    *,
    load_options: Any = None,
    identity_token: Any = None,
    **kw: Any,
) -> Any:
    """``Session.get``'s load of a row it did not find in the identity map
    (``loading._load_on_pk_identity``), the identity token given as its cached load options: the
    stock path adds the token to the default options anew on every ``get()``."""
    if identity_token is not None and load_options is _DEFAULT_LOAD_OPTIONS:
        load_options, identity_token = _token_load_options(identity_token), None
    return _load_on_pk_identity(
        session, statement, primary_key, load_options=load_options, identity_token=identity_token, **kw
    )


class _NoEvents:
    """Stands in for the parent of a nested execution that has no ``do_orm_execute`` hook left."""

    __slots__ = ()

    # what SQLAlchemy calls to get the hooks left: tuple() is (), a C call, not a Python frame
    _remaining_events = staticmethod(tuple)


_NO_EVENTS = _NoEvents()


def _run_named(session: Session, statement: Any, params: Any, bind_arguments: Any, kw: dict[str, Any]) -> Any:
    """The stock execution, its marked connection failures raised as ShardUnavailableError."""
    try:
        return Session._execute_internal(session, statement, params, bind_arguments=bind_arguments, **kw)
    except DBAPIError as error:
        unavailable = named_unavailable(error)
        if unavailable is not None:
            raise unavailable from error
        raise


def _names_shards(method: Callable[..., Any]) -> Any:
    """``method`` raising a marked connection failure as the ShardUnavailableError naming its shard."""

    @functools.wraps(method)
    def named(self: Session, *args: Any, **kw: Any) -> Any:
        try:
            return method(self, *args, **kw)
        except DBAPIError as error:
            unavailable = named_unavailable(error)
            if unavailable is not None:
                raise unavailable from error
            raise

    return named


class BindFactory:
    """``ShardedSession(manager=..., shards=BindFactory(create))``: a configured shard's bind is
    ``create(shard_id)``, called when the session uses that shard (``AsyncShardManager`` passes
    its async engines' sync sides, each created on its shard's first use)."""

    __slots__ = ("create",)

    def __init__(self, create: Callable[[str], Any]) -> None:
        self.create = create


_SHARED_BINDS = "_shardkit_session_binds"
"""ShardManager attribute: the :class:`_ShardBinds` its sessions share until one binds a shard."""


class _ShardBinds(MutableMapping[str, Any]):
    """A session's bind per shard: its own (``shards=``, ``bind_shard``), else the manager's
    engine (or a :class:`BindFactory`'s), looked up (so created) only when the session uses it.

    Sessions made without ``shards=`` share their manager's (:func:`_manager_binds`): it holds
    nothing of a session's own, and :meth:`ShardedSession.bind_shard` gives a session its own
    copy first (a shared one refuses changes)."""

    __slots__ = ("_create", "_manager", "_own", "_shared")

    def __init__(
        self, manager: ShardManager, own: Mapping[str, Any] | BindFactory | None, *, shared: bool = False
    ) -> None:
        self._manager = manager
        self._shared = shared
        self._own: dict[str, Any] = {}
        self._create: Callable[[str], Any] | None = None  # None: the manager's engines
        if own is not None:
            if isinstance(own, BindFactory):
                self._create = own.create
            else:
                self._own = dict(own)

    def get(self, shard_id: str, default: Any = None) -> Any:  # type: ignore[override]
        if self._own:
            bind = self._own.get(shard_id)
            if bind is not None:
                return bind
        if self._create is None:
            engine = self._manager._engines.get(shard_id)  # created already: what engine() returns
            if engine is not None:
                return engine
            return self._manager.engine(shard_id) if self._manager.has_shard(shard_id) else default
        return self._create(shard_id) if self._manager.has_shard(shard_id) else default

    def __getitem__(self, shard_id: str) -> Any:
        bind = self.get(shard_id)
        if bind is None:
            raise KeyError(shard_id)
        return bind

    def __setitem__(self, shard_id: str, bind: Any) -> None:
        if self._shared:
            raise TypeError("the manager's shared shard binds are read-only: use ShardedSession.bind_shard")
        self._own[shard_id] = bind

    def __delitem__(self, shard_id: str) -> None:
        if self._shared:
            raise TypeError("the manager's shared shard binds are read-only")
        del self._own[shard_id]

    def __iter__(self) -> Iterator[str]:
        ids = self._manager.shard_ids
        extra = [s for s in self._own if not self._manager.has_shard(s)] if self._own else []
        return iter(ids if not extra else (*ids, *extra))  # a C-level iterator: no call per shard

    def __len__(self) -> int:
        return len(self._manager.shard_ids) + sum(1 for s in self._own if not self._manager.has_shard(s))


def _manager_binds(manager: ShardManager) -> _ShardBinds:
    """The :class:`_ShardBinds` every session of ``manager`` without ``shards=`` starts with."""
    binds: _ShardBinds | None = getattr(manager, _SHARED_BINDS, None)
    if binds is None:
        binds = _ShardBinds(manager, None, shared=True)
        setattr(manager, _SHARED_BINDS, binds)
    return binds


class ShardedSession(_StockShardedSession):
    """A drop-in ``horizontal_shard.ShardedSession``; pass ``manager=`` to route by the ring.

    :param manager: the :class:`ShardManager` whose engines are the shards and whose ring (with
        the models' ``__shard_key__``) picks them. Explicit hooks/``shards`` override its defaults.
    :param shard_id: pin every statement and flush of this session to one shard (an override:
        keys are not checked against the ring).
    :param allow_cross_shard: let one transaction write to several shards. Commits are then
        NOT atomic across shards unless the session is created with ``twophase=True``.
    :param replica_reads: let reads outside a transaction that used the primary go to the
        shard's replica when one is configured and fresh (see :mod:`sa_shardkit.replica_reads`).
    :param scatter: ``"allow"`` (default, as stock), ``"warn"`` (a :class:`ScatterWarning` per
        statement that runs on several shards) or ``"forbid"`` (:class:`ScatterForbiddenError`
        before anything runs); :meth:`no_scatter` forbids them for one block.
    :param choose_replica: which replica engine a read of a shard may use now (None: the
        primary); the default asks the manager. ``AsyncShardManager`` passes its async replicas.
    """

    manager: ShardManager | None
    # Defaults at class level: a session sets an attribute of its own only where it differs (or
    # once it is used). SQLAlchemy's Session sets 18; with 20 more the instance dict passed the
    # 30 keys CPython's shared-key dicts hold, and every session paid its growth (~20k instructions,
    # more than the routing of a keyed read).
    pinned_shard_id: str | None = None
    allow_cross_shard: bool = False
    replica_reads: bool = True
    scatter: str = "allow"
    _no_scatter = 0
    _primary_reads = 0
    _choose_replica: ReplicaChooser | None = None
    _affinity: str | None = None  # the shard this transaction works on, for reference reads
    _written_shards: Mapping[str, str] = EMPTY_DICT  # replaced, never changed in place
    _planned_shards: Mapping[str, str] = EMPTY_DICT
    _fenced_writes: set[tuple[str, Any]] | frozenset[tuple[str, Any]] = frozenset()  # see fenced_writes()
    # the connections the last flush's fence took, and their (outermost) transaction
    _flush_conns: tuple[SessionTransaction | None, dict[str, Connection]] | None = None
    _reference_writes: Sequence[tuple[object, str, tuple[Any, ...] | None]] = ()
    # None: the hook derived from the manager (a bound method, made when read: storing one
    # would make every session a reference cycle that only the cyclic collector frees)
    _shard_chooser_hook: Any = None
    _identity_chooser_hook: Any = None
    _execute_chooser_hook: Any = None

    def __init__(
        self,
        shard_chooser: ShardChooser | None = None,
        identity_chooser: IdentityChooser | None = None,
        execute_chooser: Any = None,
        shards: dict[str, Any] | BindFactory | None = None,
        query_cls: Any = ShardedQuery,
        *,
        manager: ShardManager | None = None,
        # Session's, named here so that sessionmaker's keywords match parameters by identity
        # (a keyword left for **kwargs is compared as a string with every parameter name first)
        bind: Any = None,
        autoflush: bool = True,
        expire_on_commit: bool = True,
        shard_id: str | None = None,
        allow_cross_shard: bool = False,
        replica_reads: bool = True,
        choose_replica: ReplicaChooser | None = None,
        scatter: str = "allow",
        **kwargs: Any,
    ) -> None:
        if scatter != "allow":
            if scatter not in SCATTER_MODES:
                raise ArgumentError(f"scatter must be one of {', '.join(SCATTER_MODES)}, not {scatter!r}")
            self.scatter = scatter
        self.manager = manager
        if shard_id is not None:
            self.pinned_shard_id = shard_id
        if allow_cross_shard:
            self.allow_cross_shard = True
        if not replica_reads:
            self.replica_reads = False
        if choose_replica is not None:
            self._choose_replica = choose_replica
        self._routed_execute = manager is not None and execute_chooser is None
        factory = shards is not None and isinstance(shards, BindFactory)
        if factory and manager is None:
            raise ArgumentError("shards=BindFactory(...) needs manager=")
        binds: MutableMapping[str, Any] | None = None if factory else shards  # type: ignore[assignment]
        if manager is not None:
            # each shard's engine created on its first use
            binds = getattr(manager, _SHARED_BINDS, None) if shards is None else None
            if binds is None:
                binds = _manager_binds(manager) if shards is None else _ShardBinds(manager, shards)
            derived = _DERIVED
            shard_chooser = shard_chooser or derived
            if identity_chooser is None and "id_chooser" not in kwargs:
                identity_chooser = derived
            if execute_chooser is None and "query_chooser" not in kwargs:
                execute_chooser = derived
        elif shard_chooser is None:
            raise ArgumentError("ShardedSession needs shard_chooser (and the other hooks) or manager=")
        if "id_chooser" in kwargs or "query_chooser" in kwargs:  # deprecated stock arguments
            kwargs.update(bind=bind, autoflush=autoflush, expire_on_commit=expire_on_commit)
            super().__init__(shard_chooser, identity_chooser, execute_chooser, binds, query_cls, **kwargs)  # type: ignore[arg-type]
            event.remove(self, "do_orm_execute", execute_and_instances)  # ours is class-level
        else:
            # the stock constructor minus its per-session event.listen (ours are class-level):
            # registering and removing listeners on every new session costs more than a query does
            Session.__init__(
                self,
                bind=bind,
                autoflush=autoflush,
                expire_on_commit=expire_on_commit,
                query_cls=query_cls,
                **kwargs,
            )
            if identity_chooser is None:
                raise ArgumentError("identity_chooser or id_chooser is required")
            if execute_chooser is None:
                raise ArgumentError("execute_chooser or query_chooser is required")
            if shard_chooser is not _DERIVED:
                self._shard_chooser_hook = shard_chooser
            if identity_chooser is not _DERIVED:
                self._identity_chooser_hook = identity_chooser
            if execute_chooser is not _DERIVED:
                self._execute_chooser_hook = execute_chooser
            # what bind_shard() fills: the manager's engines, looked up (and created) as shards are used
            self._ShardedSession__shards: MutableMapping[str, Any] = (
                binds if manager is not None else dict(binds or {})  # type: ignore[arg-type,assignment]
            )
        if shard_id is not None and shard_id not in self._shard_ids():
            raise UnknownShardError(f"cannot pin the session to unknown shard {shard_id!r}")

    @classmethod
    def _of_manager(cls, manager: ShardManager, autoflush: bool, expire_on_commit: bool) -> Any:
        """``cls(manager=manager, autoflush=..., expire_on_commit=...)``, everything else left at
        its default, without matching a dozen keywords against parameters that are not given
        (what :class:`sa_shardkit.sessionmaker.ShardedSessionmaker` calls): what ``__init__`` sets in that
        case, and nothing else (a test compares the two)."""
        self = cls.__new__(cls)
        self.manager = manager
        self._routed_execute = True
        Session.__init__(self, autoflush=autoflush, expire_on_commit=expire_on_commit, query_cls=ShardedQuery)
        self._ShardedSession__shards = _manager_binds(manager)
        return self

    # -- the hooks: given ones, else derived from the manager --------------------------------------

    @property
    def shard_chooser(self) -> Any:
        hook = self._shard_chooser_hook
        return self._choose_shard if hook is None else hook

    @shard_chooser.setter
    def shard_chooser(self, hook: Any) -> None:
        self._shard_chooser_hook = None if hook is _DERIVED else hook

    @property
    def identity_chooser(self) -> Any:
        hook = self._identity_chooser_hook
        return self._choose_identity_shards if hook is None else hook

    @identity_chooser.setter
    def identity_chooser(self, hook: Any) -> None:
        self._identity_chooser_hook = None if hook is _DERIVED else hook

    @property
    def execute_chooser(self) -> Any:
        hook = self._execute_chooser_hook
        return self._choose_execute_shards if hook is None else hook

    @execute_chooser.setter
    def execute_chooser(self, hook: Any) -> None:
        self._execute_chooser_hook = None if hook is _DERIVED else hook

    # -- shard faults named ------------------------------------------------------------------------
    # A manager's engines mark connection failures with their shard (sa_shardkit.faults); every
    # way into the database raises those as ShardUnavailableError naming the shard.

    def _execute_internal(
        self,
        statement: Any,
        params: Any = None,
        *,
        execution_options: Any = EMPTY_DICT,
        bind_arguments: Any = None,
        _parent_execute_state: Any = None,
        _add_event: Any = None,
        _scalar_result: bool = False,
    ) -> Any:
        """Every execution (execute, scalars, get, lazy loads): shard faults named, and a keyed
        read that found nothing re-checked against the stored ring.

        :func:`_execute_routed` lets a keyed SELECT run straight on (one pass through execute, its
        result untouched) and notes its route in the slot passed here as a bind argument; only an
        empty answer costs the ring check (:func:`_read_keyed` explains why). When only this
        library listens to ``do_orm_execute``, a plain keyed SELECT (:meth:`_direct_shard`) and a
        ``get()`` routed already (bind argument :data:`ROUTED`) skip the hooks: all they would do
        is bind the shard named here.
        """
        manager = self.manager
        # get(), routed already: the bind arguments are the dict get() made (ROUTED is this
        # module's own key), so it is changed in place rather than copied
        if bind_arguments and ROUTED in bind_arguments and manager is not None:
            del bind_arguments[ROUTED]
            if self._hooks_idle():
                if self._affinity is None:
                    self._affinity = bind_arguments["shard_id"]
                try:  # what _run_named does, without the call
                    return Session._execute_internal(
                        self,
                        statement,
                        params,
                        execution_options=execution_options,
                        bind_arguments=bind_arguments,
                        _parent_execute_state=_NO_EVENTS,
                        _add_event=_add_event,
                        _scalar_result=_scalar_result,
                    )
                except DBAPIError as error:
                    unavailable = named_unavailable(error)
                    if unavailable is not None:
                        raise unavailable from error
                    raise
        kw: dict[str, Any] = {
            "execution_options": execution_options,
            "_parent_execute_state": _parent_execute_state,
            "_add_event": _add_event,
            "_scalar_result": _scalar_result,
        }
        if manager is None:
            return _run_named(self, statement, params, bind_arguments, kw)
        if bind_arguments:
            bind_arguments = dict(bind_arguments)
        else:
            bind_arguments = {}
            if (
                type(statement) is Select
                and not execution_options
                and _parent_execute_state is None
                and _add_event is None
                and not _scalar_result
            ):
                shard, route = self._direct_shard(statement, params)
                if route is not None:
                    bind_arguments[ROUTE_HINT] = route  # a scatter: the hook need not route it again
                elif shard is not None:
                    if self._affinity is None:
                        self._affinity = shard
                    bind: dict[str, Any] = {"shard_id": shard}
                    if (
                        statement._for_update_arg is None
                        and self.replica_reads
                        and not self._primary_reads
                        and (self._choose_replica is not None or manager.has_replicas)
                    ):
                        bind[REPLICA_OK] = True
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "SELECT -> %s (%s, no execute hooks)",
                            shard,
                            _select_reason(self, statement, params),
                        )
                    try:  # what _run_named does, without the call
                        result = Session._execute_internal(
                            self,
                            statement,
                            params,
                            execution_options=_identity_option(shard),
                            bind_arguments=bind,
                            _parent_execute_state=_NO_EVENTS,
                        )
                    except DBAPIError as error:
                        unavailable = named_unavailable(error)
                        if unavailable is not None:
                            raise unavailable from error
                        raise
                    # rows found? the driver's count, as _rows_found reads it first, without the call
                    raw: Any = result.raw if type(result) is ChunkedIteratorResult else None
                    cursor = raw.cursor if type(raw) is CursorResult else None
                    count = -1 if cursor is None else cursor.rowcount
                    if count >= 0 and raw.dialect.driver in _ROW_COUNTING_DRIVERS:
                        found = count > 0
                    else:
                        result, found = _rows_found(result)
                    if found or not ring_moved_on(manager, (shard,)):
                        return result
                    # the ring moved on since this process routed by it: the hooks route it again
        if _scalar_result:  # a scalar answer cannot say "no rows": _read_keyed checks
            return _run_named(self, statement, params, bind_arguments, kw)
        for _ in range(MAX_MOVING_READS):
            keyed: list[Route] = []
            result = _run_named(self, statement, params, {**bind_arguments, KEYED_READ: keyed}, kw)
            if not keyed:
                return result
            result, found = _rows_found(result)
            if found or not ring_moved_on(manager, keyed[0].shard_ids):
                return result
            # the ring moved on since this process routed by it: route by the new state, again
        raise StaleRingError(f"the ring kept changing while running {type(statement).__name__}; retry")

    def _direct_shard(self, statement: Select[Any], params: Any) -> tuple[str | None, Route | None]:
        """The shard :func:`_execute_routed` would run this SELECT on, when one shard means a keyed
        read and nothing more: ``(shard, None)``. ``(None, route)``: a scatter, routed already.
        ``(None, None)`` when anything could make the hooks do more: another ``do_orm_execute``
        listener, execution options (a shard, identity token, stream, load options), a
        ``set_shard_id`` option, a pinned session, a move in flight.
        """
        if (
            statement._execution_options
            or self.execution_options
            or not self._routed_execute
            or self.pinned_shard_id is not None
            or not self._hooks_idle()
        ):
            return None, None
        for option in statement._with_options:
            if isinstance(option, set_shard_id):
                return None, None
        manager = self.manager
        assert manager is not None
        shard = keyed_select_shard(manager, statement, params)  # the common case, in one lookup
        if shard is not None:
            return shard, None
        if follows_placement(manager):
            return None, None
        route = route_statement(manager, statement, params)
        if route.reference or len(route.shard_ids) != 1:
            return None, route
        return route.shard_ids[0], None

    def _hooks_idle(self) -> bool:
        """Only this library listens to ``do_orm_execute``, and no hook of it that works for some
        sessions only (:func:`listen_execute`'s ``active``) has work for this one: a keyed SELECT
        or a routed ``get()`` may skip the hooks. Any other listener (a user's) keeps them all."""
        listeners = self.dispatch.do_orm_execute
        # no listener on this session itself: the class's, counted without a call to __len__
        count = len(listeners.parent_listeners if type(listeners) is _EmptyListener else listeners)
        if count != _OWN_HOOK_COUNT[0]:
            return False
        return not _ACTIVE_HOOKS or not any(active(self) for active in _ACTIVE_HOOKS)

    def _replica_reads_now(self) -> bool:
        """May a read of this session go to a replica now (before the transaction's own check)?"""
        return self.replica_reads and not self._primary_reads and self._may_use_replicas()

    _flush = _names_shards(_StockShardedSession._flush)  # every flush's work: flush(), autoflush, commit
    commit = _names_shards(_StockShardedSession.commit)
    connection = _names_shards(_StockShardedSession.connection)

    def connection_callable(  # type: ignore[override]
        self, mapper: Any = None, instance: Any = None, shard_id: Any = None, **kw: Any
    ) -> Any:
        """The flush's connection for a row: the stock answer, for a row whose shard its state
        holds (the flush plan set it) without the stock path's inspect() and transaction lookups."""
        if shard_id is None and instance is not None and not kw:
            state = instance_state(instance)
            key = state.key
            shard_id = key[2] if key else state.identity_token
            transaction = self._transaction
            if shard_id and transaction is not None:
                while transaction._parent is not None:  # what get_transaction() finds
                    transaction = transaction._parent
                held = self._flush_conns  # the fence's connections, when it ran in this transaction
                if held is not None and held[0] is transaction:
                    conn = held[1].get(shard_id)
                    if conn is not None:
                        return conn
                return transaction.connection(mapper, shard_id=shard_id)
        return super().connection_callable(mapper, instance, shard_id=shard_id or None, **kw)

    def _flush_connection(self, shard_id: str) -> Connection:
        """The connection a flush writes ``shard_id``'s rows on, as ``connection(bind_arguments=
        {"shard_id": ...})`` gives it, without its context-manager check (a flush runs inside the
        transaction, as the stock flush path's ``transaction.connection()``) and ``get_bind`` call."""
        shards = self._ShardedSession__shards  # type: ignore[has-type]
        bind = None
        if type(shards) is _ShardBinds and shards._create is None and not shards._own:
            bind = shards._manager._engines.get(shard_id)  # created already: what get_bind returns
        if bind is None:
            bind = self.get_bind(shard_id=shard_id)
        transaction = self._transaction or self._autobegin_t()
        return transaction._connection_for_bind(bind, None)

    def bind_shard(self, shard_id: str, bind: Any) -> None:
        shards = self._ShardedSession__shards  # type: ignore[has-type]
        if type(shards) is _ShardBinds and shards._shared:  # the manager's: this session's own copy
            shards = self._ShardedSession__shards = _ShardBinds(shards._manager, None)
        shards[shard_id] = bind

    # -- binds -----------------------------------------------------------------------------------

    def _shard_ids(self) -> Sequence[str]:
        return list(self._ShardedSession__shards)  # type: ignore[attr-defined]

    def get_bind(  # type: ignore[override]
        self,
        mapper: Any = None,
        *,
        shard_id: str | None = None,
        instance: Any = None,
        clause: Any = None,
        **kw: Any,
    ) -> Any:
        if shard_id is None and self.pinned_shard_id is not None:
            shard_id = self.pinned_shard_id
        if shard_id is None and mapper is None and instance is None and self.manager is not None:
            if clause is None:
                raise ShardKeyMissingError(
                    "no shard to bind to: pass bind_arguments={'shard_id': ...} (e.g. to connection())"
                )
            shard_id = self._choose_shard(None, None, clause)
        if kw and kw.pop(REPLICA_OK, False) and shard_id is not None and self.manager is not None:
            primary = self._ShardedSession__shards.get(shard_id)  # type: ignore[attr-defined]
            replica = replica_bind(self, self.manager, shard_id, primary, self._choose_replica)
            if replica is not None:
                return replica
        if shard_id is not None:  # what the stock get_bind does with a shard_id, minus a call
            shards = self._ShardedSession__shards
            if type(shards) is _ShardBinds and shards._create is None and not shards._own:
                bind = shards._manager._engines.get(shard_id)  # what shards.get finds, without the call
                if bind is not None:
                    return bind
            bind = shards.get(shard_id)
            if bind is not None:
                return bind
        try:
            return super().get_bind(mapper, shard_id=shard_id, instance=instance, clause=clause, **kw)
        except KeyError:
            if self.manager is not None and shard_id is not None and not self.manager.has_shard(shard_id):
                raise self.manager.placement.unlisted(shard_id) from None
            raise UnknownShardError(
                f"unknown shard {shard_id!r}; this session's shards: {', '.join(self._shard_ids())}"
            ) from None

    def get(self, entity: Any, ident: Any, **kw: Any) -> Any:  # type: ignore[override]
        """``Session.get``; when the primary key holds the shard key, straight to that shard.

        Passing the shard as ``identity_token`` spares the identity chooser and the analysis of
        the primary-key SELECT; every other case takes the stock path.
        """
        manager = self.manager
        if manager is None:
            return super().get(entity, ident, **kw)
        if not kw and self.pinned_shard_id is None:  # the common case: one lookup, no move in flight
            # a declarative class holds its mapper itself
            mapper = entity.__dict__.get("__mapper__") if isinstance(entity, type) else None
            if type(mapper) is Mapper and type(ident) is not dict:
                shard = identity_shard(manager, mapper, ident if type(ident) in (tuple, list) else (ident,))
                if shard is not None:  # routed here: the execute hooks have nothing to add
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug(
                            "get(%s, %r) -> %s (primary key holds the shard key)",
                            entity.__name__,
                            ident,
                            shard,
                        )
                    bind: dict[str, Any] = {"shard_id": shard, ROUTED: True}
                    if (
                        self.replica_reads
                        and not self._primary_reads
                        and (self._choose_replica is not None or manager.has_replicas)
                    ):
                        bind[REPLICA_OK] = True
                    # Session.get's own call, the token given as load options made once per shard
                    found = self._get_impl(
                        entity, ident, _load_by_token, identity_token=shard, bind_arguments=bind
                    )
                    if found is not None or not ring_moved_on(manager, (shard,)):
                        return found
        if not follows_placement(manager):  # no move in flight: only an empty answer is re-checked
            shard = self._get_shard(entity, ident, kw)
            if shard is not None and not kw:  # routed here: the execute hooks have nothing to add
                bind = {"shard_id": shard, ROUTED: True}
                if self.replica_reads and not self._primary_reads and self._may_use_replicas():
                    bind[REPLICA_OK] = True
                found = super().get(entity, ident, identity_token=shard, bind_arguments=bind)
            else:
                found = super().get(
                    entity, ident, **(kw if shard is None else {**kw, "identity_token": shard})
                )
            if found is not None or shard is None or not ring_moved_on(self.manager, (shard,)):
                return found
        for _ in range(MAX_MOVING_READS):
            with watch_moving_reads(self.manager) as moving:
                shard = self._get_shard(entity, ident, kw)
            found = super().get(entity, ident, **(kw if shard is None else {**kw, "identity_token": shard}))
            if found is not None:
                return found
            if not moving_reads_valid(self.manager, moving):
                continue  # the key was cut over while we read its old shard: again
            if shard is None or not ring_moved_on(self.manager, (shard,)):
                return None  # else a move this process had not seen yet: route by it, again
        raise StaleRingError(f"the ring kept changing while reading {ident!r}; retry")

    def _may_use_replicas(self) -> bool:
        """Could any read of this session go to a replica (one is configured, or a chooser given)?"""
        return self._choose_replica is not None or self.manager.has_replicas  # type: ignore[union-attr]

    def _get_shard(self, entity: Any, ident: Any, kw: dict[str, Any]) -> str | None:
        if self.pinned_shard_id is not None:
            return None
        if kw and (
            kw.get("identity_token") is not None
            or "shard_id" in (kw.get("bind_arguments") or {})
            or "shard_id" in (kw.get("execution_options") or {})
        ):
            return None
        if isinstance(ident, dict):
            return None
        # a declarative class holds its mapper itself; anything else is asked the usual way
        mapper = entity.__dict__.get("__mapper__") if isinstance(entity, type) else None
        if not isinstance(mapper, Mapper):
            mapper = getattr(inspect(entity, raiseerr=False), "mapper", None)
            if mapper is None:
                return None
        assert self.manager is not None
        route = route_identity(self.manager, mapper, ident if isinstance(ident, (tuple, list)) else (ident,))
        if len(route.shard_ids) != 1 or route.reference:
            return None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "get(%s, %r) -> %s (%s)", mapper.class_.__name__, ident, route.shard_ids[0], route.reason
            )
        return route.shard_ids[0]

    # -- the hooks derived from the manager ------------------------------------------------------

    def _choose_shard(self, mapper: Any, instance: Any, clause: Any = None) -> str:
        """``shard_chooser``: the instance's shard (key, or parent's), or a statement's single shard."""
        assert self.manager is not None
        if self.pinned_shard_id is not None:
            return self.pinned_shard_id
        if instance is not None:
            try:
                return shard_for_instance(self.manager, instance, mapper)
            except ShardKeyMissingError:
                parent = self._collection_parent(instance)
                if parent is None:
                    raise
                parent_state = inspect(parent)
                if parent_state.key is not None:
                    return str(parent_state.key[2])  # a stored parent: the shard it came from
                return self._choose_shard(None, parent)
        if clause is not None:
            route = route_statement(self.manager, clause)
            if len(route.shard_ids) == 1:
                return route.shard_ids[0]
            raise ShardKeyMissingError(f"statement targets {len(route.shard_ids)} shards ({route.reason})")
        raise ShardKeyMissingError("no instance or statement to choose a shard from; pass shard_id")

    def _collection_parent(self, instance: object) -> Any:
        """An object in this session holding ``instance`` in a one-to-many collection.

        Covers relationships without a many-to-one back reference (the child cannot name its
        parent itself); only searched when a new object has no shard key.
        """
        for candidate in [*self.new, *self.identity_map.values()]:
            state = inspect(candidate)
            for rel in state.mapper.relationships:
                if rel.direction.name != "ONETOMANY" or rel.key not in state.dict:
                    continue
                value = state.dict[rel.key]
                children = value if rel.uselist else [value]
                if any(child is instance for child in children):
                    return candidate
        return None

    def _choose_identity_shards(
        self,
        mapper: Mapper[Any],
        primary_key: Any,
        *,
        lazy_loaded_from: InstanceState[Any] | None,
        execution_options: Any,
        bind_arguments: Any,
        **kw: Any,
    ) -> Sequence[str]:
        """``identity_chooser``: the shards where ``get(Model, pk)`` may find the row."""
        assert self.manager is not None
        explicit = bind_arguments.get("shard_id") or (execution_options or {}).get("shard_id")
        if explicit is not None:
            return [str(explicit)]
        if self.pinned_shard_id is not None:
            return [self.pinned_shard_id]
        if lazy_loaded_from is not None and lazy_loaded_from.key is not None:
            return [str(lazy_loaded_from.key[2])]
        pk = primary_key if isinstance(primary_key, (tuple, list)) else (primary_key,)
        route = route_identity(self.manager, mapper, pk)
        if route.reference and self._affinity is not None:
            return list(dict.fromkeys((self._affinity, *route.shard_ids)))
        if route.scatter:
            log.debug(
                "get(%s, %r) -> %s: %s", mapper.class_.__name__, primary_key, route.shard_ids, route.reason
            )
        return list(route.shard_ids)

    def _choose_execute_shards(self, orm_context: ORMExecuteState) -> Sequence[str]:
        """``execute_chooser``: the shards a statement targets (see :mod:`sa_shardkit.routing`)."""
        return self.route(orm_context).shard_ids

    def route(self, orm_context: ORMExecuteState) -> Route:
        """Where an execution goes and why: a lazy load stays on its parent's shard."""
        assert self.manager is not None
        if orm_context.is_select:
            parent = orm_context.lazy_loaded_from
            if parent is not None and parent.key is not None:
                shard = str(parent.key[2])
                return Route((shard,), f"lazy load from {parent.mapper.class_.__name__} on {shard}")
        return route_statement(self.manager, orm_context.statement, orm_context.parameters)  # type: ignore[arg-type]

    # -- write tracking --------------------------------------------------------------------------

    def _note_writes(self, shards: dict[str, str]) -> None:
        """Raise :class:`CrossShardTransactionError` if this transaction would span two shards."""
        if self.allow_cross_shard or not shards:
            return
        combined = {**self._written_shards, **shards}
        if len(combined) > 1:
            (first, why_first), (second, why_second) = list(combined.items())[:2]
            raise CrossShardTransactionError(
                f"one transaction would write to shard {first!r} ({why_first}) and shard {second!r} "
                f"({why_second}); use one session transaction per shard key, or "
                "ShardedSession(allow_cross_shard=True) (not atomic across shards unless twophase=True)"
            )

    def fenced_writes(self) -> set[tuple[str, Any]]:
        """The (shard, key) pairs whose write fence this transaction holds (``flush_fence``), a set
        of this session's own from the first fence on (emptied when the transaction ends)."""
        fenced = self._fenced_writes
        if isinstance(fenced, set):
            return fenced
        own: set[tuple[str, Any]] = set()
        self._fenced_writes = own
        return own

    def shards_written(self) -> tuple[str, ...]:
        """Shards this session's current transaction has written to (sharded tables only)."""
        return tuple(self._written_shards)

    @contextmanager
    def no_scatter(self) -> Iterator[None]:
        """Inside this block a statement that would run on several shards raises
        :class:`ScatterForbiddenError` (naming its tables and why it was not routed to one)."""
        self._no_scatter += 1
        try:
            yield
        finally:
            self._no_scatter -= 1

    def _check_scatter(self, orm_context: ORMExecuteState, route: Route) -> None:
        """Strict mode: refuse or warn about a statement routed to several shards."""
        mode = "forbid" if self._no_scatter else self.scatter
        if mode == "allow":
            return
        statement: Any = orm_context.statement
        tables = (
            sorted({t.name for t in find_tables(statement, include_crud=True)})
            if statement is not None
            else []
        )
        message = (
            f"{_statement_name(orm_context)} on table(s) {', '.join(tables) or '?'} would run on "
            f"{len(route.shard_ids)} shards ({', '.join(route.shard_ids)}): not routed to one because "
            f"{route.reason}; filter by the shard key, pass bind_arguments={{'shard_id': ...}}, or allow it "
            "(ShardedSession(scatter='allow'), outside no_scatter())"
        )
        if mode == "forbid":
            raise ScatterForbiddenError(message)
        warnings.warn(message, ScatterWarning, stacklevel=6)

    @contextmanager
    def primary_reads(self) -> Iterator[None]:
        """Inside this block every read goes to the primaries (read your own committed writes)."""
        self._primary_reads += 1
        try:
            yield
        finally:
            self._primary_reads -= 1


# -- flush ---------------------------------------------------------------------------------------


def _describe(obj: object, sharding: Sharding) -> str:
    if sharding.attribute is None:
        return type(obj).__name__
    return f"{sharding.name}({sharding.attribute}={obj.__dict__.get(sharding.attribute)!r})"


def _before_flush(session: ShardedSession, flush_context: Any, instances: Any) -> None:
    """``before_flush``: the features' preparation (fleet-wide ids first: a sequence can feed the
    shard key), then every row's shard chosen and checked, then the fence held for every sharded
    key the flush writes, all before the unit of work writes anything. One listener for the three:
    a flush of one row pays one event call, not three."""
    manager = session.manager
    if manager is None:
        return
    if session._new:
        for armed, prepare in _PREPARE_FLUSH:
            if armed:
                prepare(session, manager, instances)
    fence = _plan_flush(session, manager)
    if fence and session.pinned_shard_id is None:
        conns: dict[str, Connection] = {}
        fence_planned(session, manager, fence, session.fenced_writes(), conns)
        if conns:  # the flush's connection_callable answers with these (same transaction)
            root = session._transaction
            while root is not None and root._parent is not None:
                root = root._parent
            session._flush_conns = (root, conns)


def _plan_flush(session: ShardedSession, manager: ShardManager) -> list[tuple[str, Any]]:
    """Choose and check every row's shard; the (shard, key) of every sharded row written (to fence).

    The session's pending, modified and deleted states are read as ``session.new``, ``.dirty``
    and ``.deleted`` read them, without building the three sets (six calls a flush)."""
    debug = log.isEnabledFor(logging.DEBUG)
    planned: dict[str, str] = {}
    fence: list[tuple[str, Any]] = []
    reference_writes: list[tuple[object, str, tuple[Any, ...] | None]] = []
    # the derived shard chooser, inlined for a row that carries its key (the common case)
    by_key = session._shard_chooser_hook is None and session.pinned_shard_id is None
    placement = manager.placement
    shard: Any
    for state, obj in session._new.items():
        mapper = state.mapper
        sharding = _SHARDING.get(ref(mapper)) or sharding_of(mapper)
        attribute = sharding.attribute
        key = obj.__dict__.get(attribute) if by_key and attribute else None
        if key is not None:
            shard = placement.settled_shard(key)  # no move in flight: one lookup
            if shard is None:
                shard = shard_for_key(manager, key)
        else:
            shard = session.shard_chooser(mapper, obj, None)
        state.identity_token = shard
        if sharding.column_name is None:  # a reference table
            reference_writes.append((obj, "upsert", None))
            continue
        if shard not in planned:  # what _describe says, without the call for a row that has its key
            planned[shard] = (
                f"{sharding.name}({attribute}={key!r})" if key is not None else _describe(obj, sharding)
            )
        if key is not None:
            fence.append((shard, key))
        elif attribute is not None and (chosen := obj.__dict__.get(attribute)) is not None:
            fence.append((shard, chosen))
        if debug:
            log.debug("flush INSERT %s -> %s", _describe(obj, sharding), shard)
    deleted = session._deleted
    for state in session.identity_map._modified:
        if state in deleted or not state.modified or state.key is None:
            continue
        obj = state.obj()
        if obj is None:
            continue
        sharding = sharding_of(state.mapper)
        shard = state.key[2]
        if sharding.reference:
            reference_writes.append((obj, "upsert", state.key[1]))
            continue
        _check_key_unchanged(session, obj, state, sharding, shard)
        if shard not in planned:
            planned[shard] = _describe(obj, sharding)
        _fence_key(fence, obj, sharding, shard)
        if debug:
            log.debug("flush UPDATE %s -> %s (the shard it was loaded from)", _describe(obj, sharding), shard)
    for state, obj in deleted.items():
        sharding = sharding_of(state.mapper)
        shard = state.key[2] if state.key is not None else state.identity_token
        if sharding.reference:
            reference_writes.append((obj, "delete", state.key[1] if state.key else None))
            continue
        if shard not in planned:
            planned[shard] = _describe(obj, sharding)
        _fence_key(fence, obj, sharding, shard)
        if debug:
            log.debug("flush DELETE %s -> %s", _describe(obj, sharding), shard)
    if planned and not session.allow_cross_shard and (session._written_shards or len(planned) > 1):
        session._note_writes(planned)  # (one shard and none written before: nothing to check)
    session._planned_shards = planned
    if planned and session._affinity is None:
        session._affinity = next(iter(planned))
    session._reference_writes = reference_writes
    return fence


def _fence_key(fence: list[tuple[str, Any]], obj: object, sharding: Sharding, shard: Any) -> None:
    if sharding.attribute is not None:
        key = obj.__dict__.get(sharding.attribute)
        if key is not None:
            fence.append((shard, key))


def _check_key_unchanged(
    session: ShardedSession, obj: object, state: InstanceState[Any], sharding: Sharding, shard: str
) -> None:
    assert sharding.attribute is not None and session.manager is not None
    history = state.attrs[sharding.attribute].history
    if not history.added or session.pinned_shard_id is not None:
        return
    new_key = history.added[0]
    if new_key is not None and shard_for_key(session.manager, new_key) == shard:
        return
    old = history.deleted[0] if history.deleted else None
    raise ShardKeyChangeError(
        f"{sharding.name}.{sharding.attribute} changed from {old!r} to {new_key!r} on a row stored on "
        f"shard {shard!r}: moving a row between shards is a delete and an insert, not an UPDATE; "
        "nothing was written"
    )


def _after_flush(session: ShardedSession, flush_context: Any) -> None:
    """``after_flush`` (rows written, the session's sets not yet updated): the features' work."""
    for armed, hook in _AFTER_FLUSH:
        if armed:
            hook(session, flush_context)


def _after_flush_postexec(session: ShardedSession, flush_context: Any) -> None:
    if session.manager is None:
        return
    planned = session._planned_shards
    if planned:
        written = session._written_shards
        if not written:  # the plan's own dict, made for this flush: taken as it is
            session._written_shards = planned
        elif added := {shard: why for shard, why in planned.items() if shard not in written}:
            session._written_shards = {**written, **added}
        session._planned_shards = EMPTY_DICT
    if session._reference_writes:
        writes, session._reference_writes = session._reference_writes, ()
        for obj, action, old_pk in writes:
            _replicate_reference(session, obj, action, old_pk)


def _after_commit(session: ShardedSession) -> None:
    for armed, hook in _AFTER_COMMIT:
        if armed:
            hook(session)


def _after_transaction_end(session: ShardedSession, transaction: SessionTransaction) -> None:
    """``after_transaction_end`` of the outermost transaction (a flush's or a savepoint's end has
    nothing to forget): what it wrote and fenced, then the features' work."""
    if transaction._parent is not None:  # what .parent returns, without the call
        return
    # reset only what the transaction set (a read-only one set none of them)
    if session._written_shards:
        session._written_shards = EMPTY_DICT
    if session._affinity is not None:
        session._affinity = None
    if session._flush_conns is not None:
        session._flush_conns = None
    if session._fenced_writes:
        session._fenced_writes = frozenset()
    for armed, hook in _TRANSACTION_END:
        if armed:
            hook(session, transaction)


def add_session_hook(point: str, hook: Callable[..., None], *, armed: Sized) -> None:
    """Run ``hook`` at ``point`` of every ShardedSession while ``armed`` is non-empty (e.g. the
    list of declared sequences): a feature nobody uses costs its sessions nothing, not even a call.

    Points, and the hook's arguments: ``"prepare_flush"`` (session, manager, instances; manager-routed
    sessions with new rows, before the rows are routed), ``"after_flush"`` (session, flush_context),
    ``"after_commit"`` (session), ``"transaction_end"`` (session, transaction; the outermost one).
    The session listens to ``after_flush`` / ``after_commit`` only once such a hook can run: when
    ``armed`` is an :class:`~sa_shardkit.armed.Armed` flag, from the moment it is raised.
    """
    _SESSION_HOOKS[point].append((armed, hook))
    listener = _LAZY_LISTENERS.get(point)
    if listener is not None:
        if isinstance(armed, Armed):
            armed.when_armed(lambda: _listen_once(point, listener))
        else:
            _listen_once(point, listener)


_LAZY_LISTENERS: dict[str, Callable[..., None]] = {"after_flush": _after_flush, "after_commit": _after_commit}
"""Session events listened to only while a feature's hook is there to run (:func:`add_session_hook`)."""
_LISTENING: set[str] = set()


def _listen_once(point: str, listener: Callable[..., None]) -> None:
    if point not in _LISTENING:
        _LISTENING.add(point)
        event.listen(ShardedSession, point, listener)


def _replicate_reference(session: ShardedSession, obj: object, action: str, old_pk: Any) -> None:
    """Copy one reference row's change from the shard the flush wrote to onto every other shard."""
    assert session.manager is not None
    state = inspect(obj)
    mapper = state.mapper
    table = mapper.local_table
    assert isinstance(table, Table)
    written = state.key[2] if state.key is not None else state.identity_token
    values: dict[str, Any] = {}
    if action == "upsert":
        for column in table.c:
            prop = mapper.get_property_by_column(column)
            values[column.key] = getattr(obj, prop.key)
    for shard in reference_write_shards(session.manager):
        if shard == written:
            continue
        conn = session.connection(bind_arguments={"shard_id": shard})
        if old_pk is not None and (action == "delete" or tuple(old_pk) != _pk_of(table, values)):
            conn.execute(delete(table).where(_pk_clause(table, old_pk)))
        if action == "upsert":
            _upsert(conn, table, values)
        log.debug("flush %s reference %s -> %s (copy of %s)", action, mapper.class_.__name__, shard, written)


def _pk_of(table: Table, values: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(values[c.key] for c in table.primary_key)


def _pk_clause(table: Table, pk: Iterable[Any]) -> Any:
    return and_(*[c == v for c, v in zip(table.primary_key, pk, strict=True)])


def _upsert(conn: Connection, table: Table, values: dict[str, Any]) -> None:
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        dialect_insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = dialect_insert(table).values(values)
        pk = [c.name for c in table.primary_key]
        changes = {c.name: stmt.excluded[c.name] for c in table.c if c.name not in pk}
        if changes:
            conn.execute(stmt.on_conflict_do_update(index_elements=pk, set_=changes))
        else:
            conn.execute(stmt.on_conflict_do_nothing(index_elements=pk))
        return
    pk_values = _pk_of(table, values)
    result = conn.execute(update(table).where(_pk_clause(table, pk_values)).values(values))
    if result.rowcount == 0:
        conn.execute(table.insert().values(values))


# -- execution -----------------------------------------------------------------------------------


IDENTITY_TOKEN = "identity token"


def _explicit_shard(orm_context: ORMExecuteState, session: ShardedSession) -> tuple[str | None, str]:
    """An override the statement or session carries, in the stock order of precedence."""
    for option in orm_context._non_compile_orm_options:
        if isinstance(option, set_shard_id):
            return option.shard_id, "set_shard_id option"
    if orm_context.is_select:
        active: Any = orm_context.load_options
    elif orm_context.is_update or orm_context.is_delete:
        active = orm_context.update_delete_options
    else:
        active = None
    if active is not None and active._identity_token is not None:
        return active._identity_token, IDENTITY_TOKEN
    options = orm_context.execution_options
    if "_sa_shard_id" in options:
        return options["_sa_shard_id"], "set_shard()"
    if "shard_id" in options:
        return options["shard_id"], "execution_options(shard_id=...)"
    if "shard_id" in orm_context.bind_arguments:
        return orm_context.bind_arguments["shard_id"], "bind_arguments shard_id"
    if session.pinned_shard_id is not None:
        return session.pinned_shard_id, "session pinned to the shard"
    return None, ""


def _continue_on(orm_context: ORMExecuteState, shard_id: str) -> None:
    """Let Session.execute carry on, bound to ``shard_id``: no second pass through execute.

    ``orm_context.bind_arguments`` is the dict Session.execute binds with after the hooks.
    """
    orm_context.bind_arguments["shard_id"] = shard_id
    orm_context.update_execution_options(identity_token=shard_id)


def _invoke(orm_context: ORMExecuteState, shard_id: str) -> Result[Any]:
    bind_arguments = dict(orm_context.bind_arguments)
    bind_arguments["shard_id"] = shard_id
    orm_context.update_execution_options(identity_token=shard_id)
    return orm_context.invoke_statement(bind_arguments=bind_arguments)


def _execute_routed(orm_context: ORMExecuteState) -> Result[Any] | None:
    """``do_orm_execute``: one shard runs directly, several SELECTs scatter, DML sums rowcounts."""
    session = orm_context.session
    assert isinstance(session, ShardedSession)
    debug = log.isEnabledFor(logging.DEBUG)
    keyed_slot: list[Route] | None = orm_context.bind_arguments.pop(KEYED_READ, None)
    hint: Route | None = orm_context.bind_arguments.pop(ROUTE_HINT, None)
    shard_id, why = _explicit_shard(orm_context, session)
    if session.manager is not None and session._may_use_replicas() and may_read_from_replica(orm_context):
        orm_context.bind_arguments[REPLICA_OK] = True  # get_bind picks the replica (scatter too)
    bulk_insert = (
        session.manager is not None and orm_context.is_insert and isinstance(orm_context.parameters, list)
    )
    if shard_id is not None:
        if session._affinity is None:
            session._affinity = shard_id
        if debug:
            log.debug("%s -> %s (%s)", _statement_name(orm_context), shard_id, why)
        if bulk_insert:
            rows = range(len(orm_context.parameters))  # type: ignore[arg-type]
            return _bulk_insert(orm_context, session, {shard_id: list(rows)})
        if why == IDENTITY_TOKEN:  # e.g. get(): the load options already carry the token
            orm_context.bind_arguments["shard_id"] = shard_id
            return None
        _continue_on(orm_context, shard_id)
        return None
    if bulk_insert:
        assert session.manager is not None
        statement: Any = orm_context.statement
        groups = group_insert_rows(session.manager, statement, orm_context.parameters)
        if session.manager.placement.fences_writes():
            groups = _fenced_groups(orm_context, session, groups)
        if debug:
            log.debug("%s -> %s", _statement_name(orm_context), insert_reason(groups))
        return _bulk_insert(orm_context, session, groups)
    if session._routed_execute and not follows_placement(session.manager):
        route = hint or session.route(
            orm_context
        )  # no move in flight: only an empty keyed read is re-checked
        if _keyed_read(orm_context, route) and orm_context.lazy_loaded_from is None:
            if keyed_slot is None:
                return _read_keyed(orm_context, session, route)
            keyed_slot.append(route)  # runs on below; ShardedSession._execute_internal checks no-rows
    elif session._routed_execute:
        with watch_moving_reads(session.manager) as moving:
            route = session.route(orm_context)
        if moving and orm_context.is_select:
            return _read_moving(orm_context, session, route, moving)
        if _keyed_read(orm_context, route):
            return _read_keyed(orm_context, session, route)
    else:
        route = Route(tuple(session.execute_chooser(orm_context)), "execute_chooser")
    if route.reference and orm_context.is_select and session._affinity is not None:
        route = Route((session._affinity,), f"{route.reason}, read where this transaction works", True)
    elif not route.reference and len(route.shard_ids) == 1 and session._affinity is None:
        session._affinity = route.shard_ids[0]
    if debug:
        log.debug("%s -> %s (%s)", _statement_name(orm_context), ", ".join(route.shard_ids), route.reason)
    shards = route.shard_ids
    is_write = orm_context.is_insert or orm_context.is_update or orm_context.is_delete
    replicated = is_write and session.manager is not None and _replicated(orm_context)
    if is_write and not replicated and session._routed_execute:
        shards = fence_statement(
            session,
            orm_context.statement,
            orm_context.parameters,
            shards,
            lambda: session.route(orm_context).shard_ids,
        )
    if len(shards) == 1:
        if is_write and session.manager is not None and not replicated:
            session._note_writes({shards[0]: _statement_name(orm_context)})
        _continue_on(orm_context, shards[0])
        return None
    session._check_scatter(orm_context, route)
    orm_context.update_execution_options(**{SHARD_COUNT: len(shards)})
    if not route.reference:
        shards = _current_shards(orm_context, session, shards)
    if not is_write:
        if not route.reference and follows_placement(session.manager):
            return _scatter_moving(orm_context, session, shards)
        return execute_scatter(orm_context, shards)
    if session.manager is not None:
        unlisted = [s for s in shards if not session.manager.has_shard(s)]
        if unlisted:  # before any shard runs the write
            raise session.manager.placement.unlisted(unlisted[0])
    if orm_context.is_insert and session.manager is not None and not replicated:
        raise UnsupportedScatterError(
            f"an INSERT with .values() for {len(shards)} shards cannot be split; pass the rows as "
            "execute parameters: session.execute(insert(Model), [row, ...])"
        )
    if not replicated and session.manager is not None and session.manager.placement.state.target is not None:
        return _write_everywhere_moving(orm_context, session, shards)  # routing just read the state
    # more shards than the connection budget: those the transaction does not hold queue outside it
    results = queued_writes(orm_context, shards, _invoke) or [_invoke(orm_context, s) for s in shards]
    return _combine_writes(results, replicated=replicated)


def _current_shards(
    orm_context: ORMExecuteState, session: ShardedSession, shards: tuple[str, ...]
) -> tuple[str, ...]:
    """The shards for a statement about to run on several: routed again if this process's ring
    was too old to scatter by and re-reading it found another (:meth:`Placement.ensure_current`:
    a slow ring check must not leave it scattering by a ring read before a move started)."""
    if session.manager is None or not session._routed_execute:
        return shards
    placement = session.manager.placement
    routed_by = placement.state
    placement.ensure_current()
    return shards if placement.state is routed_by else session.route(orm_context).shard_ids


def _write_everywhere_moving(
    orm_context: ORMExecuteState, session: ShardedSession, shards: Sequence[str]
) -> Result[Any]:
    """An UPDATE / DELETE on several shards (it names no shard key) while a move may be in flight:
    the session's transaction first holds every source's fence (as a writer of every moving key:
    no cut-over commits until it ends), then the statement runs with each shard's not-yet-cut-over
    copies left out (:func:`.scatter.ownership.own_rows_only`): each row changes once, where it
    lives, and RETURNING / rowcount count it once. The mover copies again, under its fence, the
    keys whose source rows changed."""
    assert session.manager is not None
    placement = session.manager.placement
    original = orm_context.statement
    marks = placement.fence_sources(lambda s: session.connection(bind_arguments={"shard_id": s}))
    if marks is not None and marks.version < 0:
        raise StaleRingError(f"the ring changed while fencing {_statement_name(orm_context)}; retry")
    try:
        if marks is not None:
            orm_context.statement = for_move(original, marks)
        results = [_invoke(orm_context, s) for s in shards]
    finally:
        orm_context.statement = original
    return _combine_writes(results, replicated=False)


def _fenced_groups(
    orm_context: ORMExecuteState, session: ShardedSession, groups: dict[str, list[int]]
) -> dict[str, list[int]]:
    """A bulk INSERT's rows by shard, regrouped once every row's key holds the fence there."""
    assert session.manager is not None
    manager = session.manager
    fenced = groups

    def regroup() -> tuple[str, ...]:
        nonlocal fenced
        fenced = group_insert_rows(manager, orm_context.statement, orm_context.parameters)  # type: ignore[arg-type]
        return tuple(fenced)

    fence_statement(session, orm_context.statement, orm_context.parameters, tuple(groups), regroup)
    return fenced


def _read_moving(
    orm_context: ORMExecuteState, session: ShardedSession, route: Route, moving: list[Any]
) -> Result[Any]:
    """A SELECT of keys whose range is mid-move, read from their old shard: run it, then check
    that none was cut over meanwhile (its rows may have left before the query saw them); if one
    was, route again (now to the new shard) and re-run. Readers never miss a committed row."""
    for _ in range(MAX_MOVING_READS):
        if len(route.shard_ids) == 1:
            result = _invoke(orm_context, route.shard_ids[0])
        else:
            result = _scatter_moving(orm_context, session, route.shard_ids)
        rows = result.freeze()
        if moving_reads_valid(session.manager, moving):
            return rows()
        with watch_moving_reads(session.manager) as moving:
            route = session.route(orm_context)
    raise StaleRingError(f"the ring kept changing while running {_statement_name(orm_context)}; retry")


def _scatter_moving(
    orm_context: ORMExecuteState, session: ShardedSession, shards: Sequence[str]
) -> Result[Any]:
    """A SELECT on several shards while a move is in flight: each shard's rows of keys it holds
    only as a copy its source has not cut over yet are hidden (:mod:`.scatter.ownership`), by the
    sources' marks read first; if the marks read afterwards differ (a batch was cut over while the
    shards ran), it runs again; after :data:`OPTIMISTIC_SCATTERS` tries, with the sources' fences
    held while it runs. So no row is seen twice or missed, killed mover or not."""
    assert session.manager is not None
    placement = session.manager.placement
    original = orm_context.statement
    for attempt in range(MAX_MOVING_READS):
        hold = attempt >= OPTIMISTIC_SCATTERS
        marks = placement.source_marks(hold=hold)
        if marks is None:  # the move finished: route by the ring now stored
            shards = session.route(orm_context).shard_ids
            if len(shards) == 1:
                return _invoke(orm_context, shards[0])
            return execute_scatter(orm_context, shards)
        if marks.version < 0:  # the state changed: route again
            shards = session.route(orm_context).shard_ids
            continue
        try:
            orm_context.statement = for_move(original, marks)  # text naming a sharded table: refused
            rows = execute_scatter(orm_context, shards).freeze()
        finally:
            orm_context.statement = original
            placement.release_marks(marks)
        if hold or placement.source_marks() == marks:
            return rows()
    raise StaleRingError(f"the ring kept changing while running {_statement_name(orm_context)}; retry")


def _keyed_read(orm_context: ORMExecuteState, route: Route) -> bool:
    """A buffered SELECT routed by its shard keys to one shard (streamed results are left alone)."""
    if not orm_context.is_select or route.reference or len(route.shard_ids) != 1:
        return False
    options = orm_context.execution_options
    return not options.get("yield_per") and not options.get("stream_results")


def _read_keyed(orm_context: ORMExecuteState, session: ShardedSession, route: Route) -> Result[Any]:
    """A keyed SELECT: an empty answer may mean the rows moved under a ring version this process
    has not seen (it only reads, say, or its ring is not stored yet). Then the
    version stored on that shard is checked (one small query); if it changed, the new one is
    adopted and the SELECT routed and run again. Found rows cost nothing extra."""
    for _ in range(MAX_MOVING_READS):
        shard_id = route.shard_ids[0]
        if session._affinity is None:
            session._affinity = shard_id
        rows = _invoke(orm_context, shard_id).freeze()
        if rows.data or not ring_moved_on(session.manager, route.shard_ids):
            return rows()
        with watch_moving_reads(session.manager) as moving:
            route = session.route(orm_context)
        if moving or not _keyed_read(orm_context, route):
            return _read_moving(orm_context, session, route, moving)
    raise StaleRingError(f"the ring kept changing while running {_statement_name(orm_context)}; retry")


def _rows_found(result: Any) -> tuple[Any, bool]:
    """``result`` (as good as new) and whether it holds rows: the driver's row count when it
    reports one for a SELECT (psycopg), else the rows are buffered to look."""
    raw = result if isinstance(result, CursorResult) else getattr(result, "raw", None)
    if isinstance(raw, CursorResult) and raw.dialect.driver in _ROW_COUNTING_DRIVERS:
        # the DBAPI cursor's own count (what raw.rowcount reads, through two memoized properties);
        # a cursor closed already (no rows, or all fetched) asks SQLAlchemy
        cursor = raw.cursor
        count = raw.rowcount if cursor is None else cursor.rowcount
        if count >= 0:
            return result, count > 0
    frozen = result.freeze()
    return frozen(), bool(frozen.data)


def _replicated(orm_context: ORMExecuteState) -> bool:
    """Does the statement write a reference table (same rows on every shard)?"""
    table = getattr(orm_context.statement, "table", None)
    if table is None:
        return False
    declared = table_sharding(table)
    return declared is not None and declared.reference


def _bulk_insert(
    orm_context: ORMExecuteState, session: ShardedSession, groups: dict[str, list[int]]
) -> Result[Any]:
    """An executemany INSERT: each shard gets its rows, as a Core INSERT on the session's connection.

    (The stock ORM bulk insert refuses sharded sessions; the rows here are plain dicts anyway.)
    """
    statement: Any = orm_context.statement
    if statement._returning:
        raise UnsupportedScatterError(
            "INSERT ... RETURNING with a list of rows is not supported by the sharded session; "
            "add the objects with session.add_all() instead"
        )
    rows: list[dict[str, Any]] = list(orm_context.parameters)  # type: ignore[arg-type]
    mapper = orm_context.bind_mapper if orm_context.is_orm_statement else None
    if mapper is not None:
        table: Any = mapper.local_table
        rows = [_column_keys(mapper, row) for row in rows]
        core: Any = insert(table)
    else:
        core = statement
    replicated = _replicated(orm_context)
    if not replicated:
        session._note_writes({shard: _statement_name(orm_context) for shard in groups})
    results = []
    for shard, indexes in groups.items():
        conn = session.connection(bind_arguments={**orm_context.bind_arguments, "shard_id": shard})
        results.append(conn.execute(core, [rows[i] for i in indexes]))
    return _combine_writes(results, replicated=replicated)  # type: ignore[arg-type]


def _column_keys(mapper: Mapper[Any], row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        prop = mapper.attrs.get(key)
        columns = getattr(prop, "columns", None)
        out[columns[0].key if columns else key] = value
    return out


def _combine_writes(results: list[Result[Any]], *, replicated: bool) -> Result[Any]:
    """One result for a write run on several shards: rows merged, rowcount summed.

    A reference table holds the same rows everywhere, so its rowcount is one shard's.
    """
    first = results[0]
    if not isinstance(first, CursorResult) or first.returns_rows:
        return first.merge(*results[1:])
    if not replicated:
        total = sum(r.rowcount for r in results if isinstance(r, CursorResult))
        # CursorResult.rowcount is a memoized property: storing the sum is how it reports it
        first.__dict__["rowcount"] = total
    return first


def _select_reason(session: ShardedSession, statement: Select[Any], params: Any) -> str:
    """Why a directly run SELECT went where it went (for the debug log only)."""
    assert session.manager is not None
    return route_statement(session.manager, statement, params).reason


def _statement_name(orm_context: ORMExecuteState) -> str:
    statement = orm_context.statement
    kind = type(statement).__name__.upper()
    mappers = orm_context.all_mappers if orm_context.is_orm_statement else ()
    names = ",".join(m.class_.__name__ for m in mappers)
    if not names:
        table = getattr(statement, "table", None)
        names = getattr(table, "name", "") if table is not None else ""
    return f"{kind} {names}".strip()


def listen_execute(
    hook: Callable[..., Any], *, active: Callable[[ShardedSession], bool] | None = None, **kw: Any
) -> None:
    """Register one of this library's ``do_orm_execute`` hooks on ShardedSession.

    A keyed SELECT and a routed ``get()`` skip the ``do_orm_execute`` hooks when only this
    library's listen (see :data:`ROUTED`): a hook registered here must have nothing to do for
    those, or pass ``active``, which says whether it has work for a session (e.g. the spans of an
    instrumented manager, :mod:`sa_shardkit.otel`); while it does, that session runs every hook.
    """
    event.listen(ShardedSession, "do_orm_execute", hook, **kw)
    OWN_EXECUTE_HOOKS.append(hook)
    _OWN_HOOK_COUNT[0] = len(OWN_EXECUTE_HOOKS)
    if active is not None:
        _ACTIVE_HOOKS.append(active)


def _after_begin(session: ShardedSession, transaction: SessionTransaction, connection: Connection) -> None:
    """``after_begin``: each connection the session's transaction takes sends its BEGIN with its
    first statement (one round trip fewer per transaction, :func:`begin_with_next_statement`)."""
    begin_with_next_statement(connection)


listen_execute(_execute_routed, retval=True)
event.listen(ShardedSession, "before_flush", _before_flush)
event.listen(ShardedSession, "after_flush_postexec", _after_flush_postexec)
event.listen(ShardedSession, "after_transaction_end", _after_transaction_end)
event.listen(ShardedSession, "after_begin", _after_begin)
