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
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    update,
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

    def insert(self, model: type, **values: Any) -> None:
        """One new row as a plain INSERT, without the ORM's unit of work (for the per-request hot path)."""
        with self.session() as session:
            session.execute(insert(model).values(**values))

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

    def finish_requests(self, finished: list[dict[str, Any]], metrics: list[MetricRow]) -> None:
        """Record the end of many requests, and the metrics they produced, in one transaction.

        Each entry of `finished`: id, status ("done" | "failed"), result_kind, result, error, category.
        """
        now = utcnow()
        with self.session() as session:
            if finished:
                session.execute(update(RequestRow), [{**entry, "finished_at": now} for entry in finished])
            session.add_all(metrics)

    def mark_unfinished_lost(self) -> int:
        """After a restart, work that was in flight is gone: its futures answer 410 so SDKs resubmit."""
        with self.session() as session:
            rows = list(session.scalars(select(RequestRow).where(RequestRow.status == "pending")))
            for row in rows:
                row.status = "lost"
            return len(rows)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
