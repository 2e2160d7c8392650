"""DPO through forward_backward_custom against a frozen reference: the chosen-vs-rejected margin grows."""

from __future__ import annotations

import json

from tinkex.cookbook import preference
from tinkex.cookbook.data import shipped_dataset, split_train_test
from tinkex.cookbook.metrics_log import read_metrics


def test_dpo_increases_the_margin(service_client, tmp_path):
    pairs = preference.load_preference_pairs(shipped_dataset("preferences.jsonl"))
    train, test = split_train_test(pairs, 16, seed=0)
    config = preference.DPOConfig(log_dir=str(tmp_path), batch_size=16, learning_rate=3e-3, max_steps=12,
                                  num_epochs=5, eval_every=6, save_every=0, quiet=True)
    result = preference.train(config, train, test, service_client=service_client)

    rows = read_metrics(tmp_path)
    steps = [r for r in rows if "dpo_loss" in r]
    assert len(steps) == 12
    # At the start the policy IS the reference: margin 0, loss log 2.
    assert abs(steps[0]["margin"]) < 1e-3 and abs(steps[0]["dpo_loss"] - 0.6931) < 1e-3
    final = rows[-1]
    assert final["train/margin"] > 1.0 and final["train/accuracy"] > 0.7, final
    initial_test = next(r for r in rows if "test/margin" in r)
    assert abs(initial_test["test/margin"]) < 1e-3
    assert final["test/margin"] > initial_test["test/margin"] + 0.3, final
    assert min(r["dpo_loss"] for r in steps[-4:]) < 0.65
    # The reference was saved once and is reused on resume.
    assert json.loads((tmp_path / "reference.json").read_text())["sampler_path"].startswith("tinker://")
    assert result.final_step == 12
