"""The supervised loop on the embedded server: loss falls, metrics are logged, and a run that
stops resumes from its last checkpoint exactly where an uninterrupted run would be."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinkex.cookbook import supervised
from tinkex.cookbook.checkpoints import get_last_checkpoint, load_checkpoints
from tinkex.cookbook.data import SupervisedDataset, load_conversations, shipped_dataset, split_train_test
from tinkex.cookbook.datasets import build
from tinkex.cookbook.metrics_log import read_metrics
from tinkex.cookbook.schedules import lr_multiplier


@pytest.fixture(scope="module")
def conversations():
    return split_train_test(load_conversations(shipped_dataset("conversations.jsonl")), 16, seed=0)


def test_shipped_data_is_reproducible():
    assert build.main(["--check"]) == 0


def test_loss_falls_and_metrics_are_logged(service_client, conversations, tmp_path, capsys):
    train, test = conversations
    config = supervised.SLConfig(log_dir=str(tmp_path), batch_size=16, learning_rate=1e-2, max_steps=24,
                                 num_epochs=100, eval_every=12, save_every=0, table_every=6)
    result = supervised.train(config, train, test, service_client=service_client)

    rows = read_metrics(tmp_path)
    steps = [r for r in rows if "train/nll" in r]
    assert [r["step"] for r in steps] == list(range(24))
    nll = [r["train/nll"] for r in steps]
    assert np.mean(nll[-4:]) < nll[0] - 2.0, nll
    held_out = [r["test/nll"] for r in rows if "test/nll" in r]
    assert len(held_out) == 3 and held_out[-1] < held_out[0] - 2.0, held_out
    for row in steps:
        assert row["tokens_per_s"] > 0 and row["num_tokens"] > 0 and row["lr"] > 0
    # The linear schedule: lr decays step by step.
    assert steps[0]["lr"] == pytest.approx(1e-2) and steps[-1]["lr"] < steps[1]["lr"]
    # The final checkpoint has both training state and sampler weights.
    final = get_last_checkpoint(tmp_path)
    assert final["name"] == "final" and final["step"] == 24
    assert final["state_path"].startswith("tinker://") and final["sampler_path"].startswith("tinker://")
    assert result.test_nll == pytest.approx(held_out[-1])
    # The console table and progress bar.
    out = capsys.readouterr().out
    assert "train/nll" in out and "test/nll" in out and "steps" in out and "tok/s" in out
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 1e-2


def test_resume_continues_from_the_last_checkpoint(service_client, conversations, tmp_path):
    train, _ = conversations
    common = dict(batch_size=8, learning_rate=5e-3, lr_schedule="cosine", num_epochs=100, eval_every=0,
                  quiet=True, seed=3)

    # The reference: 8 steps without stopping.
    straight = supervised.train(supervised.SLConfig(log_dir=str(tmp_path / "straight"), max_steps=8, save_every=0,
                                                    **common), train, service_client=service_client)
    assert straight.start_step == 0

    # A run that checkpoints every 3 steps and "crashes" after step 5, before its final save.
    run_dir = tmp_path / "interrupted"
    supervised.train(supervised.SLConfig(log_dir=str(run_dir), max_steps=8, save_every=3, **common), train,
                     service_client=service_client)
    records = load_checkpoints(run_dir)
    assert [r["step"] for r in records] == [3, 6, 8]
    # Keep only what a crash during step 6 would have left behind: the checkpoint at step 3.
    (run_dir / "checkpoints.jsonl").write_text(json.dumps(records[0]) + "\n")
    metrics_file = run_dir / "metrics.jsonl"
    metrics_file.write_text("".join(line + "\n" for line in metrics_file.read_text().splitlines()[:5]))

    resumed = supervised.train(supervised.SLConfig(log_dir=str(run_dir), max_steps=8, save_every=3, **common), train,
                               service_client=service_client)
    assert resumed.start_step == 3 and resumed.final_step == 8

    def losses(directory):
        return {r["step"]: r["train/nll"] for r in read_metrics(directory) if "train/nll" in r}

    reference, continued = losses(tmp_path / "straight"), losses(run_dir)
    assert sorted(continued) == list(range(8))
    # Same data order, same weights and same Adam moments: the resumed steps match the straight run.
    for step in range(3, 8):
        assert continued[step] == pytest.approx(reference[step], rel=1e-3, abs=1e-4), (step, continued, reference)


class _Recording:
    """A training client that notes when each forward_backward is sent and when its result is awaited."""

    def __init__(self, client, events: list[str]):
        self._client, self._events, self._sent = client, events, 0

    def forward_backward(self, *args, **kwargs):
        index, self._sent = self._sent, self._sent + 1
        self._events.append(f"send {index}")
        future, events = self._client.forward_backward(*args, **kwargs), self._events

        class Recorded:
            def result(self, *a, **k):
                events.append(f"wait {index}")
                return future.result(*a, **k)
        return Recorded()

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_steps_are_pipelined_and_compute_what_one_at_a_time_does(service_client, conversations, tmp_path,
                                                                  monkeypatch):
    """Step N+1 is sent before step N is awaited, and every step's loss is the one-at-a-time loop's."""
    train, _ = conversations
    events: list[str] = []
    start_run = supervised.start_run

    def recording_start(config, client):
        client, types, log_dir, training_client, start = start_run(config, client)
        return client, types, log_dir, _Recording(training_client, events), start

    monkeypatch.setattr(supervised, "start_run", recording_start)
    losses = {}
    for ahead in (0, 1):
        events.clear()
        config = supervised.SLConfig(log_dir=str(tmp_path / str(ahead)), batch_size=8, learning_rate=5e-3,
                                     max_steps=6, num_epochs=100, eval_every=0, save_every=3, quiet=True,
                                     submit_ahead=ahead)
        supervised.train(config, train, service_client=service_client)
        losses[ahead] = [r["train/nll"] for r in read_metrics(tmp_path / str(ahead)) if "train/nll" in r]
        if ahead == 0:
            assert events[:4] == ["send 0", "wait 0", "send 1", "wait 1"]
        else:  # ahead by one; the checkpoint after step 3 waits for everything sent
            assert events == ["send 0", "send 1", "wait 0", "send 2", "wait 1", "wait 2",
                              "send 3", "send 4", "wait 3", "send 5", "wait 4", "wait 5"]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)


def test_batches_are_a_function_of_seed_and_index():
    from tinkex.cookbook.data import Example

    examples = [Example([i, i + 1], [0.0, 1.0]) for i in range(10)]
    a, b = SupervisedDataset(examples, 3, seed=1), SupervisedDataset(examples, 3, seed=1)
    assert a.batches_per_epoch == 3
    assert [[e.tokens[0] for e in a.get_batch(i)] for i in range(7)] == \
           [[e.tokens[0] for e in b.get_batch(i)] for i in range(7)]
    epoch0 = {e.tokens[0] for i in range(3) for e in a.get_batch(i)}
    assert len(epoch0) == 9  # no repeats within an epoch


def test_lr_schedules():
    assert lr_multiplier("constant", 5, 10) == 1.0
    assert lr_multiplier("linear", 0, 10) == 1.0 and lr_multiplier("linear", 10, 10) == 0.0
    assert lr_multiplier("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_multiplier("linear", 0, 10, warmup_steps=4) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        lr_multiplier("exponential", 1, 10)
