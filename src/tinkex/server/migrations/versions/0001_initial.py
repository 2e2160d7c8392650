"""The first schema: sessions, training runs, sampling sessions, checkpoints, requests, metrics.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("tenant", sa.String, nullable=False, index=True),
        _when("created_at"), _when("last_heartbeat"),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("user_metadata", sa.JSON), sa.Column("display_name", sa.String), sa.Column("project_id", sa.String),
        sa.Column("status", sa.String, nullable=False), sa.Column("finish_detail", sa.Text),
    )
    op.create_table(
        "training_runs",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("tenant", sa.String, nullable=False, index=True),
        sa.Column("session_id", sa.String, nullable=False, index=True),
        sa.Column("base_model", sa.String, nullable=False),
        sa.Column("lora_rank", sa.Integer, nullable=False), sa.Column("seed", sa.BigInteger),
        sa.Column("train_mlp", sa.Boolean, nullable=False), sa.Column("train_attn", sa.Boolean, nullable=False),
        sa.Column("train_unembed", sa.Boolean, nullable=False), sa.Column("user_metadata", sa.JSON),
        _when("created_at"), _when("last_request_time"), sa.Column("corrupted", sa.Boolean, nullable=False),
    )
    op.create_table(
        "sampling_sessions",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("tenant", sa.String, nullable=False, index=True),
        sa.Column("session_id", sa.String, nullable=False, index=True),
        sa.Column("base_model", sa.String, nullable=False), sa.Column("model_path", sa.String),
        _when("created_at"),
    )
    op.create_table(
        "checkpoints",
        sa.Column("tinker_path", sa.String, primary_key=True),
        sa.Column("tenant", sa.String, nullable=False, index=True),
        sa.Column("training_run_id", sa.String, nullable=False, index=True),
        sa.Column("checkpoint_type", sa.String, nullable=False), sa.Column("name", sa.String, nullable=False),
        sa.Column("directory", sa.String, nullable=False), sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("public", sa.Boolean, nullable=False), sa.Column("user_metadata", sa.JSON),
        _when("created_at"), _when("expires_at", nullable=True),
    )
    op.create_table(
        "requests",
        sa.Column("id", sa.String, primary_key=True),
        sa.Column("tenant", sa.String, nullable=False, index=True),
        sa.Column("request_type", sa.String, nullable=False), sa.Column("status", sa.String, nullable=False),
        sa.Column("result_kind", sa.String), sa.Column("result", sa.LargeBinary), sa.Column("error", sa.Text),
        sa.Column("category", sa.String), _when("created_at"), _when("finished_at", nullable=True),
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("training_run_id", sa.String, nullable=False, index=True),
        sa.Column("seq_id", sa.Integer, nullable=False), sa.Column("request_type", sa.String, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False), _when("created_at"),
    )


def downgrade() -> None:
    for table in ("metrics", "requests", "checkpoints", "sampling_sessions", "training_runs", "sessions"):
        op.drop_table(table)
