"""OpenTelemetry spans and metrics carry the shard id (SDK in-memory exporter, real PostgreSQL shards)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from sa_shardkit import QueryMetrics, ShardManager
from sa_shardkit.demo.models import Base, Customer, Order
from sa_shardkit.prometheus import prometheus_text
from sa_shardkit.saga import CREDIT_TRANSFER, create_saga_tables, transfer

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from sa_shardkit.otel import SCATTER, SHARD_ID, SHARD_IDS, ShardTelemetry, instrument  # noqa: E402


class Telemetry:
    def __init__(self, manager: ShardManager) -> None:
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.provider = provider
        self.reader = InMemoryMetricReader()
        self.telemetry: ShardTelemetry = instrument(
            manager, tracer_provider=provider, meter_provider=MeterProvider(metric_readers=[self.reader])
        )

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        return [
            s for s in self.finished() if s.parent is not None and s.parent.span_id == parent.context.span_id
        ]

    def named(self, pattern: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if re.fullmatch(pattern, s.name)]


@pytest.fixture
def otel(manager: ShardManager) -> Iterator[Telemetry]:
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    create_saga_tables(manager)
    Session = manager.sessionmaker()
    for c in range(1, 41):
        with Session.begin() as session:
            session.add(Customer(customer_id=c, name=f"c{c}", balance=Decimal(100)))
            session.add(Order(customer_id=c, total=Decimal(c)))
    t = Telemetry(manager)
    yield t
    t.telemetry.uninstrument()


def test_a_keyed_read_is_one_span_on_its_shard_with_the_statement_below_it(
    otel: Telemetry, manager: ShardManager
) -> None:
    with manager.sessionmaker()() as session:
        session.get(Customer, 7)
    (outer,) = otel.named(r"ShardedSession SELECT Customer")
    assert outer.attributes is not None and outer.attributes[SHARD_ID] == manager.shard_for(7)
    assert outer.attributes[SCATTER] is False
    (statement,) = otel.children(outer)
    assert statement.name == f"SELECT {manager.shard_for(7)}"
    attributes = statement.attributes or {}
    assert attributes[SHARD_ID] == manager.shard_for(7) and attributes["db.shard.role"] == "primary"
    assert attributes["db.system.name"] == "postgresql" and "customers" in str(attributes["db.query.text"])
    assert attributes["server.address"] == "127.0.0.1" and isinstance(attributes["server.port"], int)


def test_a_scatter_has_one_child_span_per_shard(otel: Telemetry, manager: ShardManager) -> None:
    with manager.sessionmaker()() as session:
        session.scalars(select(Order).order_by(Order.total.desc()).limit(3)).all()
    (outer,) = otel.named(r"ShardedSession SELECT Order")
    attributes = outer.attributes or {}
    assert attributes[SCATTER] is True and list(attributes[SHARD_IDS]) == sorted(manager.shard_ids)  # type: ignore[arg-type]
    children = otel.children(outer)
    assert sorted(str((c.attributes or {})[SHARD_ID]) for c in children) == sorted(manager.shard_ids)
    assert all(
        c.context.trace_id == outer.context.trace_id for c in children
    )  # scatter threads joined the trace


def test_query_all_shards_statements_join_the_callers_trace(otel: Telemetry, manager: ShardManager) -> None:
    tracer = otel.provider.get_tracer("test")
    with tracer.start_as_current_span("report") as parent:
        manager.query_all_shards(select(func.count()).select_from(Customer)).all()
        manager.run_on_all("SELECT 1")
    children = [
        s
        for s in otel.finished()
        if s.parent is not None and s.parent.span_id == parent.get_span_context().span_id
    ]
    shards = sorted(str((c.attributes or {})[SHARD_ID]) for c in children)
    assert shards == sorted([*manager.shard_ids, *manager.shard_ids])  # one statement per shard, twice


def test_saga_steps_are_spans_on_their_shards(otel: Telemetry, manager: ShardManager) -> None:
    sender = 1
    receiver = next(c for c in range(2, 41) if manager.shard_for(c) != manager.shard_for(sender))
    outcome = transfer(manager, sender, receiver, "5.00", saga=otel.telemetry.traced(CREDIT_TRANSFER))
    assert outcome.status == "complete"
    (debit,) = otel.named(r"saga credit_transfer debit")
    (credit,) = otel.named(r"saga credit_transfer credit")
    assert (debit.attributes or {})[SHARD_ID] == manager.shard_for(sender)
    assert (credit.attributes or {})[SHARD_ID] == manager.shard_for(receiver)
    assert (credit.attributes or {})["sa_shardkit.saga.phase"] == "action"
    below = otel.children(credit)  # the credit's UPDATE ran inside its span, on the receiver's shard
    assert below and all((s.attributes or {})[SHARD_ID] == manager.shard_for(receiver) for s in below)


def test_a_refused_saga_step_says_why_and_its_compensation_is_traced(
    otel: Telemetry, manager: ShardManager
) -> None:
    sender = 1
    ghost = next(c for c in range(1000, 5000) if manager.shard_for(c) != manager.shard_for(sender))
    outcome = transfer(manager, sender, ghost, "5.00", saga=otel.telemetry.traced(CREDIT_TRANSFER))
    assert outcome.status == "failed_unknown_receiver"
    (credit,) = otel.named(r"saga credit_transfer credit")
    assert (credit.attributes or {})["sa_shardkit.saga.refused"] == "unknown_receiver"
    (refund,) = otel.named(r"saga credit_transfer debit \(compensation\)")
    assert (refund.attributes or {})[SHARD_ID] == manager.shard_for(sender)


def test_duration_metric_per_shard_counts_every_statement(otel: Telemetry, manager: ShardManager) -> None:
    with manager.sessionmaker()() as session:
        session.scalar(select(func.count()).select_from(Customer))  # one statement per shard
        session.get(Customer, 3)
    data = otel.reader.get_metrics_data()
    points = [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "db.client.operation.duration"
        for p in m.data.data_points
    ]
    per_shard = {}
    for p in points:
        shard = p.attributes[SHARD_ID]
        per_shard[shard] = per_shard.get(shard, 0) + p.count
    statements = otel.named(r"SELECT shard-\d")
    expected = {}
    for s in statements:
        shard = (s.attributes or {})[SHARD_ID]
        expected[shard] = expected.get(shard, 0) + 1
    assert per_shard == expected and set(per_shard) == set(manager.shard_ids)
    assert expected[manager.shard_for(3)] == 2


def test_prometheus_text_from_query_metrics(manager: ShardManager) -> None:
    for shard_id in manager.shard_ids:
        Base.metadata.create_all(manager.engine(shard_id))
    metrics = QueryMetrics()
    manager.events.add(metrics)
    with manager.sessionmaker()() as session:
        session.scalar(select(func.count()).select_from(Customer))
    text_ = prometheus_text(metrics)
    for shard_id in manager.shard_ids:
        count = metrics.snapshot()[(shard_id, "primary")].count
        assert f'shardkit_queries_total{{shard="{shard_id}",role="primary"}} {count}' in text_
    assert "# TYPE shardkit_query_seconds_total counter" in text_
    assert all(
        re.fullmatch(r'(# .*|shardkit_\w+\{shard="[^"]+",role="\w+"\} [0-9.e+-]+)', line)
        for line in text_.splitlines()
    )


def test_importing_otel_keeps_the_direct_path_for_managers_not_instrumented(
    manager: ShardManager, caplog: pytest.LogCaptureFixture
) -> None:
    """sa_shardkit.otel's session hook is the library's own (issue 13): a keyed SELECT of a
    manager that is not instrumented skips the do_orm_execute machinery, as without the import."""
    Base.metadata.create_all(manager.engine(manager.shard_for(7)))
    with manager.sessionmaker().begin() as session:
        session.add(Customer(customer_id=7, name="c7"))
    with caplog.at_level("DEBUG", logger="sa_shardkit.session"), manager.sessionmaker()() as session:
        assert session.scalars(select(Customer).where(Customer.customer_id == 7)).one().name == "c7"
    assert any("no execute hooks" in r.getMessage() for r in caplog.records), caplog.text


def test_an_instrumented_managers_keyed_select_is_still_a_span(
    otel: Telemetry, manager: ShardManager
) -> None:
    with manager.sessionmaker()() as session:
        session.scalars(select(Customer).where(Customer.customer_id == 7)).one()
    (outer,) = otel.named(r"ShardedSession SELECT Customer")
    assert outer.attributes is not None and outer.attributes[SHARD_ID] == manager.shard_for(7)
    (statement,) = otel.children(outer)
    assert statement.name == f"SELECT {manager.shard_for(7)}"
