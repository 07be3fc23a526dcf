"""OpenTelemetry for a sharded fleet: spans and metrics that say which shard did the work.

Optional (``pip install 'sa_shardkit[otel]'``: the OpenTelemetry API; your application brings the
SDK and exporter)::

    from sa_shardkit.otel import instrument

    telemetry = instrument(manager)              # global tracer/meter providers, or pass your own
    saga = telemetry.traced(CREDIT_TRANSFER)     # saga steps as spans: transfer(..., saga=saga)

What is recorded:

* **every statement** on every shard and replica: a CLIENT span ``"<OPERATION> <shard id>"`` with
  ``db.shard.id``, ``db.shard.role`` (``primary`` / ``replica``), ``db.system.name``,
  ``db.namespace``, ``db.operation.name``, ``db.query.text`` (SQLAlchemy's text, parameters bound
  separately), ``server.address`` / ``server.port``, and ``error.type`` on failure; built from the
  manager's query events (:mod:`sa_shardkit.events`), so shards added later, replicas and async
  engines are covered;
* **every ShardedSession statement** (``session.execute``, ``get``, lazy loads): an INTERNAL span
  ``"ShardedSession <OPERATION> <Entity>"`` around it, with ``db.shard.ids`` (the shards that ran
  it), ``db.shard.id`` when there was one, and ``sa_shardkit.scatter``; a scatter's per-shard
  statements are its children, one per shard (the scatter threads run in the caller's context);
* **saga steps** of a :meth:`ShardTelemetry.traced` saga: a span per action or compensation with
  ``db.shard.id`` of the step's shard, ``sa_shardkit.saga.name`` / ``.step`` / ``.phase``;
* the metric ``db.client.operation.duration`` (histogram, seconds) with ``db.shard.id``,
  ``db.shard.role``, ``db.operation.name``, ``db.system.name`` and ``error.type``.

OpenTelemetry's semantic conventions have no attribute for a shard; ``db.shard.id`` (and
``db.shard.role``, ``db.shard.ids``) are sa_shardkit's own, in the ``db.`` namespace.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ORMExecuteState

from .errors import SagaStepFailed
from .events import QueryEvent
from .manager import ShardManager
from .saga import Payload, Saga, Step
from .session import ShardedSession, listen_execute

SHARD_ID = "db.shard.id"
SHARD_ROLE = "db.shard.role"
SHARD_IDS = "db.shard.ids"
SCATTER = "sa_shardkit.scatter"
DURATION = "db.client.operation.duration"
MAX_QUERY_TEXT = 2000

_shards_seen: ContextVar[list[str] | None] = ContextVar("shardkit_otel_shards", default=None)
_instrumented: weakref.WeakKeyDictionary[ShardManager, ShardTelemetry] = weakref.WeakKeyDictionary()


class ShardTelemetry:
    """The spans and metrics of one manager's fleet (see the module docstring); ``uninstrument()`` stops them."""

    def __init__(
        self,
        manager: ShardManager,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        query_text: bool = True,
    ) -> None:
        self.manager = manager
        self.tracer = trace.get_tracer("sa_shardkit", tracer_provider=tracer_provider)
        meter = metrics.get_meter("sa_shardkit", meter_provider=meter_provider)
        self.duration = meter.create_histogram(
            DURATION, unit="s", description="Duration of statements, per shard and role"
        )
        self.query_text = query_text
        self._servers: dict[str, dict[str, Any]] = {}

    # statements, from the manager's query events --------------------------------------------

    def __call__(self, query: QueryEvent, /) -> None:
        end = time.time_ns()
        operation = _operation(query.statement)
        attributes: dict[str, Any] = {
            SHARD_ID: query.shard_id,
            SHARD_ROLE: query.role,
            "db.operation.name": operation,
            **self._server(query.shard_id),
        }
        if query.error is not None:
            attributes["error.type"] = type(query.error).__qualname__
        self.duration.record(
            query.duration,
            {
                k: v
                for k, v in attributes.items()
                if k not in ("server.address", "server.port", "db.namespace")
            },
        )
        seen = _shards_seen.get()
        if seen is not None:
            seen.append(query.shard_id)
        if self.query_text:
            attributes["db.query.text"] = query.statement[:MAX_QUERY_TEXT]
        span = self.tracer.start_span(
            f"{operation} {query.shard_id}",
            kind=SpanKind.CLIENT,
            start_time=end - int(query.duration * 1e9),
            attributes=attributes,
        )
        if query.error is not None:
            span.set_status(Status(StatusCode.ERROR, str(query.error)[:200]))
        span.end(end_time=end)

    def _server(self, shard_id: str) -> dict[str, Any]:
        found = self._servers.get(shard_id)
        if found is None:
            url = self.manager.config(shard_id).primary_url
            found = {"db.system.name": url.get_backend_name()}
            if url.database:
                found["db.namespace"] = url.database
            if url.host:
                found["server.address"] = url.host
            if url.port:
                found["server.port"] = url.port
            self._servers[shard_id] = found
        return found

    # ShardedSession statements ---------------------------------------------------------------

    @contextmanager
    def session_span(self, orm_context: ORMExecuteState) -> Iterator[None]:
        operation = _orm_operation(orm_context)
        mapper = orm_context.bind_mapper
        name = f"ShardedSession {operation}" + (f" {mapper.class_.__name__}" if mapper is not None else "")
        seen: list[str] = []
        token = _shards_seen.set(seen)
        try:
            with self.tracer.start_as_current_span(name, kind=SpanKind.INTERNAL) as span:
                span.set_attribute("db.operation.name", operation)
                try:
                    yield
                finally:
                    shards = sorted(set(seen))
                    span.set_attribute(SHARD_IDS, shards)
                    span.set_attribute(SCATTER, len(shards) > 1)
                    if len(shards) == 1:
                        span.set_attribute(SHARD_ID, shards[0])
        finally:
            _shards_seen.reset(token)

    # saga steps -----------------------------------------------------------------------------

    def traced(self, saga: Saga) -> Saga:
        """The same saga (same name, so recovery finds its runs) with each step's functions in a span.

        A traced step always runs its ``action`` (never its single-statement ``fused`` form, which the
        runner executes itself), so the step's statements are inside its span: one round trip more.
        """
        steps = [
            replace(
                step,
                action=self._step_function(saga, step, "action"),
                compensation=self._step_function(saga, step, "compensation") if step.compensation else None,
                fused=None,  # a fused statement would bypass the traced action
            )
            for step in saga.steps
        ]
        return replace(saga, steps=steps)

    def _step_function(self, saga: Saga, step: Step, phase: str) -> Any:
        function = step.action if phase == "action" else step.compensation
        assert function is not None

        def run(conn: Connection, payload: Payload) -> None:
            attributes = {
                SHARD_ID: self._shard_of(conn, step, payload),
                "sa_shardkit.saga.name": saga.name,
                "sa_shardkit.saga.step": step.name,
                "sa_shardkit.saga.phase": phase,
            }
            with self.tracer.start_as_current_span(
                f"saga {saga.name} {step.name}" + (" (compensation)" if phase == "compensation" else ""),
                attributes=attributes,
                record_exception=True,
            ) as span:
                try:
                    function(conn, payload)
                except SagaStepFailed as refused:
                    span.set_attribute("sa_shardkit.saga.refused", refused.reason)
                    raise

        return run

    def _shard_of(self, conn: Connection, step: Step, payload: Payload) -> str:
        for shard_id, engine in self.manager.created_engines().items():
            if engine is conn.engine:
                return shard_id
        shard: str = self.manager.shard_for(step.key(payload))
        return shard

    def uninstrument(self) -> None:
        self.manager.events.remove(self)
        _instrumented.pop(self.manager, None)


def instrument(
    manager: ShardManager,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    query_text: bool = True,
) -> ShardTelemetry:
    """Record spans and metrics for ``manager``'s shards (once per manager; see the module docstring)."""
    existing = _instrumented.get(manager)
    if existing is not None:
        return existing
    telemetry = ShardTelemetry(
        manager, tracer_provider=tracer_provider, meter_provider=meter_provider, query_text=query_text
    )
    manager.events.add(telemetry)
    _instrumented[manager] = telemetry
    return telemetry


def _around_session_statements(orm_context: ORMExecuteState) -> Any:
    """``do_orm_execute``, first in line: a span around the rest (routing, scatter, loading)."""
    manager = getattr(orm_context.session, "manager", None)
    telemetry = _instrumented.get(manager) if manager is not None else None
    if telemetry is None:
        return None
    with telemetry.session_span(orm_context):
        return orm_context.invoke_statement()


def _instrumented_session(session: ShardedSession) -> bool:
    return session.manager is not None and session.manager in _instrumented


# one of the library's own hooks: sessions of managers not instrumented keep the direct paths
listen_execute(_around_session_statements, active=_instrumented_session, retval=True, insert=True)


def _operation(statement: str) -> str:
    words = statement.lstrip("( \n\t").split(None, 1)
    return words[0].upper() if words else "?"


def _orm_operation(orm_context: ORMExecuteState) -> str:
    if orm_context.is_select:
        return "SELECT"
    if orm_context.is_insert:
        return "INSERT"
    if orm_context.is_update:
        return "UPDATE"
    if orm_context.is_delete:
        return "DELETE"
    return _operation(str(orm_context.statement))


__all__ = ["DURATION", "SCATTER", "SHARD_ID", "SHARD_IDS", "SHARD_ROLE", "ShardTelemetry", "instrument"]
