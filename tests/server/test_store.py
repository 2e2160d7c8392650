"""The store: Alembic migrations describe exactly the models, on SQLite and on PostgreSQL."""

from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tinkex.server.store import Base, SessionRow, Store, TrainingRunRow, utcnow

from ..conftest import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return fresh_database(request.getfixturevalue("postgres_url"), f"store_{tmp_path.name.lower()}")


def test_migrations_match_the_models(database_url):
    store = Store(database_url)
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_rows_survive_a_new_store_on_the_same_database(database_url):
    store = Store(database_url)
    store.add(SessionRow(id="s1", tenant="alice", tags=["x"], user_metadata={"k": "v"}))
    store.add(TrainingRunRow(id="s1:train:0", tenant="alice", session_id="s1", base_model="m", lora_rank=8,
                             seed=2**62))
    again = Store(database_url)  # migrating twice is a no-op
    run = again.owned(TrainingRunRow, "s1:train:0", "alice")
    assert run.seed == 2**62 and run.created_at.tzinfo is not None
    assert again.owned(TrainingRunRow, "s1:train:0", "bob") is None
    rows, total = again.list(SessionRow, "alice", order_by=SessionRow.created_at)
    assert total == 1 and rows[0].user_metadata == {"k": "v"}


def test_a_store_made_before_migrations_is_adopted(tmp_path):
    from sqlalchemy import create_engine, inspect

    url = f"sqlite:///{tmp_path / 'old.db'}"
    Base.metadata.create_all(create_engine(url))  # what builds before Alembic did
    store = Store(url)
    store.add(SessionRow(id="s", tenant="t", tags=[]))
    assert "alembic_version" in inspect(store.engine).get_table_names()


def test_results_are_durable_before_anyone_sees_them(database_url):
    """The recorder writes finished requests in batches off the engine thread, and publishes each
    outcome only after its batch is committed; close() records what is still queued."""
    from tinkex.server.futures import FutureTable, Outcome
    from tinkex.server.store import MetricRow, RequestRow
    from tinkex.types import ForwardBackwardOutput

    store = Store(database_url)
    table = FutureTable(store)
    seen_while_writing = []
    write = store.finish_requests

    def spying_write(finished, metrics):  # the real write, noting what was already visible
        seen_while_writing.extend(table._futures[entry["id"]].outcome for entry in finished)
        write(finished, metrics)

    store.finish_requests = spying_write
    futures = [table.create("alice", "ForwardBackward", model_id="run", seq_id=i) for i in range(50)]
    for i, future in enumerate(futures):
        outcome = (Outcome(error="bad datum", category="user") if i == 7 else
                   Outcome(result=ForwardBackwardOutput(loss_fn_output_type="logprobs", loss_fn_outputs=[],
                                                        metrics={"loss:sum": float(i)})))
        table.resolve(future, outcome)
    table.close()
    assert len(seen_while_writing) == 50 and all(outcome is None for outcome in seen_while_writing)
    assert all(future.outcome is not None for future in futures)
    with store.session() as session:
        rows = {row.id: row for row in session.query(RequestRow)}
        history = sorted(row.seq_id for row in session.query(MetricRow))
    assert [rows[f.request_id].status for f in futures].count("done") == 49
    # Written on raw DB-API cursors (the hot path), read back through the ORM as its own rows.
    now = utcnow()
    assert all(now - timedelta(minutes=1) < row.created_at <= row.finished_at <= now for row in rows.values())
    with store.session() as session:
        assert session.query(MetricRow).filter_by(seq_id=3).one().metrics == {"loss:sum": 3.0}
    assert rows[futures[7].request_id].status == "failed" and rows[futures[7].request_id].error == "bad datum"
    assert history == [i for i in range(50) if i != 7]
    again = FutureTable(Store(database_url))  # what a restarted server reads back
    assert again.lookup(futures[3].request_id, "alice").outcome.result.metrics == {"loss:sum": 3.0}
    again.close()


def test_new_requests_are_written_together_before_their_ids_go_out(database_url):
    """Requests created in one pass of the event loop are written in one transaction after it, and
    `stored` returns once a request's row is in (or raises the store's error); off the loop a row is
    written before create() returns."""
    import asyncio

    from tinkex.server.futures import FutureTable
    from tinkex.server.store import RequestRow

    store = Store(database_url)
    table = FutureTable(store)
    batches, fail = [], False
    write = store.insert_requests

    def spying_write(new):
        batches.append([entry["id"] for entry in new])
        if fail:
            raise RuntimeError("disk full")
        write(new)

    store.insert_requests = spying_write

    def statuses() -> dict[str, str]:
        with store.session() as session:
            return {row.id: row.status for row in session.query(RequestRow)}

    async def create_and_wait(n: int) -> list[str]:
        futures = [table.create("alice", "Sample") for _ in range(n)]  # in one pass: nothing written yet
        assert batches == [] and not any(f.request_id in statuses() for f in futures)
        await asyncio.gather(*(table.stored(f.request_id) for f in futures))
        return [f.request_id for f in futures]

    ids = asyncio.run(create_and_wait(32))
    assert [sorted(batch) for batch in batches] == [sorted(ids)]
    assert statuses() == {i: "pending" for i in ids}
    outside = table.create("alice", "Sample")  # off the loop
    assert statuses()[outside.request_id] == "pending" and len(batches) == 2
    fail, batches = True, []
    with pytest.raises(RuntimeError, match="disk full"):
        asyncio.run(create_and_wait(1))
    table.close()


def test_a_finished_row_and_its_pending_row_land_in_either_order(database_url):
    """The recorder thread may write a request's outcome before the event loop writes its pending row:
    the finished row stays finished."""
    from tinkex.server.store import RequestRow

    store = Store(database_url)
    now = utcnow()
    pending = {"tenant": "alice", "request_type": "Sample", "status": "pending", "created_at": now}
    done = {**pending, "status": "done", "result_kind": "json", "result": b"{}", "error": None, "category": None}
    store.insert_requests([{"id": "first-pending", **pending}])
    store.finish_requests([{"id": "first-pending", **done}, {"id": "first-finished", **done}], [])
    store.insert_requests([{"id": "first-finished", **pending}])
    with store.session() as session:
        rows = {row.id: row for row in session.query(RequestRow)}
    assert {key: row.status for key, row in rows.items()} == {"first-pending": "done", "first-finished": "done"}
    assert all(row.tenant == "alice" and row.finished_at is not None for row in rows.values())
