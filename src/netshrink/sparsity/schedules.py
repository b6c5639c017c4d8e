"""When to prune: one-shot, iterative (k rounds of prune then fine-tune), gradual cubic (Zhu and Gupta 2017)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.finetune import StepHook, TrainFn
from netshrink.sparsity.magnitude import Magnitude, check_sparsity, magnitude_prune


@dataclass
class OneShot:
    """Prune once to the target, then fine-tune `finetune_steps` (0: no recovery)."""

    finetune_steps: int = 0


@dataclass
class Iterative:
    """`rounds` rounds; round r prunes to 1 - (1 - s)^(r / rounds) then fine-tunes `finetune_steps`."""

    rounds: int = 3
    finetune_steps: int = 100


@dataclass
class Gradual:
    """Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - (t - t0) / (t1 - t0))^3, pruning every `frequency` steps."""

    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0
    total_steps: int | None = None


def iterative_targets(final: float, rounds: int) -> list[float]:
    """Sparsity after each round such that every round removes the same fraction of the weights still left."""
    if rounds < 1:
        raise NetshrinkError(f"rounds must be >= 1, got {rounds}", where="Iterative.rounds")
    return [1.0 - (1.0 - final) ** (r / rounds) for r in range(1, rounds + 1)]


def cubic_sparsity(step: int, final: float, schedule: Gradual) -> float:
    """The sparsity Zhu and Gupta's cubic schedule asks for at `step` (flat before start, `final` after end)."""
    if step <= schedule.start_step:
        return schedule.initial_sparsity if step == schedule.start_step else 0.0
    if step >= schedule.end_step:
        return final
    progress = (step - schedule.start_step) / (schedule.end_step - schedule.start_step)
    return final + (schedule.initial_sparsity - final) * (1.0 - progress) ** 3


class GradualPruner:
    """Call `.step(t)` from any training loop after the optimizer step: it re-prunes on the cubic schedule."""

    def __init__(self, model: nn.Module, config: Magnitude, schedule: Gradual, **importance_kwargs) -> None:
        config.validate()
        check_sparsity(schedule.initial_sparsity, "Gradual.initial_sparsity")
        if schedule.end_step <= schedule.start_step or schedule.frequency < 1:
            raise NetshrinkError("need end_step > start_step and frequency >= 1", where="Gradual")
        self.model, self.config, self.schedule = model, config, schedule
        self.importance_kwargs = importance_kwargs
        self.history: list[tuple[int, float]] = []

    def step(self, t: int) -> None:
        """Re-prune at `t` if it falls on the schedule's grid between start_step and end_step (inclusive)."""
        s = self.schedule
        on_grid = s.start_step <= t <= s.end_step and ((t - s.start_step) % s.frequency == 0 or t == s.end_step)
        if not on_grid:
            return
        target = cubic_sparsity(t, self.config.sparsity, s)
        if target <= (self.history[-1][1] if self.history else 0.0):
            return
        magnitude_prune(self.model, dataclasses.replace(self.config, sparsity=target), **self.importance_kwargs)
        self.history.append((t, target))


def run_schedule(model: nn.Module, config: Magnitude, schedule: OneShot | Iterative | Gradual,
                 train_fn: TrainFn | None = None, **importance_kwargs) -> list[tuple[int, float]]:
    """Prune `model` in place following `schedule`, training with `train_fn(model, steps, on_step)` in between.

    Returns the (step, sparsity) points at which masks were recomputed.
    """
    config.validate()
    needs_training = not isinstance(schedule, OneShot) or schedule.finetune_steps > 0
    if needs_training and train_fn is None:
        raise NetshrinkError(f"{type(schedule).__name__} schedule needs a train_fn (or the built-in "
                             "netshrink.sparsity.finetune.builtin_train_fn)", where="train_fn")
    if isinstance(schedule, OneShot):
        magnitude_prune(model, config, **importance_kwargs)
        if schedule.finetune_steps:
            train_fn(model, schedule.finetune_steps, None)
        return [(0, config.sparsity)]
    if isinstance(schedule, Iterative):
        points = []
        for r, target in enumerate(iterative_targets(config.sparsity, schedule.rounds)):
            magnitude_prune(model, dataclasses.replace(config, sparsity=target), **importance_kwargs)
            points.append((r * schedule.finetune_steps, target))
            train_fn(model, schedule.finetune_steps, None)
        return points
    if isinstance(schedule, Gradual):
        pruner = GradualPruner(model, config, schedule, **importance_kwargs)
        total = schedule.total_steps if schedule.total_steps is not None else schedule.end_step + 1
        pruner.step(0)
        hook: StepHook = lambda t: pruner.step(t + 1)  # noqa: E731  (step t finished -> schedule point t + 1)
        train_fn(model, total, hook)
        pruner.step(schedule.end_step)
        return pruner.history
    raise NetshrinkError(f"unknown schedule {type(schedule).__name__}", where="schedule")
