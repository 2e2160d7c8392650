"""The `tinkex` command against a real `tinkex serve` process."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

import tinkex
from tinkex import types
from tinkex.cli import main
from tinkex.server.embedded import free_port

from ..conftest import ALICE
from .conftest import Cli

MODEL = "tinkex/tiny-qwen3"


@pytest.fixture(scope="module")
def trained(server):
    service = tinkex.ServiceClient(base_url=server.base_url, api_key=ALICE)
    trainer = service.create_lora_training_client(MODEL, rank=4, seed=31, user_metadata={"purpose": "cli"}).result(60)
    tokens = list(range(5, 30))
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    trainer.forward_backward([datum], "cross_entropy").result(60)
    trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result(60)
    state = trainer.save_state("cli-state").result(60).path
    sampler = trainer.save_weights_for_sampler("cli-sampler").result(60).path
    extra = [trainer.save_state(f"cli-extra-{i}").result(60).path for i in range(2)]
    yield service, trainer, state, sampler, extra
    service.close().result(30)


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
    return found


def test_every_command_has_help():
    commands = _commands(main)
    for expected in [("serve",), ("version",), ("checkpoint", "list"), ("checkpoint", "info"),
                     ("checkpoint", "download"), ("checkpoint", "delete"), ("checkpoint", "publish"),
                     ("checkpoint", "unpublish"), ("checkpoint", "set-ttl"), ("run", "list"), ("run", "info"),
                     ("session", "list"), ("session", "info"), ("model", "list"), ("sample",)]:
        assert expected in commands
    cli = Cli("http://unused")
    for path in [(), *commands]:
        for flag in ("--help", "-h"):
            result = cli(*path, flag, connect=False)
            assert result.exit_code == 0 and "Usage:" in result.output, (path, result.output)


def test_version(cli):
    result = cli("version", connect=False)
    assert result.exit_code == 0 and result.output.startswith("tinkex ") and "0.38.0" in result.output
    data = json.loads(cli("--format", "json", "version", connect=False).stdout)
    assert data["tinker_protocol"] == "0.38.0" and data["version"]


def test_models(cli):
    result = cli("model", "list")
    assert result.exit_code == 0 and MODEL in result.output and "Sampleable" in result.output
    assert [m["model_name"] for m in cli.json("model", "list", "tiny")["models"]] == [MODEL]
    assert cli.json("model", "list", "no-such-model")["models"] == []


def test_runs_and_sessions(cli, trained):
    service, trainer, state, _, _ = trained
    runs = cli.json("run", "list", "--limit", "0")["training_runs"]
    assert trainer.model_id in [r["training_run_id"] for r in runs]
    table = cli("run", "list", "--limit", "500")
    assert table.exit_code == 0 and trainer.model_id[:20] in table.output
    info = cli.json("run", "info", trainer.model_id)
    assert info["training_run"]["user_metadata"] == {"purpose": "cli"}
    assert state in [c["tinker_path"] for c in info["checkpoints"]]
    assert "cli-state" in cli("run", "info", trainer.model_id).output
    sessions = cli.json("session", "list", "--limit", "50")["sessions"]
    assert service.session_id in [s["session_id"] for s in sessions]
    session = cli.json("session", "info", service.session_id)
    assert trainer.model_id in session["training_run_ids"]
    assert cli("session", "info", service.session_id).exit_code == 0


def test_checkpoint_list_info_publish_ttl(cli, trained):
    _, trainer, state, sampler, _ = trained
    listed = cli.json("checkpoint", "list", "--run-id", trainer.model_id)
    assert {state, sampler} <= {c["tinker_path"] for c in listed["checkpoints"]}
    assert listed["total"] == listed["shown"] == len(listed["checkpoints"])
    assert cli.json("checkpoint", "list", "--limit", "2")["shown"] == 2
    everything = cli.json("checkpoint", "list", "--limit", "0")
    assert everything["shown"] == everything["total"] >= 4
    table = cli("checkpoint", "list", "--run-id", trainer.model_id)
    assert table.exit_code == 0 and "cli-sampler" in table.output

    info = cli.json("checkpoint", "info", state)
    assert info["checkpoint"]["checkpoint_type"] == "training" and info["training_run"]["lora_rank"] == 4
    assert info["weights_info"]["base_model"] == MODEL
    shown = cli("checkpoint", "info", state)
    assert shown.exit_code == 0 and "Base model" in shown.output and MODEL in shown.output

    assert cli("checkpoint", "publish", state).output.startswith("published")
    assert cli.json("checkpoint", "info", state)["checkpoint"]["public"] is True
    again = cli("checkpoint", "publish", state)
    assert again.exit_code == 1 and "Error: the server answered 409" in again.output
    assert cli.json("checkpoint", "unpublish", state) == {"path": state, "unpublish": True}

    assert "expires in 7200 s" in cli("checkpoint", "set-ttl", state, "--ttl", "7200").output
    assert cli.json("checkpoint", "info", state)["checkpoint"]["expires_at"]
    cli("checkpoint", "set-ttl", state, "--remove")
    assert "expires_at" not in cli.json("checkpoint", "info", state)["checkpoint"]
    both = cli("checkpoint", "set-ttl", state, "--ttl", "7200", "--remove")
    assert both.exit_code == 2 and "exactly one" in both.output


def test_checkpoint_download(cli, trained, tmp_path):
    _, _, state, _, _ = trained
    result = cli.json("checkpoint", "download", state, "-o", str(tmp_path))
    target = Path(result["path"])
    assert target.parent == tmp_path and "adapter_model.safetensors" in result["files"]
    assert result["bytes"] == sum(p.stat().st_size for p in target.iterdir())
    exists = cli("checkpoint", "download", state, "-o", str(tmp_path))
    assert exists.exit_code == 1 and "--force" in exists.output
    forced = cli("checkpoint", "download", state, "-o", str(tmp_path), "--force", "--no-progress")
    assert forced.exit_code == 0 and f"to {target}" in forced.output


def test_checkpoint_delete(cli, trained):
    _, trainer, _, _, extra = trained
    declined = cli("checkpoint", "delete", extra[0], input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert cli("checkpoint", "delete", *extra, input="y\n").exit_code == 0
    remaining = {c["tinker_path"] for c in cli.json("checkpoint", "list", "--run-id", trainer.model_id)["checkpoints"]}
    assert not remaining & set(extra)
    missing = cli("checkpoint", "delete", "-y", extra[0], "--format", "json")
    assert missing.exit_code == 1
    assert json.loads(missing.stdout)["results"][0]["deleted"] is False
    assert "1 of 1 deletions failed" in missing.stderr


def test_sample_streams_text_as_it_is_generated(cli, trained, monkeypatch, tmp_path):
    _, _, state, sampler, _ = trained
    import tinkex.cli_commands as commands

    pieces: list[str] = []
    real_echo = click.echo

    def recording_echo(message=None, nl=True, **kwargs):
        if not nl and message:
            pieces.append(message)
        return real_echo(message, nl=nl, **kwargs)

    monkeypatch.setattr(commands.click, "echo", recording_echo)
    args = ["--max-tokens", "12", "--temperature", "0"]
    streamed = cli("sample", MODEL, "once upon a time", *args)
    assert streamed.exit_code == 0, streamed.output
    assert len(pieces) > 1  # printed piece by piece, not at the end
    assert streamed.stdout.rstrip("\n") == "".join(pieces)
    # the same greedy sample through the SDK (--format json) gives the same text, plus tokens
    sdk = cli.json("sample", MODEL, "once upon a time", *args)
    assert sdk["samples"][0]["text"] == "".join(pieces) and len(sdk["samples"][0]["tokens"]) <= 12
    # from checkpoints: sampler weights, and a training state
    for path in (sampler, state):
        out = cli.json("sample", path, "hello", "--max-tokens", "4", "-n", "2")
        assert len(out["samples"]) == 2
        assert cli("sample", path, "hello", "--max-tokens", "4").exit_code == 0
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("once upon a time")
    from_file = cli("sample", MODEL, "--prompt-file", str(prompt), *args)
    assert from_file.stdout == streamed.stdout
    assert cli("sample", MODEL).exit_code == 2  # no prompt


def test_errors_are_short_and_have_exit_codes(cli, server):
    missing = cli("run", "info", "no-such-run")
    assert missing.exit_code == 1 and missing.output.startswith("Error: not found")
    assert "Traceback" not in missing.output
    bad_path = cli("checkpoint", "info", "not-a-tinker-path")
    assert bad_path.exit_code == 2 and "tinker://" in bad_path.output
    wrong_key = Cli(server.base_url, "tml-not-a-known-key-000000")("run", "list")
    assert wrong_key.exit_code == 1 and "refused the API key" in wrong_key.output
    nowhere = Cli(f"http://127.0.0.1:{free_port()}")("--timeout", "20", "model", "list")
    assert nowhere.exit_code == 1 and "cannot reach the server" in nowhere.output
    debug = cli.runner.invoke(main, ["--base-url", server.base_url, "--api-key", ALICE, "--debug", "run", "info",
                                     "no-such-run"])
    assert debug.exit_code == 1 and isinstance(debug.exception, types.NotFoundError)  # the traceback, on request
    unknown = cli("checkpoint", "frobnicate")
    assert unknown.exit_code == 2
