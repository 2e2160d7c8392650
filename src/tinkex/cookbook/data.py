"""Supervised data: JSONL conversations -> rendered (tokens, weights) examples -> shuffled batches.

A conversations file has one JSON object per line: {"messages": [{"role": ..., "content": ...}, ...]}.
Batches are a pure function of (seed, batch index): epoch e is a permutation seeded by (seed, e),
so a resumed run sees exactly the batches it would have seen without stopping.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .renderers import Message, Renderer, TrainOnWhat


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as handle:
        for n, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
    return rows


def shipped_dataset(name: str) -> Path:
    """Path of a data file shipped with the cookbook (tinkex/cookbook/datasets/<name>)."""
    path = Path(str(resources.files("tinkex.cookbook.datasets").joinpath(name)))
    if not path.exists():
        raise FileNotFoundError(f"no shipped dataset {name!r} in {path.parent}")
    return path


def load_conversations(path: str | Path) -> list[list[Message]]:
    conversations = []
    for n, row in enumerate(load_jsonl(path), 1):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                       for m in messages):
            raise ValueError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        conversations.append(messages)
    return conversations


def split_train_test(items: Sequence[Any], test_size: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """A seeded shuffle, then the first `test_size` items are held out."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    test = [items[i] for i in order[:test_size]]
    train = [items[i] for i in order[test_size:]]
    return train, test


@dataclass
class Example:
    tokens: list[int]
    weights: list[float]

    @property
    def num_loss_tokens(self) -> float:
        return float(sum(self.weights[1:]))


def render_examples(renderer: Renderer, conversations: Iterable[Sequence[Message]],
                    train_on_what: TrainOnWhat | str = TrainOnWhat.ALL_ASSISTANT_MESSAGES,
                    max_length: int | None = None) -> list[Example]:
    """Render and truncate to `max_length` tokens; examples left with nothing to learn are dropped."""
    examples = []
    for messages in conversations:
        tokens, weights = renderer.build_supervised_example(messages, train_on_what)
        if max_length is not None:
            tokens, weights = tokens[:max_length], weights[:max_length]
        if len(tokens) >= 2 and sum(weights[1:]) > 0:
            examples.append(Example(tokens, weights))
    return examples


class SupervisedDataset:
    """Fixed-size batches over examples, reshuffled every epoch; the last partial batch is dropped."""

    def __init__(self, examples: Sequence[Example], batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if not examples:
            raise ValueError("the dataset is empty")
        self.examples = list(examples)
        self.batch_size = min(batch_size, len(self.examples))
        self.seed = seed
        self.shuffle = shuffle

    @property
    def batches_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def get_batch(self, index: int) -> list[Example]:
        epoch, within = divmod(index, self.batches_per_epoch)
        order = self._order(epoch)
        return [self.examples[i] for i in order[within * self.batch_size:(within + 1) * self.batch_size]]
