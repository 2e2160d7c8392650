"""The same core loop under the official SDK 0.25.0 (installed beside 0.38 by `make setup`), and under
0.38.0 with zstd-compressed forward_backward bodies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ALICE, start_server

SDK_025 = Path(__file__).resolve().parents[2] / ".venv-tinker025"
LOOP = Path(__file__).with_name("sdk_core_loop.py")


def run_core_loop(base_url: str, sdk_dir: Path | None) -> dict:
    env = dict(os.environ)
    if sdk_dir is not None:
        assert (sdk_dir / "tinker").is_dir(), f"{sdk_dir} is missing: run `make setup`"
        env["PYTHONPATH"] = str(sdk_dir)
    out = subprocess.run([sys.executable, str(LOOP), base_url, ALICE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["losses"][-1] < 0.5 * seen["losses"][0]
    assert seen["state"].endswith("/weights/core-loop")
    assert seen["sample"][0] == seen["sample"][1]  # greedy
    assert seen["first_logprob"] is None and seen["n_logprobs"] > 1
    assert abs(seen["resumed_loss"] - seen["final_loss"]) < 1e-3 * abs(seen["final_loss"]) + 1e-5
    return seen


@pytest.mark.parametrize("sdk_dir", [SDK_025, None], ids=["tinker-0.25.0", "tinker-0.38.0"])
def test_core_loop(server, sdk_dir):
    seen = run_core_loop(server.base_url, sdk_dir)
    assert seen["version"] == ("0.25.0" if sdk_dir else "0.38.0")


def test_core_loop_with_zstd_bodies(tmp_path, hf_home):
    compressed = start_server(tmp_path / "data", "--compress-forward-backward")
    try:
        run_core_loop(compressed.base_url, None)
    finally:
        compressed.stop()
