"""The `tinkex` command."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import click


@click.group()
@click.version_option(package_name="tinkex")
def main() -> None:
    """tinkex: Tinker-style LoRA fine-tuning on your own hardware."""


def _parse_keys(api_keys: tuple[str, ...], keys_file: Path | None) -> dict[str, str]:
    keys: dict[str, str] = {}
    if keys_file is not None:
        keys.update(json.loads(keys_file.read_text()))
    for entry in api_keys:
        key, _, tenant = entry.partition("=")
        keys[key] = tenant or f"tenant-{len(keys)}"
    for key in keys:
        if not key.startswith("tml-"):
            raise click.BadParameter(f"API keys must start with 'tml-' (the Tinker SDK refuses others): {key[:8]}...")
    return keys


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on (0 picks a free one).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where the SQLite store and checkpoints live [default: $TINKEX_HOME or ~/.local/share/tinkex].")
@click.option("--model", "models", multiple=True,
              help="A base model to serve: tinkex/tiny-qwen3 (built in), a local directory, or a name in the "
                   "local Hugging Face cache. Repeat for several. [default: tinkex/tiny-qwen3]")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY[=TENANT]",
              help="Accept this key (must start with tml-), for the named tenant. Repeat for several.")
@click.option("--keys-file", type=click.Path(exists=True, path_type=Path),
              help='JSON file mapping keys to tenants: {"tml-...": "alice"}.')
@click.option("--database-url", default=None, help="SQLAlchemy URL of the store [default: SQLite in the data dir].")
@click.option("--compress-forward-backward", is_flag=True,
              help="Ask clients to zstd-compress forward_backward bodies.")
@click.option("--long-poll-seconds", type=float, default=25.0, show_default=True,
              help="How long retrieve_future holds a request before answering try_again (SDKs time out at 45).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch [default: one per core]. 1 is steadier on a busy machine.")
def serve(host: str, port: int, data_dir: Path | None, models: tuple[str, ...], api_keys: tuple[str, ...],
          keys_file: Path | None, database_url: str | None, compress_forward_backward: bool,
          long_poll_seconds: float, threads: int | None) -> None:
    """Run the Tinker-compatible server. Without --api-key or --keys-file, one local key is made and printed."""
    import uvicorn

    from tinkex.server.app import create_app
    from tinkex.server.embedded import default_data_dir, free_port, local_api_key
    from tinkex.server.runtime import ServerSettings

    data_dir = data_dir or default_data_dir()
    keys = _parse_keys(api_keys, keys_file) or {local_api_key(data_dir): "local"}
    settings = ServerSettings(data_dir=data_dir, host=host, port=port or free_port(host), api_keys=keys,
                              database_url=database_url, compress_forward_backward=compress_forward_backward,
                              long_poll_seconds=long_poll_seconds, torch_threads=threads)
    if models:
        settings.base_models = list(models)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=settings.port,
                                           log_level="warning", access_log=False))

    def announce() -> None:
        while not server.started:
            time.sleep(0.01)
        click.echo(f"tinkex serving on http://{host}:{settings.port}")
        if not api_keys and keys_file is None:
            click.echo(f"API key: {next(iter(keys))}")

    threading.Thread(target=announce, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
