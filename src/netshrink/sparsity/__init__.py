"""Pruning: unstructured masks, schedules, lottery tickets, structured removal, N:M, layer-adaptive budgets.

Public entry: `prune_(model, config)` with `Magnitude`, `Structured` or `NM`; imports are lazy to keep
`import netshrink` cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prune_": "api", "structured_prune": "api",
    "Magnitude": "magnitude", "magnitude_prune": "magnitude",
    "Structured": "structured.prune", "plan_structured": "structured.prune", "apply_plan": "structured.prune",
    "structured_report": "structured.prune",
    "NM": "nm", "compress_nm": "nm", "decompress_nm": "nm", "nm_mask": "nm", "to_semi_structured": "nm",
    "OneShot": "schedules", "Iterative": "schedules", "Gradual": "schedules", "GradualPruner": "schedules",
    "run_schedule": "schedules", "cubic_sparsity": "schedules",
    "FineTune": "finetune", "finetune": "finetune", "builtin_train_fn": "finetune",
    "Distill": "recovery", "distill": "recovery",
    "LotteryTicket": "lottery", "find_ticket": "lottery",
    "sensitivity_scan": "sensitivity", "allocate_from_sensitivity": "sensitivity", "lamp_allocation": "sensitivity",
    "plot_sensitivity": "sensitivity",
    "prepare_sparse_execution": "sparse_linear", "SparseLinear": "sparse_linear",
    "make_permanent": "masks", "sparsity_of": "masks", "keep_masks_after_step": "masks", "set_mask": "masks",
    "resize_to_pruned": "structured.hf_config",
    "Reconstruct": "structured.reconstruct", "reconstruct_": "structured.reconstruct",
    "scan_groups": "structured.allocate", "allocate_groups": "structured.allocate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"netshrink.sparsity.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'netshrink.sparsity' has no attribute {name!r}")
