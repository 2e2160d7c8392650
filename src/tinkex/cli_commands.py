"""The management commands of `tinkex`: version, checkpoint, run, session, model and sample.

Every command takes `--format table|json` (also `-f`, or once before the command), and the
connection options `--base-url` / `--api-key` (default: TINKER_BASE_URL / TINKER_API_KEY, and
with neither the embedded server, as for the SDK). Errors print `Error: ...` on stderr and exit
1; bad usage exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

import click

FORMATS = click.Choice(["table", "json"])


class CliError(click.ClickException):
    """A failure the user can act on: printed as `Error: <message>`, exit status 1."""


# ---- context: connection and output ------------------------------------------------------------


class Context:
    def __init__(self, base_url: str | None, api_key: str | None, fmt: str, timeout: float):
        self.base_url = base_url
        self.api_key = api_key
        self.format = fmt
        self.timeout = timeout
        self._rest: Any = None
        self._service: Any = None
        self._probed = False

    def probe(self) -> None:
        """Fail fast, with a clear message, when the server cannot be reached at all (the SDK would
        keep retrying a refused connection for minutes)."""
        import httpx

        from tinkex.client._config import resolve

        if self._probed:
            return
        self._probed = True
        connection = resolve(self.base_url, self.api_key)
        if connection.embedded:
            return
        try:
            httpx.get(f"{connection.base_url}/api/v1/healthz", timeout=httpx.Timeout(10, connect=5))
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the server at {connection.base_url} ({type(exc).__name__}: {exc}); "
                           "is it running? (--base-url or TINKER_BASE_URL)") from None

    def rest(self) -> Any:
        if self._rest is None:
            from tinkex.client import RestClient

            self.probe()
            self._rest = RestClient(base_url=self.base_url, api_key=self.api_key)
        return self._rest

    def service(self) -> Any:
        if self._service is None:
            from tinkex.client import ServiceClient

            self.probe()
            self._service = ServiceClient(base_url=self.base_url, api_key=self.api_key,
                                          user_metadata={"created_by": "tinkex cli"})
        return self._service

    def close(self) -> None:
        if self._service is not None:
            try:
                self._service.close().result(30)
            except Exception:
                pass

    def wait(self, future: Any) -> Any:
        return future.result(self.timeout)


def _ctx(click_ctx: click.Context) -> Context:
    root = click_ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    fmt = click_ctx.params.get("output_format") or obj.get("format") or "table"
    if click_ctx.params.get("as_json"):
        fmt = "json"
    base_url = click_ctx.params.get("base_url") or obj.get("base_url")
    api_key = click_ctx.params.get("api_key") or obj.get("api_key")
    timeout = click_ctx.params.get("timeout") or obj.get("timeout") or 120.0
    context = Context(base_url, api_key, fmt, timeout)
    click_ctx.call_on_close(context.close)
    return context


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--format/-f, --json, --base-url, --api-key, --timeout on a command."""
    for decorator in reversed((
        click.option("-f", "--format", "output_format", type=FORMATS, default=None,
                     help="Output as a table (default) or as JSON."),
        click.option("--json", "as_json", is_flag=True, default=False, help="Same as --format json."),
        click.option("--base-url", default=None, metavar="URL",
                     help="Server URL [default: $TINKER_BASE_URL, else the embedded server]."),
        click.option("--api-key", default=None, metavar="KEY", help="API key [default: $TINKER_API_KEY]."),
        click.option("--timeout", type=float, default=None, metavar="SECONDS",
                     help="How long to wait for each answer [default: 120]."),
    )):
        fn = decorator(fn)
    return fn


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return str(value)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def dump(model: Any) -> Any:
    return model.model_dump(mode="json", exclude_none=True) if hasattr(model, "model_dump") else model


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    grid = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200).print(grid)


def key_values(title: str | None, pairs: Iterable[tuple[str, Any]]) -> None:
    table(title, ("Field", "Value"), pairs)


def humanize(when: datetime | None) -> str:
    if when is None:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    seconds = (datetime.now(timezone.utc) - when).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    else:
        amount = f"{int(seconds)} s"
    return f"in {amount}" if future else f"{amount} ago"


def size(value: int | None) -> str:
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return str(value)


def _checked_path(path: str) -> str:
    from tinkex.types import ParsedCheckpointTinkerPath

    try:
        ParsedCheckpointTinkerPath.from_tinker_path(path)
    except ValueError as exc:
        raise click.BadParameter(f"{path!r} is not a checkpoint path (tinker://<run>/weights/<name>): {exc}") from None
    return path


# ---- errors ------------------------------------------------------------------------------------


def describe_error(exc: BaseException, base_url: str | None = None) -> str:
    """A message for a person: what failed and what to do."""
    from tinkex.types._exceptions import (
        APIConnectionError,
        APIStatusError,
        AuthenticationError,
        NotFoundError,
        PermissionDeniedError,
        RequestFailedError,
    )

    if isinstance(exc, APIStatusError):
        body = exc.body
        detail = body.get("detail") if isinstance(body, dict) else body
        detail = detail if isinstance(detail, str) and detail else exc.message
        if isinstance(exc, AuthenticationError):
            return f"the server refused the API key ({detail}); check --api-key or TINKER_API_KEY"
        if isinstance(exc, PermissionDeniedError):
            return f"permission denied: {detail}"
        if isinstance(exc, NotFoundError):
            return f"not found: {detail}"
        return f"the server answered {exc.status_code}: {detail}"
    if isinstance(exc, APIConnectionError):
        where = f" {exc.request.url.scheme}://{exc.request.url.netloc.decode()}" if getattr(exc, "request", None) \
            else ""
        return f"cannot reach the server{where} ({exc}); is it running? (--base-url or TINKER_BASE_URL)"
    if isinstance(exc, RequestFailedError):
        return f"the request failed on the server ({exc.category}): {exc}"
    if isinstance(exc, FileExistsError):
        return f"{exc}; use --force to replace it"
    if isinstance(exc, TimeoutError) or type(exc).__name__ == "TimeoutError":
        return "no answer in time (raise --timeout?)"
    return f"{exc}" if str(exc) else type(exc).__name__


class TinkexGroup(click.Group):
    """Turns exceptions into `Error: ...` and exit codes (1 for errors, 130 for Ctrl-C)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.find_root().params.get("debug"):
                raise
            raise CliError(describe_error(exc)) from exc


# ---- version -----------------------------------------------------------------------------------


@click.command()
@click.option("-f", "--format", "output_format", type=FORMATS, default=None, help="table (default) or json.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.pass_context
def version(click_ctx: click.Context, output_format: str | None, as_json: bool) -> None:
    """Print the tinkex version and the Tinker protocol version it speaks."""
    from tinkex.client._constants import PROTOCOL_SDK_VERSION, TINKEX_VERSION

    fmt = _ctx(click_ctx).format
    if fmt == "json":
        emit_json({"version": TINKEX_VERSION, "tinker_protocol": PROTOCOL_SDK_VERSION,
                   "python": sys.version.split()[0]})
    else:
        click.echo(f"tinkex {TINKEX_VERSION} (Tinker SDK protocol {PROTOCOL_SDK_VERSION})")


# ---- checkpoints -------------------------------------------------------------------------------


@click.group()
def checkpoint() -> None:
    """List, inspect, download, publish and delete checkpoints."""


def _checkpoint_rows(items: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [(c.tinker_path, c.checkpoint_type, size(c.size_bytes), "yes" if c.public else "no", humanize(c.time),
             humanize(c.expires_at) if c.expires_at else "never") for c in items]


@checkpoint.command("list")
@click.option("--run-id", default=None, help="Only this training run's checkpoints.")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="How many; 0 lists all.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@common_options
@click.pass_context
def checkpoint_list(click_ctx: click.Context, run_id: str | None, limit: int, offset: int, **_: Any) -> None:
    """List your checkpoints, newest first (or one run's, oldest first)."""
    ctx = _ctx(click_ctx)
    rest = ctx.rest()
    if run_id:
        response = ctx.wait(rest.list_checkpoints(run_id))
        items = response.checkpoints[offset:]
        items = items[:limit] if limit else items
        total = len(response.checkpoints)
    else:
        items, total, page_offset = [], None, offset
        while True:
            page_size = 100 if limit == 0 else min(100, limit - len(items))
            response = ctx.wait(rest.list_user_checkpoints(limit=page_size, offset=page_offset))
            items.extend(response.checkpoints)
            total = response.cursor.total_count if response.cursor else len(items)
            page_offset += len(response.checkpoints)
            if not response.checkpoints or page_offset >= total or (limit and len(items) >= limit):
                break
            if limit == 0 and ctx.format == "table":
                click.echo(f"fetched {len(items)} of {total}...", err=True)
    if ctx.format == "json":
        emit_json({"checkpoints": [dump(c) for c in items], "total": total, "shown": len(items)})
        return
    table(f"{len(items)} of {total} checkpoints", ("Checkpoint", "Type", "Size", "Public", "Created", "Expires"),
          _checkpoint_rows(items))


def _find_checkpoint(ctx: Context, path: str) -> Any:
    from tinkex.types import ParsedCheckpointTinkerPath

    parsed = ParsedCheckpointTinkerPath.from_tinker_path(path)
    for item in ctx.wait(ctx.rest().list_checkpoints(parsed.training_run_id)).checkpoints:
        if item.tinker_path == path:
            return item
    raise CliError(f"no checkpoint {path} in training run {parsed.training_run_id}")


@checkpoint.command("info")
@click.argument("checkpoint_path", callback=lambda _c, _p, v: _checked_path(v))
@common_options
@click.pass_context
def checkpoint_info(click_ctx: click.Context, checkpoint_path: str, **_: Any) -> None:
    """Show one checkpoint: type, size, visibility, dates, its run and its LoRA settings."""
    ctx = _ctx(click_ctx)
    item = _find_checkpoint(ctx, checkpoint_path)
    run = ctx.wait(ctx.rest().get_training_run_by_tinker_path(checkpoint_path))
    try:
        weights = dump(ctx.wait(ctx.rest().get_weights_info_by_tinker_path(checkpoint_path)))
    except Exception:
        weights = None
    if ctx.format == "json":
        emit_json({"checkpoint": dump(item), "training_run": dump(run), "weights_info": weights})
        return
    pairs = [("Path", item.tinker_path), ("Type", item.checkpoint_type), ("Size", size(item.size_bytes)),
             ("Public", "yes" if item.public else "no"), ("Created", f"{item.time.isoformat()} ({humanize(item.time)})"),
             ("Expires", item.expires_at.isoformat() if item.expires_at else "never"),
             ("Training run", run.training_run_id), ("Base model", run.base_model), ("LoRA rank", run.lora_rank)]
    if weights:
        pairs += [("Trains", ", ".join(k[len("train_"):] for k in ("train_mlp", "train_attn", "train_unembed")
                                       if weights.get(k)))]
    if item.user_metadata:
        pairs += [("Metadata", json.dumps(item.user_metadata))]
    key_values(None, pairs)


@checkpoint.command("download")
@click.argument("checkpoint_path", callback=lambda _c, _p, v: _checked_path(v))
@click.option("-o", "--output", "output_dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Directory to put the checkpoint's directory in.")
@click.option("--force", is_flag=True, help="Replace an existing download.")
@click.option("--no-resume", is_flag=True, help="Start afresh even if an interrupted download is there.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--memory-budget", type=click.IntRange(min=4096), default=1 << 20, show_default=True,
              help="The most bytes held in memory at once.")
@common_options
@click.pass_context
def checkpoint_download(click_ctx: click.Context, checkpoint_path: str, output_dir: str, force: bool,
                        no_resume: bool, no_progress: bool, memory_budget: int, **_: Any) -> None:
    """Download a checkpoint (streamed, verified, extracted; resumes an interrupted download)."""
    ctx = _ctx(click_ctx)
    show_bar = not no_progress and ctx.format == "table" and sys.stderr.isatty()
    target = ctx.rest().download_checkpoint(checkpoint_path, output_dir, force=force, resume=not no_resume,
                                            progress=True if show_bar else None,
                                            memory_budget=memory_budget).result()
    files = sorted(p for p in target.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    if ctx.format == "json":
        emit_json({"path": str(target), "files": [p.relative_to(target).as_posix() for p in files], "bytes": total})
    else:
        click.echo(f"Downloaded {checkpoint_path} to {target} ({len(files)} files, {size(total)})")


@checkpoint.command("delete")
@click.argument("checkpoint_paths", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@common_options
@click.pass_context
def checkpoint_delete(click_ctx: click.Context, checkpoint_paths: tuple[str, ...], yes: bool, **_: Any) -> None:
    """Delete one or more checkpoints (asks first, unless --yes)."""
    paths = [_checked_path(p) for p in checkpoint_paths]
    ctx = _ctx(click_ctx)
    if not yes:
        listing = "\n".join(f"  {p}" for p in paths)
        click.confirm(f"Delete {len(paths)} checkpoint(s)?\n{listing}\n", abort=True, err=True)
    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            ctx.wait(ctx.rest().delete_checkpoint_from_tinker_path(path))
            results.append({"path": path, "deleted": True})
            if ctx.format == "table":
                click.echo(f"deleted {path}")
        except Exception as exc:
            results.append({"path": path, "deleted": False, "error": describe_error(exc)})
            if ctx.format == "table":
                click.echo(f"could not delete {path}: {describe_error(exc)}", err=True)
    if ctx.format == "json":
        emit_json({"results": results})
    failed = [r for r in results if not r["deleted"]]
    if failed:
        raise CliError(f"{len(failed)} of {len(paths)} deletions failed")


def _simple_checkpoint_command(name: str, method: str, done: str, help_text: str) -> None:
    @checkpoint.command(name, help=help_text)
    @click.argument("checkpoint_path", callback=lambda _c, _p, v: _checked_path(v))
    @common_options
    @click.pass_context
    def command(click_ctx: click.Context, checkpoint_path: str, **_: Any) -> None:
        ctx = _ctx(click_ctx)
        ctx.wait(getattr(ctx.rest(), method)(checkpoint_path))
        if ctx.format == "json":
            emit_json({"path": checkpoint_path, name: True})
        else:
            click.echo(f"{done} {checkpoint_path}")


_simple_checkpoint_command("publish", "publish_checkpoint_from_tinker_path", "published",
                           "Make a checkpoint public: any API key of this server can then load and sample it.")
_simple_checkpoint_command("unpublish", "unpublish_checkpoint_from_tinker_path", "unpublished",
                           "Make a public checkpoint private again.")


@checkpoint.command("set-ttl")
@click.argument("checkpoint_path", callback=lambda _c, _p, v: _checked_path(v))
@click.option("--ttl", type=click.IntRange(min=1), default=None, metavar="SECONDS",
              help="Delete the checkpoint this many seconds from now.")
@click.option("--remove", is_flag=True, help="Keep the checkpoint for good.")
@common_options
@click.pass_context
def checkpoint_set_ttl(click_ctx: click.Context, checkpoint_path: str, ttl: int | None, remove: bool,
                       **_: Any) -> None:
    """Set or remove a checkpoint's expiry."""
    if (ttl is None) == (not remove):
        raise click.UsageError("give exactly one of --ttl SECONDS or --remove")
    ctx = _ctx(click_ctx)
    ctx.wait(ctx.rest().set_checkpoint_ttl_from_tinker_path(checkpoint_path, None if remove else ttl))
    if ctx.format == "json":
        emit_json({"path": checkpoint_path, "ttl_seconds": None if remove else ttl})
    else:
        click.echo(f"{checkpoint_path} {'never expires' if remove else f'expires in {ttl} s'}")


# ---- runs, sessions, models --------------------------------------------------------------------


@click.group()
def run() -> None:
    """List and inspect training runs."""


@run.command("list")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="How many; 0 lists all.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@common_options
@click.pass_context
def run_list(click_ctx: click.Context, limit: int, offset: int, **_: Any) -> None:
    """List your training runs, newest first."""
    ctx = _ctx(click_ctx)
    runs, total, page_offset = [], 0, offset
    while True:
        page = 100 if limit == 0 else min(100, limit - len(runs))
        response = ctx.wait(ctx.rest().list_training_runs(limit=page, offset=page_offset))
        runs.extend(response.training_runs)
        total = response.cursor.total_count
        page_offset += len(response.training_runs)
        if not response.training_runs or page_offset >= total or (limit and len(runs) >= limit):
            break
    if ctx.format == "json":
        emit_json({"training_runs": [dump(r) for r in runs], "total": total, "shown": len(runs)})
        return
    table(f"{len(runs)} of {total} training runs", ("Run", "Base model", "LoRA", "Status", "Last request",
                                                     "Last checkpoint"),
          [(r.training_run_id, r.base_model, r.lora_rank, "corrupted" if r.corrupted else "ok",
            humanize(r.last_request_time), r.last_checkpoint.tinker_path if r.last_checkpoint else "-") for r in runs])


@run.command("info")
@click.argument("run_id")
@common_options
@click.pass_context
def run_info(click_ctx: click.Context, run_id: str, **_: Any) -> None:
    """Show a training run and its checkpoints."""
    ctx = _ctx(click_ctx)
    item = ctx.wait(ctx.rest().get_training_run(run_id))
    checkpoints = ctx.wait(ctx.rest().list_checkpoints(run_id)).checkpoints
    if ctx.format == "json":
        emit_json({"training_run": dump(item), "checkpoints": [dump(c) for c in checkpoints]})
        return
    key_values(None, [("Run", item.training_run_id), ("Base model", item.base_model), ("Owner", item.model_owner),
                      ("LoRA rank", item.lora_rank), ("Status", "corrupted" if item.corrupted else "ok"),
                      ("Last request", f"{item.last_request_time.isoformat()} ({humanize(item.last_request_time)})"),
                      ("Metadata", json.dumps(item.user_metadata) if item.user_metadata else "-")])
    if checkpoints:
        table("Checkpoints", ("Checkpoint", "Type", "Size", "Public", "Created", "Expires"),
              _checkpoint_rows(checkpoints))


@click.group()
def session() -> None:
    """List and inspect sessions."""


@session.command("list")
@click.option("--limit", type=click.IntRange(min=1, max=1000), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True)
@common_options
@click.pass_context
def session_list(click_ctx: click.Context, limit: int, offset: int, **_: Any) -> None:
    """List your sessions, newest first, with their training runs and samplers."""
    ctx = _ctx(click_ctx)
    ids = ctx.wait(ctx.rest().list_sessions(limit=limit, offset=offset)).sessions
    details = [(sid, ctx.wait(ctx.rest().get_session(sid))) for sid in ids]
    if ctx.format == "json":
        emit_json({"sessions": [{"session_id": sid, **dump(d)} for sid, d in details]})
        return
    table(f"{len(ids)} sessions", ("Session", "Training runs", "Samplers", "Name"),
          [(sid, len(d.training_run_ids), len(d.sampler_ids), getattr(d, "display_name", None) or "-")
           for sid, d in details])


@session.command("info")
@click.argument("session_id")
@common_options
@click.pass_context
def session_info(click_ctx: click.Context, session_id: str, **_: Any) -> None:
    """Show a session: its training runs, samplers and metadata."""
    ctx = _ctx(click_ctx)
    detail = ctx.wait(ctx.rest().get_session(session_id))
    if ctx.format == "json":
        emit_json({"session_id": session_id, **dump(detail)})
        return
    key_values(None, [("Session", session_id), ("Name", getattr(detail, "display_name", None) or "-"),
                      ("Training runs", "\n".join(detail.training_run_ids) or "-"),
                      ("Samplers", "\n".join(detail.sampler_ids) or "-"),
                      ("Metadata", json.dumps(detail.user_metadata) if detail.user_metadata else "-")])


@click.group()
def model() -> None:
    """The base models a server offers."""


@model.command("list")
@click.argument("substring", required=False)
@common_options
@click.pass_context
def model_list(click_ctx: click.Context, substring: str | None, **_: Any) -> None:
    """List the server's base models (those whose name contains SUBSTRING)."""
    ctx = _ctx(click_ctx)
    models = ctx.wait(ctx.rest().get_server_capabilities()).supported_models
    if substring:
        models = [m for m in models if substring.lower() in (m.model_name or "").lower()]
    if ctx.format == "json":
        emit_json({"models": [dump(m) for m in models]})
        return

    def yes(value: bool | None) -> str:
        return "-" if value is None else ("yes" if value else "no")

    table(None, ("Model", "Max context", "Trainable", "Sampleable"),
          [(m.model_name, m.max_context_length or "-", yes(m.trainable), yes(m.sampleable)) for m in models])


# ---- sample ------------------------------------------------------------------------------------


@click.command()
@click.argument("model_or_checkpoint")
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.File("r"), default=None, help="Read the prompt from a file ('-': stdin).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--stop", "stops", multiple=True, help="Stop at this text (repeatable).")
@click.option("-n", "--num-samples", type=click.IntRange(min=1, max=64), default=1, show_default=True)
@common_options
@click.pass_context
def sample(click_ctx: click.Context, model_or_checkpoint: str, prompt: str | None, prompt_file: Any,
           max_tokens: int, temperature: float, top_p: float, seed: int | None, stops: tuple[str, ...],
           num_samples: int, **_: Any) -> None:
    """Sample a continuation of PROMPT from a base model or a checkpoint, printed as it is generated.

    MODEL_OR_CHECKPOINT is a base model name (see `tinkex model list`) or a tinker:// path of sampler
    weights or of a training state. Against a tinkex server the text streams token by token (its
    /v1/completions endpoint). Servers without it (the hosted Tinker service) are sampled through
    the SDK, and the text is printed once the whole sample has arrived.
    """
    if prompt_file is not None:
        prompt = prompt_file.read()
    if prompt is None:
        raise click.UsageError("give a PROMPT or --prompt-file")
    ctx = _ctx(click_ctx)
    if model_or_checkpoint.startswith("tinker://"):
        _checked_path(model_or_checkpoint)
    if ctx.format == "table" and num_samples == 1 and _stream_completion(ctx, model_or_checkpoint, prompt,
                                                                        max_tokens, temperature, top_p, seed, stops):
        return
    results = _sample_with_sdk(ctx, model_or_checkpoint, prompt, max_tokens, temperature, top_p, seed, stops,
                               num_samples)
    if ctx.format == "json":
        emit_json({"model": model_or_checkpoint, "prompt": prompt, "samples": results})
        return
    for index, result in enumerate(results):
        if num_samples > 1:
            click.secho(f"--- sample {index + 1} ({result['stop_reason']}) ---", err=True, dim=True)
        for piece in result["pieces"]:
            click.echo(piece, nl=False)
        click.echo()


def _stream_completion(ctx: Context, model_name: str, prompt: str, max_tokens: int, temperature: float,
                       top_p: float, seed: int | None, stops: tuple[str, ...]) -> bool:
    """Stream from the server's /v1/completions; False when the server has no such endpoint."""
    import httpx

    from tinkex.client._config import resolve

    ctx.probe()
    connection = resolve(ctx.base_url, ctx.api_key)
    body: dict[str, Any] = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": temperature, "top_p": top_p, "stream": True}
    if seed is not None:
        body["seed"] = seed
    if stops:
        body["stop"] = list(stops)
    headers = {"Authorization": f"Bearer {connection.api_key}", "x-api-key": connection.api_key}
    with httpx.Client(timeout=httpx.Timeout(ctx.timeout, connect=10)) as client:
        with client.stream("POST", f"{connection.base_url}/v1/completions", json=body, headers=headers) as response:
            if response.status_code in (404, 405):
                return False
            if response.status_code != 200:
                response.read()
                try:
                    detail = response.json().get("detail")
                except ValueError:
                    detail = response.text
                raise CliError(f"the server answered {response.status_code}: {detail}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                for choice in json.loads(data).get("choices", []):
                    if choice.get("text"):
                        click.echo(choice["text"], nl=False)
                        sys.stdout.flush()
    click.echo()
    return True


def _sample_with_sdk(ctx: Context, model_name: str, prompt: str, max_tokens: int, temperature: float, top_p: float,
                     seed: int | None, stops: tuple[str, ...], num_samples: int) -> list[dict[str, Any]]:
    from tinkex import types
    from tinkex.types import ParsedCheckpointTinkerPath

    service = ctx.service()
    if model_name.startswith("tinker://"):
        parsed = ParsedCheckpointTinkerPath.from_tinker_path(model_name)
        if parsed.checkpoint_type == "training":  # a training state: load it, then snapshot it for sampling
            trainer = ctx.wait(service.create_training_client_from_state(model_name))
            sampler = ctx.wait(trainer.save_weights_and_get_sampling_client())
        else:
            sampler = ctx.wait(service.create_sampling_client(model_path=model_name))
    else:
        sampler = ctx.wait(service.create_sampling_client(base_model=model_name))
    tokenizer = sampler.get_tokenizer()
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  stop=list(stops) or None)
    prompt_input = types.ModelInput.from_ints(tokenizer.encode(prompt))
    response = ctx.wait(sampler.sample(prompt_input, num_samples=num_samples, sampling_params=params))
    results = []
    for sequence in response.sequences:
        pieces, shown = [], ""
        for end in range(1, len(sequence.tokens) + 1):  # decode token by token, as a stream would show it
            text = tokenizer.decode(sequence.tokens[:end], skip_special_tokens=True)
            if text.startswith(shown) and len(text) > len(shown) and not text.endswith("\ufffd"):
                pieces.append(text[len(shown):])
                shown = text
        full = tokenizer.decode(sequence.tokens, skip_special_tokens=True)
        if full != shown:
            pieces.append(full[len(shown):] if full.startswith(shown) else full)
        results.append({"text": full, "tokens": list(sequence.tokens), "stop_reason": sequence.stop_reason,
                        "pieces": pieces})
    if ctx.format == "json":
        for result in results:
            result.pop("pieces")
    return results


def register(main: click.Group) -> None:
    """Add the management commands to the `tinkex` group."""
    for command in (version, checkpoint, run, session, model, sample):
        main.add_command(command)
