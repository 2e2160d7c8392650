"""Command-line plumbing shared by the recipes: where to connect, where to log."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any


def default_log_dir(recipe: str) -> str:
    """A fresh directory per run under $TINKEX_RUNS_DIR (default ~/tinkex-runs)."""
    root = Path(os.environ.get("TINKEX_RUNS_DIR") or Path.home() / "tinkex-runs")
    return str(root / f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}")


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--base-url", default=None,
                       help="A running Tinker-compatible server (e.g. `tinkex serve`). Default: $TINKER_BASE_URL, "
                            "else the embedded server.")
    group.add_argument("--api-key", default=None, help="Its API key. Default: $TINKER_API_KEY.")
    group.add_argument("--sdk", choices=["tinkex", "tinker"], default="tinkex",
                       help="Which client SDK drives the loop: tinkex, or the official tinker SDK (needs --base-url).")


def add_run_args(parser: argparse.ArgumentParser, recipe: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--log-dir", default=None,
                       help=f"Where metrics.jsonl and checkpoints.jsonl go. Default: a new ~/tinkex-runs/{recipe}-<time>. "
                            "Point it at an earlier run to resume from its last checkpoint.")
    group.add_argument("--no-resume", action="store_true", help="Ignore checkpoints already in --log-dir.")
    group.add_argument("--quiet", action="store_true", help="No progress bar or table (metrics.jsonl is still written).")


def service_client_from_args(args: argparse.Namespace) -> Any:
    if args.sdk == "tinker":
        import tinker

        base_url = args.base_url or os.environ.get("TINKER_BASE_URL")
        if not base_url:
            raise SystemExit("--sdk tinker needs --base-url (or TINKER_BASE_URL): the official SDK has no embedded server")
        return tinker.ServiceClient(base_url=base_url, api_key=args.api_key)
    import tinkex

    return tinkex.ServiceClient(base_url=args.base_url, api_key=args.api_key)
