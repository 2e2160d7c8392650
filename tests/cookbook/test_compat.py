"""The same recipes against a standalone `tinkex serve`, driven by the official `tinker` SDK,
behave the same as with the tinkex SDK on the embedded server."""

from __future__ import annotations

import pytest

from tinkex.cookbook.metrics_log import read_metrics
from tinkex.cookbook.recipes import dpo, rl_arithmetic, sl_basic

from ..conftest import ALICE
from .conftest import KEY


def losses(log_dir, key):
    return [r[key] for r in read_metrics(log_dir) if key in r]


def test_sl_basic_same_losses_on_standalone_server_with_official_sdk(server, embedded, tmp_path):
    common = ["--steps", "6", "--batch-size", "8", "--test-size", "8", "--eval-every", "3", "--quiet", "--seed", "1"]
    assert sl_basic.main(["--log-dir", str(tmp_path / "official"), "--sdk", "tinker", "--base-url", server.base_url,
                          "--api-key", ALICE, *common]) == 0
    assert sl_basic.main(["--log-dir", str(tmp_path / "tinkex"), "--sdk", "tinkex", "--base-url", embedded.base_url,
                          "--api-key", KEY, *common]) == 0
    official, ours = losses(tmp_path / "official", "train/nll"), losses(tmp_path / "tinkex", "train/nll")
    assert len(official) == len(ours) == 6
    assert official == pytest.approx(ours, rel=1e-3)
    assert official[-1] < official[0]
    assert losses(tmp_path / "official", "test/nll") == pytest.approx(losses(tmp_path / "tinkex", "test/nll"), rel=1e-3)


def test_dpo_with_official_sdk(server, tmp_path):
    """forward_backward_custom and compute_logprobs through the official SDK."""
    assert dpo.main(["--log-dir", str(tmp_path), "--sdk", "tinker", "--base-url", server.base_url, "--api-key", ALICE,
                     "--steps", "4", "--test-size", "8", "--eval-every", "2", "--quiet"]) == 0
    rows = read_metrics(tmp_path)
    steps = [r for r in rows if "dpo_loss" in r]
    assert len(steps) == 4 and abs(steps[0]["margin"]) < 1e-3
    assert rows[-1]["train/margin"] > 0.1


def test_rl_with_official_sdk(server, tmp_path):
    """sample(num_samples=group), importance sampling / ppo, save_weights_and_get_sampling_client."""
    args = rl_arithmetic.parser().parse_args([
        "--log-dir", str(tmp_path), "--quiet", "--sdk", "tinker", "--base-url", server.base_url, "--api-key", ALICE,
        "--max-operand", "4", "--test-size", "0", "--warmup-answers", "random", "--warmup-steps", "20",
        "--steps", "3", "--groups-per-batch", "4", "--loss-fn", "ppo", "--off-policy-overlap", "--eval-every", "2"])
    result = rl_arithmetic.run(args)
    rows = [r for r in result.history if "reward/mean" in r]
    assert [r["off_policy"] for r in rows] == [0, 1, 1]
    assert "eval/train_accuracy" in rows[0]
    assert type(result.training_client).__module__.split(".")[0] == "tinker"  # the official SDK drove it
