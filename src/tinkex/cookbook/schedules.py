"""Learning-rate schedules: a multiplier of the base rate for each step."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine"]


def lr_multiplier(schedule: Schedule | str, step: int, total_steps: int, warmup_steps: int = 0,
                  final_fraction: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps`, then `schedule` from 1 down to `final_fraction` at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r} (constant, linear, cosine)")
    return final_fraction + (1.0 - final_fraction) * shape
