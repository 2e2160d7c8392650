"""Metrics of a run: one JSON line per step in `metrics.jsonl`, a table on the console, and a
progress bar with the step count, the headline metric (loss or reward) and the throughput.

    with MetricsLogger(log_dir, total_steps=100, headline="train/nll") as log:
        for step in range(100):
            ...
            log.log(step, {"train/nll": nll, "tokens_per_s": tps, "lr": lr})
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

THROUGHPUT_KEY = "tokens_per_s"


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (numpy and torch scalars become float/int)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def read_metrics(log_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of a run's metrics.jsonl (empty if there is none)."""
    path = Path(log_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Writes `log_dir/metrics.jsonl` (appending, so a resumed run continues the file) and shows
    progress. `table_every` controls how often a table row is printed (the last step always is);
    `table_keys` picks the columns (default: the keys of the first logged row, up to eight)."""

    def __init__(self, log_dir: str | Path, total_steps: int, *, title: str = "train", headline: str = "loss",
                 start_step: int = 0, table_every: int = 10, table_keys: list[str] | None = None,
                 console: Console | None = None, show_progress: bool = True, quiet: bool = False):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.headline = headline
        self.table_every = max(1, table_every)
        self.table_keys = table_keys
        self.console = console or Console(highlight=False)
        self.quiet = quiet
        self._header_printed = False
        self._file = self.path.open("a")
        self._progress: Progress | None = None
        self._task = None
        if show_progress and not quiet:
            self._progress = Progress(
                TextColumn(f"[bold]{title}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                TextColumn("steps"), TextColumn("{task.fields[head]}"), TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console, transient=False,
            )
            self._task = self._progress.add_task(title, total=total_steps, completed=start_step,
                                                 head=f"{headline} -", speed="- tok/s")

    # ---- context manager ----------------------------------------------------------------------

    def __enter__(self) -> MetricsLogger:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self._file.closed:
            self._file.close()

    # ---- logging ------------------------------------------------------------------------------

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """Print above the progress bar."""
        if not self.quiet:
            self.console.print(*objects, **kwargs)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._progress is not None:
            fields: dict[str, str] = {}
            if isinstance(row.get(self.headline), (int, float)):
                fields["head"] = f"{self.headline} {_fmt(row[self.headline])}"
            if isinstance(row.get(THROUGHPUT_KEY), (int, float)):
                fields["speed"] = f"{row[THROUGHPUT_KEY]:,.0f} tok/s"
            self._progress.update(self._task, completed=min(step + 1, self.total_steps), **fields)
        if not self.quiet and (step % self.table_every == 0 or step + 1 >= self.total_steps):
            self._print_row(row)

    @staticmethod
    def _short(key: str) -> str:
        """Column header: at most 11 characters ("eval/train_accuracy" -> "eval/train_")."""
        return key if len(key) <= 11 else key[:11]

    def _print_row(self, row: dict[str, Any]) -> None:
        if self.table_keys is None:
            self.table_keys = [k for k in row if k not in ("step", "time")][:8]
        names = [self._short(k) for k in self.table_keys]
        widths = [max(len(n), 9) for n in names]
        if not self._header_printed:
            header = f"{'step':>6}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths))
            self.console.print(f"[bold]{header}[/bold]", soft_wrap=True)
            self.console.print("-" * len(header), soft_wrap=True)
            self._header_printed = True
        cells = [f"{_fmt(row.get(k, '')):>{w}}" if k in row else " " * w for k, w in zip(self.table_keys, widths)]
        self.console.print(f"{row['step']:>6}  " + "  ".join(cells), markup=False, soft_wrap=True)
