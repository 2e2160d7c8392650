"""Direct preference optimisation (DPO) through `forward_backward_custom`.

For a prompt with a chosen and a rejected reply, let lp(y) be the policy's summed log-probability
of reply y and ref(y) that of a frozen reference (the weights the run started from). DPO minimises

    -log sigmoid( beta * [ (lp(chosen) - ref(chosen)) - (lp(rejected) - ref(rejected)) ] )

The reference log-probabilities come from `compute_logprobs` of a sampler saved before the first
step (its path is kept in log_dir/reference.json, so a resumed run keeps the same reference).
The loss is computed here, in torch, on the per-token logprobs the server returns; the SDK turns
its gradient into per-token weights for a second, linear pass on the server.

Preference file: one JSON object per line,
    {"prompt": [messages...], "chosen": "reply" | [assistant messages], "rejected": ...}
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from .checkpoints import save_checkpoint, start_run
from .data import Example, load_jsonl
from .metrics_log import MetricsLogger
from .renderers import Message, Renderer, TrainOnWhat, get_renderer, recommended_renderer
from .schedules import lr_multiplier
from .sdk import BUILTIN_MODEL, make_datum, resolved, to_numpy



@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


def _replies(value: Any) -> list[Message]:
    if isinstance(value, str):
        return [Message(role="assistant", content=value)]
    if isinstance(value, dict):
        return [value]
    return list(value)


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    pairs = []
    for n, row in enumerate(load_jsonl(path), 1):
        try:
            pairs.append(PreferencePair(list(row["prompt"]), _replies(row["chosen"]), _replies(row["rejected"])))
        except (KeyError, TypeError):
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": [...], \"chosen\": ..., \"rejected\": ...}}") from None
    return pairs


def render_pair(renderer: Renderer, pair: PreferencePair, max_length: int | None = None) -> tuple[Example, Example]:
    """The chosen and rejected conversations, with weight 1 on the final reply only."""
    out = []
    for reply in (pair.chosen, pair.rejected):
        tokens, weights = renderer.build_supervised_example(pair.prompt + reply, TrainOnWhat.LAST_ASSISTANT_MESSAGE)
        if max_length is not None:
            tokens, weights = tokens[:max_length], weights[:max_length]
        out.append(Example(tokens, weights))
    return out[0], out[1]


@dataclass
class DPOConfig:
    log_dir: str
    model_name: str = BUILTIN_MODEL
    renderer_name: str | None = None
    lora_rank: int = 32
    seed: int = 0
    beta: float = 0.1
    batch_size: int = 16  # pairs per step
    learning_rate: float = 1e-3
    lr_schedule: str = "linear"
    num_epochs: int = 1
    max_steps: int | None = None
    max_length: int = 512
    eval_every: int = 10
    save_every: int = 20
    resume: bool = True
    load_checkpoint_path: str | None = None
    table_every: int = 5
    show_progress: bool = True
    quiet: bool = False


@dataclass
class DPOResult:
    training_client: Any
    renderer: Renderer
    start_step: int
    final_step: int
    state_path: str | None
    history: list[dict[str, Any]] = field(default_factory=list)


class ReferenceLogprobs:
    """Summed reference log-probability of each example's weighted tokens, computed once and cached."""

    def __init__(self, sampler: Any, types: Any):
        self.sampler, self.types, self.cache = sampler, types, {}

    def get(self, examples: Sequence[Example]) -> list[float]:
        missing = [e for e in examples if id(e) not in self.cache]
        futures = [(e, self.sampler.compute_logprobs(self.types.ModelInput.from_ints(e.tokens))) for e in missing]
        for e, future in futures:
            logprobs = future.result()  # one per token; the first (no context) is None
            self.cache[id(e)] = float(sum(lp * w for lp, w in zip(logprobs[1:], e.weights[1:]) if w))
        return [self.cache[id(e)] for e in examples]


def pair_margins(training_client: Any, pairs: Sequence[tuple[Example, Example]], reference: ReferenceLogprobs,
                 types: Any) -> np.ndarray:
    """Implicit-reward margins [(lp_c - ref_c) - (lp_r - ref_r)] under the current weights (forward only)."""
    examples = [e for pair in pairs for e in pair]
    out = training_client.forward([make_datum(types, e.tokens, weights=e.weights) for e in examples],
                                  "cross_entropy").result()
    policy = np.array([float((to_numpy(o["logprobs"]).reshape(-1) * np.asarray(e.weights[1:])).sum())
                       for o, e in zip(out.loss_fn_outputs, examples)])
    ref = np.array(reference.get(examples))
    delta = policy - ref
    return delta[0::2] - delta[1::2]


def train(config: DPOConfig, train_pairs: Sequence[PreferencePair], test_pairs: Sequence[PreferencePair] = (), *,
          service_client: Any = None, console: Console | None = None) -> DPOResult:
    import torch  # the loss runs here, on the client (as forward_backward_custom requires)
    import torch.nn.functional as F

    service_client, types, log_dir, training_client, start_step = start_run(config, service_client)
    renderer = get_renderer(config.renderer_name or recommended_renderer(config.model_name),
                            training_client.get_tokenizer())

    # The frozen reference: the weights this run started from, saved once and reused on resume.
    reference_file = log_dir / "reference.json"
    if reference_file.exists():
        reference_path = json.loads(reference_file.read_text())["sampler_path"]
    else:
        reference_path = resolved(training_client.save_weights_for_sampler("reference")).path
        reference_file.write_text(json.dumps({"sampler_path": reference_path}))
    reference = ReferenceLogprobs(resolved(service_client.create_sampling_client(model_path=reference_path)), types)

    train_rendered = [render_pair(renderer, p, config.max_length) for p in train_pairs]
    test_rendered = [render_pair(renderer, p, config.max_length) for p in test_pairs]
    batch_size = min(config.batch_size, len(train_rendered))
    batches_per_epoch = len(train_rendered) // batch_size
    total_steps = config.num_epochs * batches_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    def batch_of(step: int) -> list[tuple[Example, Example]]:
        epoch, within = divmod(step, batches_per_epoch)
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train_rendered))
        return [train_rendered[i] for i in order[within * batch_size:(within + 1) * batch_size]]

    history: list[dict[str, Any]] = []
    with MetricsLogger(log_dir, total_steps, title="dpo", headline="dpo_loss", start_step=start_step,
                       table_every=config.table_every, console=console, show_progress=config.show_progress,
                       quiet=config.quiet,
                       table_keys=["dpo_loss", "accuracy", "margin", "test/margin", "test/accuracy", "lr"]) as log:
        for step in range(start_step, total_steps):
            started = time.time()
            metrics: dict[str, Any] = {}
            if test_rendered and config.eval_every > 0 and step % config.eval_every == 0:
                metrics.update(_eval_metrics(training_client, test_rendered, reference, types))

            batch = batch_of(step)
            examples = [e for pair in batch for e in pair]  # chosen, rejected, chosen, rejected, ...
            ref = torch.tensor(reference.get(examples))
            weights = [torch.tensor(e.weights[1:], dtype=torch.float32) for e in examples]
            stats: dict[str, float] = {}

            def dpo_loss(data: list[Any], logprobs: list[Any]) -> tuple[Any, dict[str, float]]:
                sums = torch.stack([(lp.reshape(-1) * w).sum() for lp, w in zip(logprobs, weights)])
                delta = sums - ref  # log pi/ref of each reply
                margin = delta[0::2] - delta[1::2]
                loss = -F.logsigmoid(config.beta * margin).mean()
                stats.update({"dpo_loss": loss.item(), "accuracy": (margin > 0).float().mean().item(),
                              "margin": margin.mean().item(),
                              "chosen_reward": config.beta * delta[0::2].mean().item(),
                              "rejected_reward": config.beta * delta[1::2].mean().item()})
                return loss, dict(stats)

            lr = config.learning_rate * lr_multiplier(config.lr_schedule, step, total_steps)
            data = [make_datum(types, e.tokens, weights=e.weights) for e in examples]
            fb_future = training_client.forward_backward_custom(data, dpo_loss)
            optim_future = training_client.optim_step(types.AdamParams(learning_rate=lr))
            fb_future.result()
            optim_future.result()

            num_tokens = sum(len(e.tokens) - 1 for e in examples)
            elapsed = time.time() - started
            metrics.update({**stats, "lr": lr, "num_tokens": num_tokens, "tokens_per_s": num_tokens / max(elapsed, 1e-9),
                            "step_time": elapsed})
            log.log(step, metrics)
            history.append({"step": step, **metrics})
            if config.save_every > 0 and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                save_checkpoint(training_client, log_dir, step + 1, kind="state")

        final: dict[str, Any] = {"final": True}
        if test_rendered:
            final.update(_eval_metrics(training_client, test_rendered, reference, types))
        final.update(_eval_metrics(training_client, train_rendered, reference, types, prefix="train"))
        record = save_checkpoint(training_client, log_dir, total_steps, name="final", kind="both")
        log.log(total_steps, final)
        history.append({"step": total_steps, **final})
    return DPOResult(training_client, renderer, start_step, total_steps, record.get("state_path"), history)


def _eval_metrics(training_client: Any, pairs: Sequence[tuple[Example, Example]], reference: ReferenceLogprobs,
                  types: Any, prefix: str = "test") -> dict[str, float]:
    margins = pair_margins(training_client, pairs, reference, types)
    return {f"{prefix}/margin": float(margins.mean()), f"{prefix}/accuracy": float((margins > 0).mean())}
