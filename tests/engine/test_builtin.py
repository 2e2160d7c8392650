"""The built-in model: shipped tokenizer, deterministic weights, materialized into an HF cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinkex.engine import builtin

from .conftest import M, V

REPO = Path(__file__).resolve().parents[2]


def test_materialize_layout_and_idempotence(tmp_path):
    cache = tmp_path / "hub"
    snapshot = builtin.materialize(cache)
    repo = cache / "models--tinkex--tiny-qwen3"
    revision = (repo / "refs" / "main").read_text()
    assert len(revision) == 40 and int(revision, 16) >= 0
    assert snapshot == repo / "snapshots" / revision
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(snapshot))
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    mtime = (snapshot / "model.safetensors").stat().st_mtime_ns
    assert builtin.materialize(cache) == snapshot
    assert (snapshot / "model.safetensors").stat().st_mtime_ns == mtime  # not rebuilt


def test_materialize_repairs_a_damaged_snapshot(tmp_path):
    snapshot = builtin.materialize(tmp_path)
    (snapshot / "model.safetensors").unlink()
    assert builtin.materialize(tmp_path) == snapshot
    assert load_file(snapshot / "model.safetensors")


def test_weights_are_deterministic(tmp_path):
    first = load_file(builtin.materialize(tmp_path / "one") / "model.safetensors")
    second = load_file(builtin.materialize(tmp_path / "two") / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    # ... and seeding the init did not disturb the caller's random stream
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    builtin.materialize(tmp_path / "three")
    assert torch.equal(torch.rand(3), expected)


def test_concurrent_materialize_is_safe(tmp_path):
    results, errors = [], []

    def run():
        try:
            results.append(builtin.materialize(tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    weights = load_file(results[0] / "model.safetensors")
    reference = load_file(builtin.materialize(tmp_path / "alone") / "model.safetensors")
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
    assert not [p for p in results[0].parents[1].iterdir() if p.name.startswith(".")]


def test_any_process_loads_it_by_name_offline(engine, engine_hf_home):
    """What the official SDK does: AutoTokenizer.from_pretrained(name) in another process, with only
    HF_HOME and HF_HUB_OFFLINE set."""
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({M!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({M!r})\n"
        "print(json.dumps({'vocab': len(tok), 'eos': tok.eos_token, 'arch': type(model).__name__,\n"
        "  'checksum': sum(float(p.double().sum()) for p in model.parameters())}))\n"
    )
    env = {**os.environ, "HF_HOME": str(engine_hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    model = engine._bases[M].model
    assert found["vocab"] == V and found["eos"] == "<|im_end|>" and found["arch"] == "Qwen3ForCausalLM"
    assert found["checksum"] == pytest.approx(sum(float(p.double().sum()) for p in model.parameters()), rel=1e-12)


def test_model_info(engine):
    (info,) = engine.model_infos()
    assert (info.name, info.arch, info.tokenizer_id, info.vocab_size) == (M, "Qwen3ForCausalLM", M, V)
    assert info.max_context_length == 8192
    assert engine.model_info(M) == info


def test_tokenizer(engine):
    tok = engine.tokenizer(M)
    assert len(tok) == V
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    text = "<|im_start|>user\nWhat is 12+7?<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\n19<|im_end|>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<think>") in ids and tok.convert_tokens_to_ids("</think>") in ids
    # <think> is an ordinary added token: kept whole even when special tokens are split
    assert tok.convert_tokens_to_ids("<think>") in tok.encode("<think>", split_special_tokens=True)
    # Qwen's split: digits one by one
    assert [tok.decode([i]) for i in tok.encode("12+7=19")] == ["1", "2", "+", "7", "=", "1", "9"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_shipped_tokenizer_matches_its_build_script():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_tokenizer.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_interface_types_import_without_torch():
    code = ("import sys\nfrom tinkex.engine import EngineError, ForwardBackwardJob, SampleJob\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "from tinkex.engine import Engine\nassert 'torch' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
