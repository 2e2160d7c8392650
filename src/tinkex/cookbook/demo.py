"""`tinkex demo`: fine-tune the built-in model to do single-digit addition, and show what changed.

1. Start the embedded server (or use --base-url), in a throw-away data directory.
2. Ask the untouched base model 20 held-out questions ("What is 3+4?"); it knows nothing.
3. LoRA fine-tune on the other 80 problems with the cookbook's supervised loop.
4. Ask the same 20 held-out questions again -- these exact prompts were never trained on --
   and print the base model's answers next to the fine-tuned model's, and both scores.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from . import supervised
from .arithmetic import Problem, all_problems, grade, split_problems
from .cli_utils import default_log_dir
from .evaluation import Graded, accuracy, graded_replies
from .renderers import get_renderer, recommended_renderer
from .sdk import BUILTIN_MODEL, resolved, types_for

MODEL = BUILTIN_MODEL
DEFAULT_STEPS = 1000
HELD_OUT = 20


@dataclass
class DemoResult:
    before_held_out: float
    after_held_out: float
    before_train: float
    after_train: float
    base_replies: list[Graded]
    tuned_replies: list[Graded]
    wall_time: float
    log_dir: str
    steps: int


def _ask(sampler: Any, renderer: Any, problems: list[Problem], types: Any) -> list[Graded]:
    return graded_replies(sampler, renderer, [(p.prompt(), p.answer) for p in problems], types, grade=grade,
                          max_tokens=4)


def run_demo(*, steps: int = DEFAULT_STEPS, base_url: str | None = None, api_key: str | None = None,
             log_dir: str | None = None, learning_rate: float = 1e-2, batch_size: int = 32, seed: int = 0,
             console: Console | None = None, show_progress: bool = True) -> DemoResult:
    console = console or Console(highlight=False)
    started = time.time()
    train_problems, held_out = split_problems(all_problems(9, ("+",)), HELD_OUT, seed=seed)
    log_dir = log_dir or default_log_dir("demo")
    console.print(Panel.fit(
        f"[bold]tinkex demo[/bold]: teach [cyan]{MODEL}[/cyan] (a tiny, randomly initialised Qwen3) to add.\n"
        f"Task: answer \"What is a+b?\" for digits a, b. {len(train_problems)} problems to train on; "
        f"{len(held_out)} [bold]held out[/bold] (never trained on) to score it.\n"
        f"LoRA fine-tune, {steps} steps of {batch_size}, on the cookbook's supervised loop. Logs: {log_dir}"))

    server = None
    with tempfile.TemporaryDirectory(prefix="tinkex-demo-") as data_dir:
        try:
            if base_url is None:
                with console.status("starting the embedded tinkex server..."):
                    from tinkex.server import EmbeddedServer

                    server = EmbeddedServer(data_dir=Path(data_dir)).start()
                base_url, api_key = server.base_url, server.api_key
                console.print(f"embedded server on {base_url}")
            import tinkex

            service_client = tinkex.ServiceClient(base_url=base_url, api_key=api_key)
            types = types_for(service_client)

            # Before: the base model (no adapter).
            with console.status("asking the base model..."):
                base = resolved(service_client.create_sampling_client(base_model=MODEL))
                renderer = get_renderer(recommended_renderer(MODEL), base.get_tokenizer())
                base_held_out = _ask(base, renderer, held_out, types)
                base_train = _ask(base, renderer, train_problems, types)
            console.print(f"base model: {accuracy(base_held_out):.0%} of held-out questions right "
                          f"(e.g. {base_held_out[0].prompt!r} -> {base_held_out[0].reply!r})")

            # Fine-tune: the plain supervised loop, on conversations "What is a+b?" -> "<sum>".
            config = supervised.SLConfig(
                log_dir=log_dir, model_name=MODEL, lora_rank=32, seed=seed, batch_size=batch_size,
                learning_rate=learning_rate, lr_schedule="linear", num_epochs=10_000, max_steps=steps,
                eval_every=max(steps // 4, 1), save_every=0, resume=False, table_every=max(steps // 8, 1),
                show_progress=show_progress)
            result = supervised.train(config, [p.conversation() for p in train_problems],
                                      [p.conversation() for p in held_out], service_client=service_client,
                                      console=console)

            # After: the fine-tuned weights.
            with console.status("asking the fine-tuned model..."):
                tuned = resolved(result.training_client.create_sampling_client(result.sampler_path))
                tuned_held_out = _ask(tuned, renderer, held_out, types)
                tuned_train = _ask(tuned, renderer, train_problems, types)
        finally:
            if server is not None:
                server.stop()

    outcome = DemoResult(accuracy(base_held_out), accuracy(tuned_held_out), accuracy(base_train),
                         accuracy(tuned_train), base_held_out, tuned_held_out, time.time() - started, log_dir, steps)
    _report(console, outcome)
    return outcome


def _mark(graded: Graded) -> str:
    reply = graded.reply if len(graded.reply) <= 16 else graded.reply[:15] + "…"
    return f"[green]{reply!r} ✓[/green]" if graded.correct else f"[red]{reply!r} ✗[/red]"


def _report(console: Console, r: DemoResult) -> None:
    table = Table(title="Held-out questions (never seen in training)", title_justify="left")
    table.add_column("question")
    table.add_column("answer", justify="right")
    table.add_column("base model")
    table.add_column("fine-tuned")
    for before, after in zip(r.base_replies, r.tuned_replies):
        table.add_row(before.prompt, before.expected, _mark(before), _mark(after))
    console.print(table)
    n = len(r.tuned_replies)
    console.print(Panel.fit(
        f"held-out score:  [bold]{round(r.before_held_out * n)}/{n}[/bold] ({r.before_held_out:.0%}) -> "
        f"[bold green]{round(r.after_held_out * n)}/{n}[/bold green] ({r.after_held_out:.0%})\n"
        f"training problems: {r.before_train:.0%} -> {r.after_train:.0%}\n"
        f"{r.steps} steps, {r.wall_time:.0f} s wall time. Metrics: {r.log_dir}/metrics.jsonl",
        title="what changed"))


@click.command("demo")
@click.option("--steps", default=DEFAULT_STEPS, show_default=True, help="Fine-tuning steps (batches of 32).")
@click.option("--base-url", default=None, help="Use this running server instead of starting the embedded one.")
@click.option("--api-key", default=None, help="API key for --base-url (default: $TINKER_API_KEY).")
@click.option("--log-dir", default=None, help="Where metrics.jsonl goes [default: ~/tinkex-runs/demo-<time>].")
@click.option("--seed", default=0, show_default=True, help="Seed of the held-out split and of training.")
@click.pass_context
def demo_command(ctx: click.Context, steps: int, base_url: str | None, api_key: str | None, log_dir: str | None,
                 seed: int) -> None:
    """Fine-tune the built-in model to add single digits; show answers and scores before and after.

    Starts the embedded server unless a server is given with --base-url (here or on `tinkex`)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the built-in model needs no network
    root = ctx.find_root().params if ctx.parent is not None else {}
    base_url = base_url or root.get("base_url")
    api_key = api_key or root.get("api_key")
    if base_url is not None and api_key is None:
        api_key = os.environ.get("TINKER_API_KEY")
    run_demo(steps=steps, base_url=base_url, api_key=api_key, log_dir=log_dir, seed=seed)
