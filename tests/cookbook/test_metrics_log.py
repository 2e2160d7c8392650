"""Metrics: JSONL rows per step, a console table, a progress bar with steps, loss and throughput."""

from __future__ import annotations

import io
import json

import numpy as np
from rich.console import Console

from tinkex.cookbook.metrics_log import MetricsLogger, read_metrics


def test_jsonl_table_and_progress(tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    with MetricsLogger(tmp_path, total_steps=4, headline="train/nll", table_every=2, console=console,
                       table_keys=["train/nll", "tokens_per_s"]) as log:
        for step in range(4):
            log.log(step, {"train/nll": np.float32(2.0 - step * 0.5), "tokens_per_s": 1234.5, "bad": float("nan")})
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["train/nll"] == 2.0 and rows[3]["train/nll"] == 0.5 and rows[0]["bad"] is None
    assert all("time" in r for r in rows)
    text = out.getvalue()
    assert text.count("train/nll") >= 2  # table header once, plus the progress bar's headline
    lines = [line for line in text.splitlines() if line.strip().startswith(("0 ", "2 ", "3 "))]
    assert len(lines) == 3  # rows of steps 0, 2 and the last one
    assert "4/4" in text and "steps" in text and "1,234 tok/s" in text and "train/nll 0.5000" in text


def test_appends_when_resumed(tmp_path):
    with MetricsLogger(tmp_path, 2, quiet=True) as log:
        log.log(0, {"loss": 1.0})
    with MetricsLogger(tmp_path, 2, start_step=1, quiet=True) as log:
        log.log(1, {"loss": 0.5})
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
