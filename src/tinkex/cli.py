"""The `tinkex` command."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import click

from tinkex.cli_commands import TinkexGroup, register


@click.group(cls=TinkexGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tinkex")
@click.option("-f", "--format", "output_format", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format of the management commands.")
@click.option("--base-url", default=None, metavar="URL", help="Server URL [default: $TINKER_BASE_URL].")
@click.option("--api-key", default=None, metavar="KEY", help="API key [default: $TINKER_API_KEY].")
@click.option("--timeout", type=float, default=None, metavar="SECONDS", help="How long to wait for each answer.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of short error messages.")
@click.pass_context
def main(ctx: click.Context, output_format: str, base_url: str | None, api_key: str | None, timeout: float | None,
         debug: bool) -> None:
    """tinkex: Tinker-style LoRA fine-tuning on your own hardware.

    Without --base-url/--api-key (or TINKER_BASE_URL/TINKER_API_KEY) the commands use the embedded
    server and its data directory, as the SDK does. Exit status: 0 ok, 1 error, 2 bad usage, 130 Ctrl-C.
    """
    ctx.obj = {"format": output_format, "base_url": base_url, "api_key": api_key, "timeout": timeout}


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


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict:
    if value is None:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object")
    return parsed


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
@click.option("--session-timeout", type=float, default=300.0, show_default=True,
              help="Seconds without a heartbeat after which a session expires and its adapters are freed "
                   "(its checkpoints stay).")
@click.option("--max-resident-adapters", type=int, default=64, show_default=True,
              help="Adapters kept in fast memory; beyond it the least recently used are parked on disk "
                   "and brought back on use.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch [default: one per core]. 1 is steadier on a busy machine.")
@click.option("--max-queued-requests", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Unfinished requests the server holds at once; beyond it, new ones get 429 with Retry-After "
                   "(the SDKs back off and resubmit).")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Run the engine in this many worker processes (Ray actors with --ray-address), each holding "
                   "the base models; adapters are spread over them. 0 keeps it in the server process.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Run the engine workers as Ray actors on this cluster: auto, HOST:PORT, ray://HOST:PORT, or "
                   "local (start Ray here). Needs pip install 'tinkex[ray]'. See docs/deployment.md.")
@click.option("--worker-gpus", type=click.FloatRange(min=0), default=None,
              help="GPUs per engine worker [default: one each when there are GPUs]; 0 keeps them on CPU.")
@click.option("--worker-models", multiple=True, metavar="MODEL[,MODEL...]",
              callback=lambda _ctx, _param, value: [entry.split(",") for entry in value] or None,
              help="One engine worker serving these base models (each also given with --model); repeat for "
                   "more workers. Work for a base model goes to the workers that serve it. [default: every "
                   "worker serves every model]")
@click.option("--sampler-backend", type=click.Choice(["torch", "vllm"]), default="torch", show_default=True,
              help="What samples: the built-in torch sampler, or vLLM on a GPU for the base models and saved "
                   "sampler weights (pip install 'tinkex[vllm]'; see docs/deployment.md).")
@click.option("--vllm-engine-args", "vllm_engine_args", default=None, metavar="JSON", callback=_json_object,
              help='vLLM EngineArgs for --sampler-backend vllm, e.g. \'{"gpu_memory_utilization": 0.5}\'.')
def serve(host: str, port: int, data_dir: Path | None, models: tuple[str, ...], api_keys: tuple[str, ...],
          keys_file: Path | None, database_url: str | None, compress_forward_backward: bool,
          long_poll_seconds: float, session_timeout: float, max_resident_adapters: int,
          threads: int | None, max_queued_requests: int, **engine_workers) -> None:
    """Run the Tinker-compatible server. Without --api-key or --keys-file, one local key is made and printed."""
    import uvicorn

    from tinkex.server.app import create_app
    from tinkex.server.embedded import default_data_dir, free_port, local_api_key
    from tinkex.server.runtime import ServerSettings

    data_dir = data_dir or default_data_dir()
    keys = _parse_keys(api_keys, keys_file) or {local_api_key(data_dir): "local"}
    settings = ServerSettings(data_dir=data_dir, host=host, port=port or free_port(host), api_keys=keys,
                              database_url=database_url, compress_forward_backward=compress_forward_backward,
                              long_poll_seconds=long_poll_seconds, session_timeout_seconds=session_timeout,
                              max_resident_adapters=max_resident_adapters, torch_threads=threads,
                              max_queued_requests=max_queued_requests,
                              **engine_workers)  # engine placement and sampler options, named as in ServerSettings
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


# Management commands: version, checkpoint, run, session, model, sample (tinkex/cli_commands.py).
register(main)

from tinkex.cookbook.demo import demo_command  # noqa: E402  (a light import: the demo loads torch lazily)

main.add_command(demo_command)


if __name__ == "__main__":
    main()
