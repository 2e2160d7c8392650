"""The supervised fine-tuning loop.

    conversations --render--> (tokens, weights) --batch--> forward_backward(cross_entropy)
                                                            optim_step(AdamParams(lr * schedule))
    every eval_every steps: held-out NLL (forward only)
    every save_every steps: save_state, recorded in checkpoints.jsonl
    on start: resume weights + optimizer from the last checkpoint of log_dir, if any

Steps are pipelined: step N+1's requests go out before step N's results are awaited (`submit_ahead`),
so the server has the next batch queued while it trains on this one and never waits for a round trip.
Requests of one training client run in the order they were sent, so what each step computes is the
same as without pipelining; checkpoints are saved with nothing in flight.

Read it top to bottom; everything it does is in `train`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from .checkpoints import save_checkpoint, start_run
from .data import SupervisedDataset, render_examples
from .evaluation import held_out_nll
from .metrics_log import MetricsLogger
from .renderers import Message, get_renderer, recommended_renderer
from .schedules import lr_multiplier
from .sdk import BUILTIN_MODEL, make_datum



@dataclass
class SLConfig:
    log_dir: str
    model_name: str = BUILTIN_MODEL
    renderer_name: str | None = None  # default: recommended_renderer(model_name)
    lora_rank: int = 32
    seed: int = 0
    batch_size: int = 16
    learning_rate: float = 1e-3
    lr_schedule: str = "linear"  # constant | linear | cosine
    warmup_steps: int = 0
    num_epochs: int = 1
    max_steps: int | None = None  # stop earlier than num_epochs
    max_length: int = 512
    train_on_what: str = "all_assistant_messages"
    eval_every: int = 10  # held-out NLL every N steps (and at the end); 0: only at the end
    save_every: int = 20  # save_state every N steps (and at the end); 0: only at the end
    resume: bool = True  # continue from the last checkpoint in log_dir
    load_checkpoint_path: str | None = None  # start from these weights (fresh optimizer) when not resuming
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0
    table_every: int = 10
    show_progress: bool = True
    quiet: bool = False
    submit_ahead: int = 1  # steps sent before the oldest in flight is awaited (0: one step at a time)


@dataclass
class SLResult:
    training_client: Any
    renderer: Any
    start_step: int
    final_step: int
    state_path: str | None
    sampler_path: str | None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    test_nll: float | None = None


def train(config: SLConfig, train_conversations: Sequence[Sequence[Message]],
          test_conversations: Sequence[Sequence[Message]] = (), *, service_client: Any = None,
          console: Console | None = None) -> SLResult:
    # The model: a fresh LoRA adapter, or the last checkpoint of this run (weights + optimizer).
    service_client, types, log_dir, training_client, start_step = start_run(config, service_client)
    renderer = get_renderer(config.renderer_name or recommended_renderer(config.model_name),
                            training_client.get_tokenizer())

    # The data: rendered once; batch i is a pure function of (seed, i), so resuming is exact.
    train_set = SupervisedDataset(
        render_examples(renderer, train_conversations, config.train_on_what, config.max_length),
        config.batch_size, seed=config.seed)
    test_examples = render_examples(renderer, test_conversations, config.train_on_what, config.max_length)
    total_steps = config.num_epochs * train_set.batches_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    def due(every: int, step: int) -> bool:
        return every > 0 and step % every == 0

    last: dict[str, Any] = {}
    test_nll = None
    in_flight: deque[tuple[int, Any, Any, list, float, dict[str, Any]]] = deque()
    with MetricsLogger(log_dir, total_steps, title="sl", headline="train/nll", start_step=start_step,
                       table_every=config.table_every, console=console, show_progress=config.show_progress,
                       quiet=config.quiet,
                       table_keys=["train/nll", "test/nll", "lr", "tokens_per_s", "epoch"]) as log:
        if start_step:
            log.print(f"resumed from step {start_step} ({log_dir / 'checkpoints.jsonl'})")
        finished = time.time()

        def finish_oldest() -> None:
            """Wait for the oldest step in flight and log it."""
            nonlocal last, finished
            step, fb_future, optim_future, batch, lr, metrics = in_flight.popleft()
            fb = fb_future.result()
            optim_future.result()
            loss_tokens = sum(e.num_loss_tokens for e in batch)
            num_tokens = sum(len(e.tokens) - 1 for e in batch)
            elapsed, finished = time.time() - finished, time.time()  # since the step before it finished
            metrics.update({
                "train/nll": float(fb.metrics["loss:sum"]) / max(loss_tokens, 1e-9),
                "lr": lr,
                "num_tokens": num_tokens,
                "num_loss_tokens": loss_tokens,
                "tokens_per_s": num_tokens / max(elapsed, 1e-9),
                "step_time": elapsed,
                "epoch": step // train_set.batches_per_epoch,
            })
            log.log(step, metrics)
            last = metrics

        for step in range(start_step, total_steps):
            metrics: dict[str, Any] = {}
            if test_examples and due(config.eval_every, step):  # runs after the steps already sent
                test_nll = metrics["test/nll"] = held_out_nll(training_client, test_examples, types)

            batch = train_set.get_batch(step)
            data = [make_datum(types, e.tokens, weights=e.weights) for e in batch]
            lr = config.learning_rate * lr_multiplier(config.lr_schedule, step, total_steps, config.warmup_steps)
            adam = types.AdamParams(learning_rate=lr, beta1=config.adam_beta1, beta2=config.adam_beta2,
                                    eps=config.adam_eps, weight_decay=config.weight_decay,
                                    grad_clip_norm=config.grad_clip_norm)
            in_flight.append((step, training_client.forward_backward(data, "cross_entropy"),
                              training_client.optim_step(adam), batch, lr, metrics))
            while len(in_flight) > config.submit_ahead:
                finish_oldest()
            if due(config.save_every, step + 1) and step + 1 < total_steps:
                while in_flight:
                    finish_oldest()
                save_checkpoint(training_client, log_dir, step + 1, kind="state",
                                epoch=(step + 1) // train_set.batches_per_epoch)
        while in_flight:
            finish_oldest()

        # The end: final held-out NLL and a checkpoint with both training state and sampler weights.
        final: dict[str, Any] = {}
        if test_examples:
            test_nll = final["test/nll"] = held_out_nll(training_client, test_examples, types)
        record = save_checkpoint(training_client, log_dir, total_steps, name="final", kind="both")
        final["final"] = True
        log.log(total_steps, final)
    return SLResult(training_client, renderer, start_step, total_steps, record.get("state_path"),
                    record.get("sampler_path"), last, test_nll)
