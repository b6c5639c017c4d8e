"""One entry point: `prune_(model, config)` for Magnitude, Structured and NM configs (a copy unless inplace)."""
from __future__ import annotations

import copy
from typing import Any, Iterable

from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.finetune import TrainFn
from netshrink.sparsity.importance import LossFn
from netshrink.sparsity.magnitude import Magnitude, magnitude_prune
from netshrink.sparsity.nm import NM, nm_prune
from netshrink.sparsity.recovery import Distill, distill
from netshrink.sparsity.schedules import Gradual, Iterative, OneShot, run_schedule
from netshrink.sparsity.structured.prune import Structured, prune_structured

PruneConfig = Magnitude | Structured | NM
NM_RESULT_ATTR = "_netshrink_nm_result"


def prune_(model: nn.Module, config: PruneConfig, inplace: bool = False, *,
           calibration: Iterable[Any] | None = None, loss_fn: LossFn | None = None,
           example_inputs: tuple | None = None, schedule: OneShot | Iterative | Gradual | None = None,
           train_fn: TrainFn | None = None) -> nn.Module:
    """Prune `model` by `config` and return it (a deep copy unless `inplace`; the original is untouched on error).

    Magnitude: masks (parametrizations) on Linear/Conv weights; `schedule` + `train_fn` for iterative/gradual.
    Structured: physically smaller model (`example_inputs` needed for CNN/MLP channel tracing).
    NM: N:M masks; `netshrink.sparsity.nm.to_semi_structured` turns them into 2:4 kernels on capable GPUs.
    calibration/loss_fn: batches and loss for gradient-based importance (magnitude_x_grad, taylor).
    """
    if not isinstance(config, (Magnitude, Structured, NM)):
        raise NetshrinkError(f"unknown pruning config {type(config).__name__}", where="config",
                             hint="Magnitude, Structured or NM")
    config.validate()
    target = model if inplace else copy.deepcopy(model)
    if isinstance(config, Magnitude):
        kwargs = {"calibration": calibration, "loss_fn": loss_fn}
        if schedule is None:
            magnitude_prune(target, config, **kwargs)
        else:
            run_schedule(target, config, schedule, train_fn, **kwargs)
        return target
    if isinstance(config, Structured):
        return prune_structured(target, config, example_inputs, calibration, loss_fn)
    result = nm_prune(target, config)
    object.__setattr__(target, NM_RESULT_ATTR, result)
    return target


def structured_prune(model: nn.Module, ratio: float = 0.5, *, head_ratio: float | None = None,
                     importance: str = "l2", example_inputs: tuple | None = None,
                     calibration: Iterable[Any] | None = None, loss_fn: LossFn | None = None,
                     recovery_batches: Iterable[Any] | None = None, recovery_steps: int = 200,
                     recovery_lr: float = 1e-4, **options: Any) -> nn.Module:
    """A physically smaller copy of `model` with `ratio` of channels / FFN neurons (and `head_ratio` of heads)
    removed, then optionally distilled from the original on `recovery_batches` (unlabelled model inputs; the
    learning rate warms up over the first 10% of the steps so a good start, e.g. `reconstruct=True`, survives).

    `options` are further `Structured` fields (gqa, per_group, round_to, exclude, targets).
    `calibration` feeds data-driven importances ('activation': model inputs; 'taylor': with `loss_fn`).
    """
    config = Structured(ratio=ratio, head_ratio=head_ratio, importance=importance, **options)
    pruned = prune_(model, config, example_inputs=example_inputs, calibration=calibration, loss_fn=loss_fn)
    if recovery_batches is not None and recovery_steps > 0:
        distill(pruned, model, recovery_batches, Distill(steps=recovery_steps, lr=recovery_lr, warmup=0.1))
    return pruned.eval()
