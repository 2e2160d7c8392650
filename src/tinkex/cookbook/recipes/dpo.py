"""dpo: direct preference optimisation on a JSONL of preference pairs.

    python -m tinkex.cookbook.recipes.dpo                     # the shipped pairs, embedded server
    python -m tinkex.cookbook.recipes.dpo --data pairs.jsonl --beta 0.1 --steps 50

The reference model is the starting point (the base model, or `--load-checkpoint`). Reported:
the DPO loss, how often the chosen reply out-scores the rejected one (accuracy) and by how much
(margin, in nats of log pi/ref), on the training batches and on `--test-size` held-out pairs.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from .. import preference
from ..cli_utils import add_connection_args, add_run_args, default_log_dir, service_client_from_args
from ..data import shipped_dataset, split_train_test


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinkex.cookbook.recipes.dpo", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="preference JSONL (default: the shipped pairs)")
    p.add_argument("--model", default=preference.BUILTIN_MODEL)
    p.add_argument("--renderer", default=None)
    p.add_argument("--load-checkpoint", default=None, help="start (and take the reference) from these weights")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--test-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    add_connection_args(p)
    add_run_args(p, "dpo")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(quiet=args.quiet)
    pairs = preference.load_preference_pairs(args.data or shipped_dataset("preferences.jsonl"))
    train, test = split_train_test(pairs, args.test_size, seed=args.seed)
    config = preference.DPOConfig(
        log_dir=args.log_dir or default_log_dir("dpo"), model_name=args.model, renderer_name=args.renderer,
        lora_rank=args.lora_rank, seed=args.seed, beta=args.beta, batch_size=args.batch_size,
        learning_rate=args.lr, num_epochs=args.epochs, max_steps=args.steps, eval_every=args.eval_every,
        save_every=args.save_every, resume=not args.no_resume, load_checkpoint_path=args.load_checkpoint,
        quiet=args.quiet)
    console.print(f"dpo: {len(train)} training / {len(test)} held-out pairs, log dir {config.log_dir}")
    result = preference.train(config, train, test, service_client=service_client_from_args(args), console=console)
    first = next((row for row in result.history if "test/margin" in row), None)
    final = result.history[-1]
    if first is not None and "test/margin" in final:
        console.print(f"held-out margin {first['test/margin']:+.3f} -> {final['test/margin']:+.3f}, "
                      f"accuracy {first['test/accuracy']:.0%} -> {final['test/accuracy']:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
