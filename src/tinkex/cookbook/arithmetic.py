"""Small-number arithmetic: the problems, a grader, and the RL environment.

A problem is `What is 3+4?` with the answer `7`. With operands 0..9 and `+` there are 100
problems; a seeded split holds some out, so scores on them measure what was *learned*, not what
was memorised: those exact prompts never appear in training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .renderers import Message, Renderer
from .rl import StepResult

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "max": max}


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str = "+"

    @property
    def question(self) -> str:
        if self.op == "max":
            return f"Which is larger, {self.a} or {self.b}?"
        return f"What is {self.a}{self.op}{self.b}?"

    @property
    def answer(self) -> str:
        return str(OPS[self.op](self.a, self.b))

    def prompt(self, system: str | None = None) -> list[Message]:
        messages: list[Message] = [Message(role="system", content=system)] if system else []
        return messages + [Message(role="user", content=self.question)]

    def conversation(self, reply: str | None = None) -> list[Message]:
        return self.prompt() + [Message(role="assistant", content=self.answer if reply is None else reply)]


def all_problems(max_operand: int = 9, ops: Sequence[str] = ("+",)) -> list[Problem]:
    """Every problem with operands 0..max_operand: no negative differences, no ties for max."""
    problems = [Problem(a, b, op) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)]
    return [p for p in problems if (p.op != "-" or p.a >= p.b) and (p.op != "max" or p.a != p.b)]


def split_problems(problems: Sequence[Problem], n_test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out): a seeded shuffle, the first `n_test` are held out."""
    order = list(problems)
    random.Random(seed).shuffle(order)
    return order[n_test:], order[:n_test]


INTEGER = re.compile(r"-?\d+")


def is_integer(reply: str) -> bool:
    return INTEGER.fullmatch(reply.strip()) is not None


def grade(reply: str, expected: str) -> bool:
    return is_integer(reply) and int(reply.strip()) == int(expected)


# ---- RL -------------------------------------------------------------------------------------


class ArithmeticEnv:
    """One attempt at one problem.

    Reward: 1 for the right number. With `partial_credit` (a distance `d` > 0 from the answer
    earns `max(0, 1 - d / partial_credit)`), a near miss earns something, which gives every group
    a learning signal long before exact answers are common. A reply that is not a bare integer
    ending the turn earns `-format_coef`."""

    def __init__(self, problem: Problem, renderer: Renderer, format_coef: float = 0.1, partial_credit: float = 0.0):
        self.problem, self.renderer, self.format_coef = problem, renderer, format_coef
        self.partial_credit = partial_credit

    def initial_observation(self) -> list[int]:
        return self.renderer.build_generation_prompt(self.problem.prompt())

    def stop_sequences(self):
        return self.renderer.get_stop_sequences()

    def step(self, action: list[int]) -> StepResult:
        message, ended = self.renderer.parse_response(action)
        well_formed = ended and is_integer(message["content"])
        if not well_formed:
            return StepResult(reward=-self.format_coef, metrics={"correct": 0.0, "well_formed": 0.0})
        distance = abs(int(message["content"].strip()) - int(self.problem.answer))
        reward = 1.0 if distance == 0 else 0.0
        if distance and self.partial_credit > 0:
            reward = max(0.0, 1.0 - distance / self.partial_credit)
        return StepResult(reward=reward, metrics={"correct": float(distance == 0), "well_formed": 1.0,
                                                  "abs_error": float(distance)})


@dataclass
class ArithmeticGroup:
    problem: Problem
    renderer: Renderer
    group_size: int
    format_coef: float = 0.1
    partial_credit: float = 0.0

    def make_envs(self) -> list[ArithmeticEnv]:
        return [ArithmeticEnv(self.problem, self.renderer, self.format_coef, self.partial_credit)
                for _ in range(self.group_size)]


class ArithmeticDataset:
    """`num_batches` batches of `groups_per_batch` problems drawn (seeded) from `problems`."""

    def __init__(self, problems: Sequence[Problem], renderer: Renderer, *, groups_per_batch: int, group_size: int,
                 num_batches: int, seed: int = 0, format_coef: float = 0.1, partial_credit: float = 0.0):
        self.problems, self.renderer = list(problems), renderer
        self.groups_per_batch, self.group_size, self.num_batches = groups_per_batch, group_size, num_batches
        self.seed, self.format_coef, self.partial_credit = seed, format_coef, partial_credit

    def __len__(self) -> int:
        return self.num_batches

    def get_batch(self, index: int) -> list[ArithmeticGroup]:
        rng = random.Random(f"{self.seed}:{index}")
        chosen = rng.sample(self.problems, min(self.groups_per_batch, len(self.problems)))
        return [ArithmeticGroup(p, self.renderer, self.group_size, self.format_coef, self.partial_credit)
                for p in chosen]
