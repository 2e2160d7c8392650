"""The durable store: sessions, training runs, sampling sessions, checkpoints and request results.

SQLAlchemy over SQLite in the data directory by default (any SQLAlchemy URL works). Everything a
user can list, and every finished result, survives a restart.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Integer,
    LargeBinary,
    String,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    tenant: Mapped[str] = mapped_column(String, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    tags: Mapped[list[str]] = mapped_column(default=list)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    display_name: Mapped[str | None] = mapped_column(String, nullable=True)
    project_id: Mapped[str | None] = mapped_column(String, nullable=True)
    status: Mapped[str] = mapped_column(String, default="active")  # active | success | errored | interrupted | expired
    finish_detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class TrainingRunRow(Base):
    __tablename__ = "training_runs"
    id: Mapped[str] = mapped_column(String, primary_key=True)  # the model_id, "{session}:train:{n}"
    tenant: Mapped[str] = mapped_column(String, index=True)
    session_id: Mapped[str] = mapped_column(String, index=True)
    base_model: Mapped[str] = mapped_column(String)
    lora_rank: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    train_mlp: Mapped[bool] = mapped_column(Boolean, default=True)
    train_attn: Mapped[bool] = mapped_column(Boolean, default=True)
    train_unembed: Mapped[bool] = mapped_column(Boolean, default=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_request_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    corrupted: Mapped[bool] = mapped_column(Boolean, default=False)


class SamplingSessionRow(Base):
    __tablename__ = "sampling_sessions"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    tenant: Mapped[str] = mapped_column(String, index=True)
    session_id: Mapped[str] = mapped_column(String, index=True)
    base_model: Mapped[str] = mapped_column(String)
    model_path: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    tinker_path: Mapped[str] = mapped_column(String, primary_key=True)
    tenant: Mapped[str] = mapped_column(String, index=True)
    training_run_id: Mapped[str] = mapped_column(String, index=True)
    checkpoint_type: Mapped[str] = mapped_column(String)  # training | sampler
    name: Mapped[str] = mapped_column(String)
    directory: Mapped[str] = mapped_column(String)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RequestRow(Base):
    """One asynchronous request and, once finished, its result (so it outlives a restart)."""

    __tablename__ = "requests"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    tenant: Mapped[str] = mapped_column(String, index=True)
    request_type: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String, default="pending")  # pending | done | failed | lost
    result_kind: Mapped[str | None] = mapped_column(String, nullable=True)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    category: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class MetricRow(Base):
    """The metrics one training request returned, for the run's history (loss curves and the like)."""

    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    training_run_id: Mapped[str] = mapped_column(String, index=True)
    seq_id: Mapped[int] = mapped_column(Integer)
    request_type: Mapped[str] = mapped_column(String)
    metrics: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


def _as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; they were written in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@event.listens_for(Base, "load", propagate=True)
def _utc_on_load(target: Any, _context: Any) -> None:
    for column in target.__table__.columns:
        if isinstance(column.type, DateTime):
            setattr(target, column.key, _as_utc(getattr(target, column.key)))


class Store:
    def __init__(self, url: str):
        is_sqlite = url.startswith("sqlite")
        self.engine = create_engine(url, connect_args={"check_same_thread": False} if is_sqlite else {})
        if is_sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(connection: Any, _record: Any) -> None:
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
                cursor.execute("PRAGMA busy_timeout=5000")
                cursor.close()

        self.migrate()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        requests, metrics = RequestRow.__table__, MetricRow.__table__
        # A pending row yields to a finished one, and a finished row replaces a pending one, whichever
        # reaches the store first (futures.py writes them from different threads).
        pending = ["id", "tenant", "request_type", "status", "created_at"]
        outcome = ["status", "result_kind", "result", "error", "category", "finished_at"]
        self._insert_request = _Prepared(self.engine, _insert(self.engine, requests).on_conflict_do_nothing(
            index_elements=["id"]), pending)
        finish = _insert(self.engine, requests)
        self._finish_request = _Prepared(self.engine, finish.on_conflict_do_update(
            index_elements=["id"], set_={name: finish.excluded[name] for name in outcome}),
            ["id", "tenant", "request_type", "created_at", *outcome])
        self._insert_metric = _Prepared(self.engine, insert(metrics),
                                        ["training_run_id", "seq_id", "request_type", "metrics", "created_at"])

    def migrate(self) -> None:
        """Bring the schema up to date with the Alembic migrations shipped in tinkex.server.migrations."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            tables = inspect(connection).get_table_names()
            if "sessions" in tables and "alembic_version" not in tables:
                command.stamp(config, "0001")  # a store made before migrations existed has the first schema
            command.upgrade(config, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    def add(self, row: Base) -> None:
        with self.session() as session:
            session.add(row)

    @contextmanager
    def _raw(self) -> Iterator[Any]:
        """A DB-API cursor in one transaction, committed at the end (the hot path's writes)."""
        connection = self.engine.raw_connection()
        try:
            cursor = connection.cursor()
            yield cursor
            cursor.close()
            connection.commit()
        finally:
            connection.close()  # back to the pool, rolled back if the commit was not reached

    def get(self, model: type, key: str) -> Any:
        with self.session() as session:
            return session.get(model, key)

    def owned(self, model: type, key: str, tenant: str) -> Any:
        """The row if it exists and belongs to the tenant, else None (callers answer 404 either way)."""
        row = self.get(model, key)
        return row if row is not None and row.tenant == tenant else None

    def list(self, model: type, tenant: str, *, order_by: Any, limit: int | None = None, offset: int = 0,
             **filters: Any) -> tuple[list[Any], int]:
        with self.session() as session:
            query = select(model).where(model.tenant == tenant).filter_by(**filters)
            total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
            query = query.order_by(order_by).offset(offset)
            if limit is not None:
                query = query.limit(limit)
            return list(session.scalars(query)), total

    def update(self, model: type, key: str, **values: Any) -> None:
        with self.session() as session:
            row = session.get(model, key)
            if row is not None:
                for name, value in values.items():
                    setattr(row, name, value)

    def delete(self, model: type, key: str) -> None:
        with self.session() as session:
            row = session.get(model, key)
            if row is not None:
                session.delete(row)

    def count(self, model: type, **filters: Any) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(model).filter_by(**filters)) or 0

    def insert_requests(self, new: list[dict[str, Any]]) -> None:
        """Record new pending requests (before their ids are handed out), in one transaction. Each
        entry: id, tenant, request_type, status ("pending"), created_at."""
        with self._raw() as cursor:
            cursor.executemany(self._insert_request.sql, [self._insert_request.params(**entry) for entry in new])

    def finish_requests(self, finished: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> None:
        """Record the end of many requests, and the metrics they produced, in one transaction.

        Each entry of `finished`: id, tenant, request_type, created_at, status ("done" | "failed"),
        result_kind, result, error, category.
        """
        now = utcnow()
        with self._raw() as cursor:
            if finished:
                cursor.executemany(self._finish_request.sql,
                                   [self._finish_request.params(**entry, finished_at=now) for entry in finished])
            if metrics:
                cursor.executemany(self._insert_metric.sql,
                                   [self._insert_metric.params(**entry, created_at=now) for entry in metrics])

    def mark_unfinished_lost(self) -> int:
        """After a restart, work that was in flight is gone: its futures answer 410 so SDKs resubmit."""
        with self.session() as session:
            rows = list(session.scalars(select(RequestRow).where(RequestRow.status == "pending")))
            for row in rows:
                row.status = "lost"
            return len(rows)


def _insert(engine: Any, table: Any) -> Any:
    """An INSERT with the ON CONFLICT clauses of the store's database (SQLite or PostgreSQL)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(table)


class _Prepared:
    """An INSERT compiled once for the store's database and run on a raw DB-API cursor.

    Every asynchronous request writes its row when it arrives and again when it finishes; through
    the ORM (or even Core's execute) most of that was SQLAlchemy's per-call work -- statement cache
    lookup, parameter construction, result handling -- the largest share of the server's CPU per
    request. Values pass through the columns' own bind processors, so rows read back through the
    ORM exactly as if it had written them."""

    def __init__(self, engine: Any, statement: Any, columns: list[str]):
        """`columns` are the values written."""
        table, dialect = statement.table, engine.dialect
        compiled = statement.values({name: bindparam(name) for name in columns}).compile(dialect=dialect)
        self.sql = str(compiled)
        self._order = compiled.positiontup if compiled.positional else None
        self._process = {name: table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns}

    def params(self, **values: Any) -> Any:
        bound = {name: process(values[name]) if process is not None else values[name]
                 for name, process in self._process.items()}
        return bound if self._order is None else tuple(bound[name] for name in self._order)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
