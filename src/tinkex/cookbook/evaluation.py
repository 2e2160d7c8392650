"""Evaluations: held-out NLL through `forward`, and graded answers through sampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .data import Example
from .renderers import Message, Renderer
from .sdk import make_datum


def held_out_nll(training_client: Any, examples: Sequence[Example], types: ModuleType, chunk: int = 64) -> float:
    """Mean negative log-likelihood per weighted token of `examples` under the current weights
    (a forward pass only: no gradients, no optimizer state touched)."""
    total_loss, total_weight = 0.0, 0.0
    futures = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        data = [make_datum(types, e.tokens, weights=e.weights) for e in part]
        futures.append((training_client.forward(data, "cross_entropy"), sum(e.num_loss_tokens for e in part)))
    for future, weight in futures:
        total_loss += float(future.result().metrics["loss:sum"])
        total_weight += weight
    return total_loss / max(total_weight, 1e-9)


@dataclass
class Graded:
    prompt: str
    expected: str
    reply: str
    correct: bool
    ended: bool  # the reply ended with a stop sequence (not cut off by max_tokens)


def graded_replies(sampling_client: Any, renderer: Renderer, problems: Sequence[tuple[Sequence[Message], str]],
                   types: ModuleType, grade: Callable[[str, str], bool] | None = None,
                   max_tokens: int = 16, temperature: float = 0.0, seed: int = 0) -> list[Graded]:
    """Sample one reply per problem (greedy by default) and grade it. A problem is
    (prompt messages, expected answer); `grade(reply, expected)` defaults to exact match."""
    grade = grade or (lambda reply, expected: reply.strip() == expected.strip())
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                  stop=renderer.get_stop_sequences())
    futures = [sampling_client.sample(prompt=types.ModelInput.from_ints(renderer.build_generation_prompt(messages)),
                                      num_samples=1, sampling_params=params)
               for messages, _ in problems]
    results = []
    for (messages, expected), future in zip(problems, futures):
        message, ended = renderer.parse_response(future.result().sequences[0].tokens)
        reply = message["content"]
        results.append(Graded(messages[-1]["content"], expected, reply, ended and grade(reply, expected), ended))
    return results


def accuracy(results: Sequence[Graded]) -> float:
    return sum(r.correct for r in results) / max(len(results), 1)
