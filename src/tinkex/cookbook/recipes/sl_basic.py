"""sl_basic: supervised fine-tuning on a JSONL file of conversations.

    python -m tinkex.cookbook.recipes.sl_basic                      # the shipped conversations, embedded server
    python -m tinkex.cookbook.recipes.sl_basic --data my.jsonl --steps 200 --renderer qwen3_disable_thinking
    python -m tinkex.cookbook.recipes.sl_basic --base-url http://127.0.0.1:8000 --api-key tml-...

Holds out `--test-size` conversations, trains on the rest with a linearly decaying learning rate,
reports held-out NLL every `--eval-every` steps, checkpoints every `--save-every`, and at the end
shows the fine-tuned model's replies to a few held-out prompts.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from .. import supervised
from ..cli_utils import add_connection_args, add_run_args, default_log_dir, service_client_from_args
from ..data import load_conversations, shipped_dataset, split_train_test
from ..evaluation import graded_replies
from ..sdk import resolved, types_for


def build_config(args: argparse.Namespace) -> supervised.SLConfig:
    return supervised.SLConfig(
        log_dir=args.log_dir or default_log_dir("sl_basic"),
        model_name=args.model, renderer_name=args.renderer, lora_rank=args.lora_rank, seed=args.seed,
        batch_size=args.batch_size, learning_rate=args.lr, lr_schedule=args.lr_schedule,
        num_epochs=args.epochs, max_steps=args.steps, eval_every=args.eval_every, save_every=args.save_every,
        resume=not args.no_resume, quiet=args.quiet,
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tinkex.cookbook.recipes.sl_basic", description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="JSONL of {\"messages\": [...]} (default: the shipped conversations)")
    p.add_argument("--model", default=supervised.BUILTIN_MODEL)
    p.add_argument("--renderer", default=None, help="role_colon, llama3, chatml, qwen3, qwen3_disable_thinking")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--lr-schedule", default="linear", choices=["constant", "linear", "cosine"])
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--test-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    add_connection_args(p)
    add_run_args(p, "sl_basic")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    console = Console(quiet=args.quiet)
    config = build_config(args)
    conversations = load_conversations(args.data or shipped_dataset("conversations.jsonl"))
    train, test = split_train_test(conversations, args.test_size, seed=args.seed)
    console.print(f"sl_basic: {len(train)} training / {len(test)} held-out conversations, log dir {config.log_dir}")

    service_client = service_client_from_args(args)
    result = supervised.train(config, train, test, service_client=service_client, console=console)

    # What the fine-tuned model says to a few held-out prompts (prompt = everything before the last reply).
    types = types_for(service_client)
    sampler = resolved(result.training_client.create_sampling_client(result.sampler_path))
    problems = [(conv[:-1], conv[-1]["content"]) for conv in test[:6] if conv[-1]["role"] == "assistant"]
    for graded in graded_replies(sampler, result.renderer, problems, types, max_tokens=24):
        console.print(f"[bold]{graded.prompt}[/bold]\n  model:    {graded.reply!r}\n  expected: {graded.expected!r}")
    console.print(f"done: step {result.final_step}, held-out NLL {result.test_nll:.3f}, "
                  f"final state {result.state_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
