"""Builds the small data sets the cookbook ships, deterministically, from the word lists below.

    python -m tinkex.cookbook.datasets.build           # rewrite conversations.jsonl, preferences.jsonl
    python -m tinkex.cookbook.datasets.build --check   # fail if the shipped files differ from a rebuild

The assistant, "Pip", is short and plain. `conversations.jsonl` teaches it a handful of skills
(greetings, sums, opposites, colours, next-day, counting, spelling backwards, remembering a name,
obeying a one-word system prompt); `preferences.jsonl` pairs a good reply with a worse one for
the same prompt (a wrong sum, a wrong opposite, a rude greeting, ignoring the system prompt).
All text here was written for this project.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
SEED = 20240601

GREETINGS = ["Hi!", "Hello!", "Hey there.", "Good morning!", "Hi Pip.", "Hello, who are you?"]
GREETING_REPLIES = ["Hello! I am Pip. How can I help?", "Hi! I am Pip. What do you need?"]
RUDE_REPLIES = ["What do you want?", "Go away.", "Not now."]
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "old": "new",
             "happy": "sad", "open": "closed", "left": "right", "wet": "dry", "light": "dark",
             "early": "late", "full": "empty", "hard": "soft", "loud": "quiet", "in": "out"}
COLOURS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
           "a tomato": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a leaf": "green",
           "the sea": "blue", "a strawberry": "red"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Mo",
         "Nia", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vera", "Wen", "Yuri", "Zoe"]
WORDS = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "bird", "fish", "tree", "book", "star",
         "lamp", "rain", "milk", "door", "frog", "leaf", "ship"]
ONE_WORD_SYSTEM = "Answer in one word."


def _sum_question(rng: random.Random, a: int, b: int) -> str:
    return rng.choice([f"What is {a}+{b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.", f"{a}+{b}=?"])


def conversations(rng: random.Random) -> list[dict]:
    rows: list[list[dict]] = []

    def chat(*turns: tuple[str, str], system: str | None = None) -> None:
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": role, "content": text} for role, text in turns]
        rows.append(messages)

    for greeting in GREETINGS:
        chat(("user", greeting), ("assistant", rng.choice(GREETING_REPLIES)))
    for _ in range(60):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        chat(("user", _sum_question(rng, a, b)), ("assistant", f"{a}+{b}={a + b}."))
    for word, opposite in OPPOSITES.items():
        chat(("user", rng.choice([f"What is the opposite of {word}?", f"Opposite of {word}?"])),
             ("assistant", f"The opposite of {word} is {opposite}."))
    for thing, colour in COLOURS.items():
        chat(("user", f"What colour is {thing}?"), ("assistant", f"{thing[0].upper() + thing[1:]} is {colour}."))
        chat(("user", f"What colour is {thing}?"), ("assistant", f"{colour[0].upper() + colour[1:]}."),
             system=ONE_WORD_SYSTEM)
    for i, day in enumerate(DAYS):
        nxt = DAYS[(i + 1) % 7]
        chat(("user", f"What day comes after {day}?"), ("assistant", f"{nxt} comes after {day}."))
    for _ in range(20):
        n = rng.randint(2, 7)
        chat(("user", f"Count to {n}."), ("assistant", ", ".join(str(k) for k in range(1, n + 1)) + "."))
    for word in WORDS:
        chat(("user", f"Spell {word} backwards."), ("assistant", "-".join(reversed(word)) + "."))
    for name in NAMES:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        chat(("user", f"My name is {name}."), ("assistant", f"Nice to meet you, {name}!"),
             ("user", rng.choice(["What is my name?", "Do you remember my name?"])),
             ("assistant", f"Your name is {name}."))
        if rng.random() < 0.5:
            chat(("user", f"Hi, I am {name}. What is {a}+{b}?"), ("assistant", f"Hi {name}! {a}+{b}={a + b}."))
    rng.shuffle(rows)
    return [{"messages": messages} for messages in rows]


def preferences(rng: random.Random) -> list[dict]:
    rows: list[dict] = []

    def pair(prompt: list[dict], chosen: str, rejected: str, kind: str) -> None:
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind})

    for _ in range(70):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = a + b + rng.choice([-2, -1, 1, 2, 3])
        if wrong < 0:
            wrong = a + b + 1
        pair([{"role": "user", "content": _sum_question(rng, a, b)}], f"{a}+{b}={a + b}.", f"{a}+{b}={wrong}.", "sum")
    for word, opposite in OPPOSITES.items():
        wrong = rng.choice([w for w in OPPOSITES.values() if w != opposite])
        pair([{"role": "user", "content": f"What is the opposite of {word}?"}],
             f"The opposite of {word} is {opposite}.", f"The opposite of {word} is {wrong}.", "opposite")
        pair([{"role": "user", "content": f"Opposite of {word}?"}],
             f"The opposite of {word} is {opposite}.", f"The opposite of {word} is {word}.", "opposite")
    for greeting in GREETINGS:
        for reply in GREETING_REPLIES:
            pair([{"role": "user", "content": greeting}], reply, rng.choice(RUDE_REPLIES), "tone")
    for thing, colour in COLOURS.items():
        pair([{"role": "system", "content": ONE_WORD_SYSTEM}, {"role": "user", "content": f"What colour is {thing}?"}],
             f"{colour[0].upper() + colour[1:]}.", f"I think that {thing} is usually {colour}, as far as I know.",
             "one_word")
        wrong = rng.choice([c for c in sorted(set(COLOURS.values())) if c != colour])
        pair([{"role": "user", "content": f"What colour is {thing}?"}],
             f"{thing[0].upper() + thing[1:]} is {colour}.", f"{thing[0].upper() + thing[1:]} is {wrong}.", "colour")
    for i, day in enumerate(DAYS):
        pair([{"role": "user", "content": f"What day comes after {day}?"}],
             f"{DAYS[(i + 1) % 7]} comes after {day}.", f"{DAYS[(i + 3) % 7]} comes after {day}.", "day")
    rng.shuffle(rows)
    return rows


def render() -> dict[str, str]:
    files = {}
    for name, build in (("conversations.jsonl", conversations), ("preferences.jsonl", preferences)):
        rows = build(random.Random(f"{SEED}:{name}"))
        files[name] = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path} ({text.count(chr(10))} rows)")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python -m tinkex.cookbook.datasets.build)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
