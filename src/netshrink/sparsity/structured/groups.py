"""Coupled slices: the tensors that must shrink together when one unit (channel, neuron, head, KV group) goes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Slice:
    """Positions offset + u * inner + j (j < inner) along `dim` of `module.param` belong to unit u of a group.

    role: 'out' (a producer's output rows), 'in' (a consumer's input columns) or 'norm' (a per-channel
    pass-through such as BatchNorm or a depthwise conv, which shrinks with the channel but does not mix it).
    """

    module: str
    param: str
    dim: int
    offset: int = 0
    inner: int = 1
    role: str = "out"

    def positions(self, units: torch.Tensor) -> torch.Tensor:
        """Tensor indices along `dim` covered by the given unit indices."""
        j = torch.arange(self.inner)
        return (self.offset + units[:, None] * self.inner + j[None, :]).flatten()


@dataclass
class Group:
    """`size` prunable units whose slices are removed together; `kind` is channels | ffn | heads | kv_groups."""

    name: str
    size: int
    kind: str
    slices: list[Slice] = field(default_factory=list)

    def producers(self) -> list[Slice]:
        """The slices that compute the unit (their weights are the classic 'filter' of filter pruning)."""
        return [s for s in self.slices if s.role == "out"]


def tensor_of(model: nn.Module, s: Slice) -> torch.Tensor:
    """The tensor a slice points at (the stored original when the module is mask-parametrized)."""
    module = model.get_submodule(s.module)
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and s.param in parametrizations:
        return parametrizations[s.param].original
    return getattr(module, s.param)


def removal_positions(groups_and_removed: list[tuple[Group, torch.Tensor]]) -> dict[tuple[str, str, int], torch.Tensor]:
    """Union of removed tensor positions per (module, param, dim) over all groups (a tensor may sit in several)."""
    out: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    for group, removed in groups_and_removed:
        if removed.numel() == 0:
            continue
        for s in group.slices:
            out.setdefault((s.module, s.param, s.dim), []).append(s.positions(removed))
    return {k: torch.unique(torch.cat(v)) for k, v in out.items()}


@torch.no_grad()
def remove_physically(model: nn.Module, positions: dict[tuple[str, str, int], torch.Tensor]) -> None:
    """Cut the listed positions out of each tensor, replacing parameters/buffers by smaller ones."""
    for (module_name, param, dim), drop in positions.items():
        module = model.get_submodule(module_name)
        old = getattr(module, param)
        if old is None:
            continue
        keep_mask = torch.ones(old.shape[dim], dtype=torch.bool)
        keep_mask[drop] = False
        keep = torch.nonzero(keep_mask).flatten().to(old.device)
        new = torch.index_select(old.detach(), dim, keep).contiguous()
        if isinstance(old, nn.Parameter):
            setattr(module, param, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module.register_buffer(param, new)


def mask_positions(model: nn.Module, positions: dict[tuple[str, str, int], torch.Tensor]) -> None:
    """The masked twin of `remove_physically`: mask producers' rows and consumers' columns, shapes unchanged.

    Masks are parametrizations (netshrink.sparsity.masks), so fine-tuning keeps the removed units at zero.
    BatchNorm statistics are left alone: the zeroed consumer columns already cut those channels off.
    """
    from netshrink.sparsity.masks import get_mask, set_mask

    for (module_name, param, dim), drop in positions.items():
        module = model.get_submodule(module_name)
        if param not in ("weight", "bias") or isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        tensor = getattr(module, param)
        if tensor is None:
            continue
        existing = get_mask(module, param)
        mask = existing.clone() if existing is not None else torch.ones_like(tensor, dtype=torch.bool)
        index = [slice(None)] * tensor.dim()
        index[dim] = drop.to(tensor.device)
        mask[tuple(index)] = False
        set_mask(module, mask, name=param, where=module_name)
