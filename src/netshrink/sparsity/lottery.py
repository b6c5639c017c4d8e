"""Lottery tickets (Frankle & Carbin 2019; rewinding: Frankle et al. 2020): iterative magnitude pruning that
resets surviving weights to their values at an early step k, versus a random re-initialisation of the same mask."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.magnitude import Magnitude, check_sparsity, magnitude_prune
from netshrink.sparsity.masks import get_mask, keep_masks_after_step, make_permanent, set_mask
from netshrink.sparsity.schedules import iterative_targets


@dataclass
class LotteryTicket:
    """IMP to `target_sparsity` in `rounds` rounds (each removes the same share of what is left, global magnitude),
    rewinding to the weights after `rewind_step` steps; every training run lasts `train_steps` steps."""

    target_sparsity: float = 0.85
    rounds: int = 4
    rewind_step: int = 200
    train_steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class TicketResult:
    """Test accuracy of the dense net, the rewound ticket after each round, and the random re-initialisation."""

    dense_accuracy: float
    rounds: list[tuple[float, float]] = field(default_factory=list)  # (sparsity, ticket accuracy)
    random_reinit_accuracy: float = float("nan")
    sparsity: float = 0.0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def ticket_accuracy(self) -> float:
        return self.rounds[-1][1] if self.rounds else float("nan")

    def markdown(self) -> str:
        rows = ["| network | sparsity | test accuracy |", "|---|---|---|", f"| dense | 0% | {self.dense_accuracy:.4f} |"]
        rows += [f"| ticket (rewound), round {i + 1} | {s:.1%} | {a:.4f} |" for i, (s, a) in enumerate(self.rounds)]
        rows.append(f"| same mask, random re-init | {self.sparsity:.1%} | {self.random_reinit_accuracy:.4f} |")
        return "\n".join(rows)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, config: LotteryTicket, seed: int,
           snapshot_at: int | None = None) -> dict[str, torch.Tensor] | None:
    """Adam on shuffled minibatches for `steps` steps; returns a state snapshot taken after `snapshot_at` steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    handle = keep_masks_after_step(opt, model)
    snapshot = None
    model.train()
    order = torch.randperm(len(x), generator=gen)
    pos = 0
    try:
        for step in range(steps):
            if snapshot_at is not None and step == snapshot_at:
                snapshot = copy.deepcopy(model.state_dict())
            if pos + config.batch_size > len(x):
                order, pos = torch.randperm(len(x), generator=gen), 0
            idx = order[pos: pos + config.batch_size]
            pos += config.batch_size
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if snapshot_at is not None and snapshot is None:
            snapshot = copy.deepcopy(model.state_dict())
    finally:
        handle.remove()
        model.eval()
    return snapshot


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + 1024]).argmax(1) == y[i:i + 1024]).sum()) for i in range(0, len(x), 1024))
    return correct / len(x)


def _rewind(model: nn.Module, rewind_state: dict[str, torch.Tensor]) -> None:
    """Load the early weights into the (masked) model; masks then zero the pruned ones again."""
    masks = {n: get_mask(m) for n, m in model.named_modules() if get_mask(m) is not None}
    state = model.state_dict()
    for key, value in rewind_state.items():
        if key in state:
            state[key] = value
        else:
            module, _, param = key.rpartition(".")
            alt = f"{module}.parametrizations.{param}.original" if module else f"parametrizations.{param}.original"
            if alt in state:
                state[alt] = value
    model.load_state_dict(state)
    for name, mask in masks.items():
        set_mask(model.get_submodule(name), mask, where=name)


def find_ticket(make_model: Callable[[], nn.Module], train: tuple[torch.Tensor, torch.Tensor],
                test: tuple[torch.Tensor, torch.Tensor], config: LotteryTicket | None = None) -> TicketResult:
    """Train dense, then `rounds` of: prune (global magnitude), rewind survivors to step k, retrain; finally train
    the same mask from a fresh random initialisation as the control."""
    config = config or LotteryTicket()
    check_sparsity(config.target_sparsity, "LotteryTicket.target_sparsity")
    if not 0 <= config.rewind_step < config.train_steps:
        raise NetshrinkError("rewind_step must lie in [0, train_steps)", where="LotteryTicket.rewind_step")
    (x, y), (xt, yt) = train, test
    torch.manual_seed(config.seed)
    model = make_model()
    rewind_state = _train(model, x, y, config.train_steps, config, config.seed, snapshot_at=config.rewind_step)
    result = TicketResult(dense_accuracy=_accuracy(model, xt, yt))
    prune_cfg = Magnitude(scope="global", include=config.include, exclude=config.exclude)
    for r, target in enumerate(iterative_targets(config.target_sparsity, config.rounds)):
        prune_cfg.sparsity = target
        magnitude_prune(model, prune_cfg)
        _rewind(model, rewind_state)
        _train(model, x, y, config.train_steps - config.rewind_step, config, config.seed + 1 + r)
        result.rounds.append((target, _accuracy(model, xt, yt)))
    result.masks = {n: get_mask(m).clone() for n, m in model.named_modules() if get_mask(m) is not None}
    result.sparsity = config.target_sparsity
    torch.manual_seed(config.seed + 1000)
    control = make_model()
    for name, mask in result.masks.items():
        set_mask(control.get_submodule(name), mask, where=name)
    _train(control, x, y, config.train_steps, config, config.seed + 1000)
    result.random_reinit_accuracy = _accuracy(control, xt, yt)
    make_permanent(model)
    return result
