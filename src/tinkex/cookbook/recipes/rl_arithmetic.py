"""rl_arithmetic: the model learns small-number addition by reinforcement learning.

    python -m tinkex.cookbook.recipes.rl_arithmetic
    python -m tinkex.cookbook.recipes.rl_arithmetic --loss-fn ppo --off-policy-overlap
    python -m tinkex.cookbook.recipes.rl_arithmetic --warmup-answers random --max-operand 4 --test-size 0

Task: "What is a+b?" for digits a, b; 80 problems to train on, 20 held out.

The usual pipeline, small: a supervised head start, then RL. The built-in model starts from
random weights; from reward alone it cannot find single-digit addition in a short run (it finds
the most common answer instead), so `--warmup-steps` supervised steps first get it to partial
competence. RL then samples `--group-size` replies to each of `--groups-per-batch` problems,
rewards the right ones (1 for the right number, -0.1 for a malformed reply), centres rewards
within each group and trains with importance sampling (or PPO), sampling every step from the
weights it just saved (or, with --off-policy-overlap, one step behind while the step trains).

`--warmup-answers random` makes the warm-up teach only the reply format (random numbers as
answers), so that everything RL gains comes from the reward.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from rich.console import Console

from .. import rl, supervised
from ..arithmetic import ArithmeticDataset, Problem, all_problems, grade, split_problems
from ..checkpoints import get_last_checkpoint
from ..cli_utils import add_connection_args, add_run_args, default_log_dir, service_client_from_args
from ..evaluation import accuracy, graded_replies
from ..renderers import get_renderer, recommended_renderer
from ..sdk import resolved, types_for


def warmup_conversations(problems: list[Problem], answers: str, seed: int) -> list[list[dict]]:
    """`random`: each problem with an answer drawn uniformly from the range of answers (the reply
    format, not the math). `correct`: the true answers (a supervised head start)."""
    if answers == "correct":
        return [p.conversation() for p in problems]
    rng = random.Random(seed)
    top = max(int(p.answer) for p in problems)
    return [p.conversation(reply=str(rng.randint(0, top))) for p in problems]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinkex.cookbook.recipes.rl_arithmetic",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", default=rl.BUILTIN_MODEL)
    p.add_argument("--renderer", default=None)
    p.add_argument("--task", choices=["+", "-", "*", "max"], default="+")
    p.add_argument("--max-operand", type=int, default=9)
    p.add_argument("--test-size", type=int, default=20, help="problems held out of training (scored greedily)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--groups-per-batch", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup", type=int, default=5, help="RL steps of linear lr warm-up")
    p.add_argument("--loss-fn", choices=["importance_sampling", "ppo"], default="importance_sampling")
    p.add_argument("--off-policy-overlap", action="store_true",
                   help="sample the next batch while this one trains (one step off-policy)")
    p.add_argument("--partial-credit", type=float, default=0.0,
                   help="a reply d away from the answer earns max(0, 1 - d/this); 0: exact answers only")
    p.add_argument("--warmup-steps", type=int, default=400, help="supervised warm-up steps (0: none)")
    p.add_argument("--warmup-answers", choices=["random", "correct"], default="correct")
    p.add_argument("--warmup-lr", type=float, default=1e-2)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    add_connection_args(p)
    add_run_args(p, "rl_arithmetic")
    return p


def run(args: argparse.Namespace, service_client=None, console: Console | None = None) -> rl.RLResult:
    console = console or Console(quiet=args.quiet)
    log_dir = Path(args.log_dir or default_log_dir("rl_arithmetic"))
    service_client = service_client if service_client is not None else service_client_from_args(args)
    types = types_for(service_client)
    train_problems, test_problems = split_problems(all_problems(args.max_operand, (args.task,)), args.test_size,
                                                   seed=args.seed)

    # 1. Warm-up (skipped when resuming an RL run that already has checkpoints).
    start_from = None
    if args.warmup_steps > 0 and (args.no_resume or get_last_checkpoint(log_dir) is None):
        console.print(f"warm-up: {args.warmup_steps} supervised steps on {args.warmup_answers} answers")
        warm = supervised.train(
            supervised.SLConfig(log_dir=str(log_dir / "warmup"), model_name=args.model, renderer_name=args.renderer,
                                lora_rank=args.lora_rank, seed=args.seed, batch_size=32,
                                learning_rate=args.warmup_lr, num_epochs=100_000, max_steps=args.warmup_steps,
                                eval_every=0, save_every=0, resume=False, quiet=args.quiet,
                                table_every=max(args.warmup_steps // 3, 1)),
            warmup_conversations(train_problems, args.warmup_answers, args.seed), service_client=service_client,
            console=console)
        start_from = warm.state_path

    # 2. RL on the training problems. Evaluation: greedy accuracy on them (and on held-out ones).
    tokenizer = resolved(service_client.create_sampling_client(base_model=args.model)).get_tokenizer()
    renderer = get_renderer(args.renderer or recommended_renderer(args.model), tokenizer)
    dataset = ArithmeticDataset(train_problems, renderer, groups_per_batch=args.groups_per_batch,
                                group_size=args.group_size, num_batches=args.steps, seed=args.seed,
                                partial_credit=args.partial_credit)

    def score(sampler, problems: list[Problem]) -> float:
        return accuracy(graded_replies(sampler, renderer, [(p.prompt(), p.answer) for p in problems], types,
                                       grade=grade, max_tokens=6))

    def evaluator(sampler) -> dict[str, float]:
        metrics = {"train_accuracy": score(sampler, train_problems)}
        if test_problems:
            metrics["held_out_accuracy"] = score(sampler, test_problems)
        return metrics

    config = rl.RLConfig(
        log_dir=str(log_dir), model_name=args.model, lora_rank=args.lora_rank, seed=args.seed,
        learning_rate=args.lr, warmup_steps=args.lr_warmup, max_tokens=6, loss_fn=args.loss_fn,
        off_policy_overlap=args.off_policy_overlap, max_steps=args.steps, eval_every=args.eval_every,
        save_every=args.save_every, resume=not args.no_resume, load_checkpoint_path=start_from, quiet=args.quiet)
    console.print(f"RL: {len(train_problems)} training problems, {len(test_problems)} held out; log dir {log_dir}")
    return rl.train(config, dataset, service_client=service_client, evaluator=evaluator, console=console)


def summary(result: rl.RLResult, window: int = 5) -> dict[str, float]:
    """Mean reward over the first and the last `window` steps, and the first and last evaluations."""
    rewards = [row["reward/mean"] for row in result.history if "reward/mean" in row]
    evals = [row for row in result.history if "eval/train_accuracy" in row]
    out = {"reward_first": sum(rewards[:window]) / max(len(rewards[:window]), 1),
           "reward_last": sum(rewards[-window:]) / max(len(rewards[-window:]), 1)}
    for name in ("train_accuracy", "held_out_accuracy"):
        scored = [row[f"eval/{name}"] for row in evals if f"eval/{name}" in row]
        if scored:
            out[f"{name}_first"], out[f"{name}_last"] = scored[0], scored[-1]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(quiet=args.quiet)
    s = summary(run(args, console=console))
    console.print(f"mean reward: first 5 steps {s['reward_first']:.3f}, last 5 steps {s['reward_last']:.3f}")
    for name, label in (("train_accuracy", "training problems"), ("held_out_accuracy", "held-out problems")):
        if f"{name}_first" in s:
            console.print(f"greedy accuracy on the {label}: {s[f'{name}_first']:.0%} -> {s[f'{name}_last']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
