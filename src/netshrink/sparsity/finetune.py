"""A small built-in fine-tuning loop that keeps pruned weights at zero; any user loop can take its place."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.importance import LossFn, default_loss
from netshrink.sparsity.masks import keep_masks_after_step

StepHook = Callable[[int], None]
TrainFn = Callable[[nn.Module, int, StepHook | None], None]


@dataclass
class FineTune:
    """Built-in recovery: `steps` optimizer steps of Adam at `lr` on the given batches (cycled)."""

    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0


def finetune(model: nn.Module, batches: Iterable[Any], config: FineTune | None = None,
             loss_fn: LossFn | None = None, on_step: StepHook | None = None) -> list[float]:
    """Train `model` for config.steps steps; masks are re-applied after every optimizer step; returns the losses."""
    config = config or FineTune()
    loss_fn = loss_fn or default_loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    handle = keep_masks_after_step(optimizer, model)
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for step, batch in zip(range(config.steps), _cycle(batches)):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step)
    finally:
        handle.remove()
        model.train(was_training)
    return losses


def builtin_train_fn(batches: Iterable[Any], config: FineTune | None = None,
                     loss_fn: LossFn | None = None) -> TrainFn:
    """A `train_fn(model, steps, on_step)` made from the built-in loop, for the schedules."""
    base = config or FineTune()

    def train(model: nn.Module, steps: int, on_step: StepHook | None = None) -> None:
        finetune(model, batches, FineTune(steps=steps, lr=base.lr, weight_decay=base.weight_decay), loss_fn, on_step)

    return train


def _cycle(source: Iterable[Any]) -> Iterable[Any]:
    """Cycle a list or a re-iterable (a DataLoader) forever; a one-shot iterator is consumed once."""
    if hasattr(source, "__len__") and len(source) == 0:
        raise NetshrinkError("fine-tuning got no batches", where="batches")
    if isinstance(source, (list, tuple)):
        return itertools.cycle(source)
    if iter(source) is source:
        return source
    return itertools.chain.from_iterable(iter(lambda: source, None))
