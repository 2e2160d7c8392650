"""The reinforcement-learning loop: groups of rollouts per prompt, group-centred advantages,
importance_sampling or ppo, and fresh sampler weights after every step.

    for step:
        rollouts   <- sampler_k samples group_size replies per prompt; envs give rewards
        advantages <- reward - mean(reward of its group)           (constant groups are dropped)
        datums     <- prompt+reply tokens, sampler logprobs, advantages on the reply tokens
        forward_backward(datums, "importance_sampling" | "ppo"); optim_step
        sampler_k+1 <- save_weights_and_get_sampling_client()

With `off_policy_overlap=True`, the rollouts of step k+1 are sampled (in a background thread)
while step k trains, from the weights *before* step k's update: sampling and training overlap,
and the data is at most one step off-policy, which the importance ratio in the loss corrects.

Environments: an `Env` gives a prompt (token ids) and the stop sequences, and turns a sampled
reply into a reward (`step`); it may continue with a new observation for multi-turn episodes.
An `EnvGroupBuilder` makes the `group_size` envs that share one prompt, and an `RLDataset` gives
the builders of each batch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np
from rich.console import Console

from .checkpoints import save_checkpoint, start_run
from .metrics_log import MetricsLogger
from .schedules import lr_multiplier
from .sdk import BUILTIN_MODEL, make_datum, resolved, to_numpy


# ---- environments ---------------------------------------------------------------------------


@dataclass
class StepResult:
    reward: float
    episode_done: bool = True
    next_observation: list[int] | None = None  # the next prompt, for multi-turn episodes
    metrics: dict[str, float] = field(default_factory=dict)


class Env(Protocol):
    def initial_observation(self) -> list[int]: ...

    def stop_sequences(self) -> list[int] | list[str]: ...

    def step(self, action: list[int]) -> StepResult: ...


class EnvGroupBuilder(Protocol):
    def make_envs(self) -> Sequence[Env]: ...


class RLDataset(Protocol):
    def __len__(self) -> int: ...  # number of batches

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]: ...


@dataclass
class Transition:
    observation: list[int]
    action: list[int]
    logprobs: list[float]  # the sampler's, one per action token
    reward: float
    metrics: dict[str, float]


@dataclass
class Trajectory:
    transitions: list[Transition] = field(default_factory=list)

    @property
    def total_reward(self) -> float:
        return sum(t.reward for t in self.transitions)


# ---- rollouts -------------------------------------------------------------------------------


def do_rollouts(sampling_client: Any, builders: Sequence[EnvGroupBuilder], types: ModuleType, *,
                max_tokens: int, temperature: float = 1.0, seed: int | None = None) -> list[list[Trajectory]]:
    """Run every env of every group to the end. Envs of one group that are at the same
    observation are sampled by ONE request with num_samples = their count; all requests of a
    round are submitted before any is awaited, so the server can batch them."""
    groups = [list(builder.make_envs()) for builder in builders]
    trajectories = [[Trajectory() for _ in envs] for envs in groups]
    observations = {(g, i): env.initial_observation() for g, envs in enumerate(groups) for i, env in enumerate(envs)}
    turn = 0
    while observations:
        by_prompt: dict[tuple[int, tuple[int, ...]], list[tuple[int, int]]] = defaultdict(list)
        for (g, i), ob in observations.items():
            by_prompt[(g, tuple(ob))].append((g, i))
        requests = []
        for n, ((g, prompt), members) in enumerate(by_prompt.items()):
            stop = groups[g][members[0][1]].stop_sequences()
            request_seed = None if seed is None else (seed * 1_000_003 + turn * 10_007 + n) % (2**31)
            params = types.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop, seed=request_seed)
            future = sampling_client.sample(prompt=types.ModelInput.from_ints(list(prompt)), num_samples=len(members),
                                            sampling_params=params)
            requests.append((members, future))
        next_observations = {}
        for members, future in requests:
            for (g, i), seq in zip(members, future.result().sequences):
                action = list(seq.tokens)
                result = groups[g][i].step(action)
                logprobs = list(seq.logprobs) if seq.logprobs is not None else [0.0] * len(action)
                trajectories[g][i].transitions.append(
                    Transition(observations[(g, i)], action, logprobs, result.reward, dict(result.metrics)))
                if not result.episode_done and result.next_observation:
                    next_observations[(g, i)] = result.next_observation
        observations = next_observations
        turn += 1
    return trajectories


def group_advantages(group: Sequence[Trajectory]) -> list[float]:
    """Reward minus the group's mean reward."""
    rewards = np.array([t.total_reward for t in group], dtype=np.float64)
    return (rewards - rewards.mean()).tolist()


def trajectory_datums(types: ModuleType, trajectory: Trajectory, advantage: float) -> list[Any]:
    """One datum per transition: observation + action, with the sampler's logprobs and the
    advantage on the action tokens (zeros on the observation, which is not trained)."""
    datums = []
    for t in trajectory.transitions:
        if not t.action:
            continue
        tokens = t.observation + t.action
        zeros = [0.0] * len(t.observation)
        datums.append(make_datum(types, tokens, logprobs=zeros + t.logprobs,
                                 advantages=zeros + [advantage] * len(t.action)))
    return datums


# ---- the loop -------------------------------------------------------------------------------


@dataclass
class RLConfig:
    log_dir: str
    model_name: str = BUILTIN_MODEL
    lora_rank: int = 32
    seed: int = 0
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0  # linear lr warm-up; lets Adam's moments settle before full-size steps
    max_tokens: int = 16
    temperature: float = 1.0
    loss_fn: str = "importance_sampling"  # or "ppo"
    clip_low_threshold: float = 0.8  # ppo's ratio clip
    clip_high_threshold: float = 1.2
    max_steps: int | None = None  # default: every batch of the dataset
    remove_constant_reward_groups: bool = True  # their advantages are all zero
    off_policy_overlap: bool = False  # sample step k+1 while step k trains (one step off-policy)
    eval_every: int = 10  # run the evaluator every N steps (and at the end); 0: only at the end
    save_every: int = 20
    resume: bool = True
    load_checkpoint_path: str | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    table_every: int = 5
    show_progress: bool = True
    quiet: bool = False


@dataclass
class RLResult:
    training_client: Any
    sampling_client: Any
    start_step: int
    final_step: int
    state_path: str | None
    history: list[dict[str, Any]] = field(default_factory=list)


Evaluator = Callable[[Any], dict[str, float]]  # sampling client -> metrics


def train(config: RLConfig, dataset: RLDataset, *, service_client: Any = None, evaluator: Evaluator | None = None,
          console: Console | None = None) -> RLResult:
    service_client, types, log_dir, training_client, start_step = start_run(config, service_client)
    total_steps = len(dataset) if config.max_steps is None else min(len(dataset), config.max_steps)
    loss_config = ({"clip_low_threshold": config.clip_low_threshold, "clip_high_threshold": config.clip_high_threshold}
                   if config.loss_fn == "ppo" else None)

    def rollouts(sampler: Any, version: int, step: int) -> tuple[list[list[Trajectory]], int, float]:
        """The rollouts of batch `step`, sampled with the weights after `version` optimizer steps."""
        started = time.time()
        result = do_rollouts(sampler, dataset.get_batch(step), types, max_tokens=config.max_tokens,
                             temperature=config.temperature, seed=config.seed * 100_003 + step)
        return result, version, time.time() - started

    history: list[dict[str, Any]] = []
    sampler = resolved(training_client.save_weights_and_get_sampling_client())
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rl-rollouts")
    pending: Future | None = None
    if start_step < total_steps:
        pending = executor.submit(rollouts, sampler, start_step, start_step)
    with MetricsLogger(log_dir, total_steps, title="rl", headline="reward/mean", start_step=start_step,
                       table_every=config.table_every, console=console, show_progress=config.show_progress,
                       quiet=config.quiet,
                       table_keys=["reward/mean", "eval/train_accuracy", "env/correct", "frac_constant", "kl_sample_train",
                                   "off_policy"]) as log:
        try:
            for step in range(start_step, total_steps):
                started = time.time()
                metrics: dict[str, Any] = {}
                if evaluator is not None and config.eval_every > 0 and step % config.eval_every == 0:
                    metrics.update({f"eval/{k}": v for k, v in evaluator(sampler).items()})

                groups, version, sample_time = pending.result()
                # Overlap: start sampling the next batch now, with the weights from before this step's update.
                pending = None
                if config.off_policy_overlap and step + 1 < total_steps:
                    pending = executor.submit(rollouts, sampler, step, step + 1)

                # Advantages centred within each group; groups where every reward is equal teach nothing.
                data, kept, all_rewards, env_metrics = [], 0, [], defaultdict(list)
                for group in groups:
                    rewards = [t.total_reward for t in group]
                    all_rewards += rewards
                    for trajectory in group:
                        for t in trajectory.transitions:
                            for k, v in t.metrics.items():
                                env_metrics[k].append(v)
                    if config.remove_constant_reward_groups and max(rewards) == min(rewards):
                        continue
                    kept += 1
                    for trajectory, advantage in zip(group, group_advantages(group)):
                        data += trajectory_datums(types, trajectory, advantage)

                lr = config.learning_rate * lr_multiplier(config.lr_schedule, step, total_steps, config.warmup_steps)
                num_tokens = sum(len(d.model_input.to_ints()) for d in data)
                if data:
                    fb_future = training_client.forward_backward(data, config.loss_fn, loss_config)
                    optim_future = training_client.optim_step(types.AdamParams(
                        learning_rate=lr, beta1=config.adam_beta1, beta2=config.adam_beta2, eps=config.adam_eps))
                    fb = fb_future.result()
                    optim_future.result()
                    metrics.update(_policy_metrics(data, fb))
                    metrics["loss"] = float(fb.metrics.get("loss:sum", 0.0))

                # On-policy sampling for the next step uses the weights we just produced.
                sampler = resolved(training_client.save_weights_and_get_sampling_client())
                if not config.off_policy_overlap and step + 1 < total_steps:
                    pending = executor.submit(rollouts, sampler, step + 1, step + 1)

                elapsed = time.time() - started
                metrics.update({
                    "reward/mean": float(np.mean(all_rewards)),
                    "reward/max": float(np.max(all_rewards)),
                    "frac_constant": 1.0 - kept / max(len(groups), 1),
                    "num_datums": len(data),
                    "num_tokens": num_tokens,
                    "tokens_per_s": num_tokens / max(elapsed, 1e-9),
                    "sample_time": sample_time,
                    "step_time": elapsed,
                    "lr": lr,
                    "off_policy": step - version,  # optimizer steps between sampling and training
                    **{f"env/{k}": float(np.mean(v)) for k, v in env_metrics.items()},
                })
                log.log(step, metrics)
                history.append({"step": step, **metrics})
                if config.save_every > 0 and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                    save_checkpoint(training_client, log_dir, step + 1, kind="state")
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

        final: dict[str, Any] = {"final": True}
        if evaluator is not None:
            final.update({f"eval/{k}": v for k, v in evaluator(sampler).items()})
        record = save_checkpoint(training_client, log_dir, total_steps, name="final", kind="both")
        log.log(total_steps, final)
        history.append({"step": total_steps, **final})
    return RLResult(training_client, sampler, start_step, total_steps, record.get("state_path"), history)


def _policy_metrics(data: Sequence[Any], fb: Any) -> dict[str, float]:
    """How far the learner's logprobs are from the sampler's on the trained tokens:
    kl_sample_train ~ E[sampler_lp - learner_lp] (about 0 on-policy; grows when off-policy)."""
    diffs = []
    for datum, output in zip(data, fb.loss_fn_outputs):
        learner = to_numpy(output["logprobs"]).reshape(-1)
        sampler = to_numpy(datum.loss_fn_inputs["logprobs"]).reshape(-1)
        mask = to_numpy(datum.loss_fn_inputs["advantages"]).reshape(-1) != 0
        if mask.any():
            diffs.append(sampler[mask] - learner[mask])
    if not diffs:
        return {}
    diff = np.concatenate(diffs)
    return {"kl_sample_train": float(diff.mean()), "max_abs_logprob_diff": float(np.abs(diff).max())}
