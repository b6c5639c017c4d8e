"""Recovery by distillation: train the pruned student to reproduce the original teacher on unlabelled inputs.

The loss matches the outputs (MSE + cosine) and, where shapes agree, the outputs of same-named blocks
(transformer layers keep the hidden size under FFN/head pruning), which gives many more targets per batch.
For sentence encoders two optional terms act on the sentence vectors (the output itself when the model already
pools, else the mean-pooled token states): their cosine to the teacher's, and the batch's pairwise cosine matrix against the teacher's, i.e. similarity-preserving
distillation (Tung and Mori 2019): a similarity task reads only those pairwise cosines.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.sparsity.finetune import _cycle
from netshrink.sparsity.masks import keep_masks_after_step

BLOCK_SUFFIXES = ("Layer", "DecoderLayer", "Block")


@dataclass
class Distill:
    """`steps` Adam steps at `lr`; `block_weight` scales the per-block hidden-state term (0: outputs only).

    cache_teacher: when the batches are a list, keep the teacher's outputs per batch after the first pass
    (the teacher is frozen, so they never change; saves a teacher forward on every later epoch).
    """

    steps: int = 300
    lr: float = 1e-4
    block_weight: float = 1.0
    cosine_weight: float = 1.0
    cache_teacher: bool = True
    cosine_decay: bool = True  # learning rate follows half a cosine from lr to 0 over the steps
    warmup: float = 0.0  # share of the steps over which the learning rate ramps linearly from ~0 up to lr
    frozen: tuple[str, ...] = ()  # fnmatch patterns of parameter names left untrained (e.g. "*word_embeddings*")
    pooled_weight: float = 0.0  # 1 - cosine of the mean-pooled outputs (masked by the batch's attention_mask)
    relation_weight: float = 0.0  # squared error of the batch's pairwise cosines between mean-pooled outputs


def lr_factor(step: int, config: Distill) -> float:
    """Multiplier of `config.lr` at `step`: a linear warm-up (Adam's first steps move every weight by ~lr, which
    undoes a good starting point such as a least-squares refit), then half a cosine down to 0 if asked."""
    ramp = max(1, round(config.warmup * config.steps))
    factor = min(1.0, (step + 1) / ramp) if config.warmup > 0 else 1.0
    if config.cosine_decay:
        factor *= 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))
    return factor


def matching_blocks(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Names of repeated blocks (BertLayer, LlamaDecoderLayer, ...) present in both models."""
    names_t = {n for n, m in teacher.named_modules() if type(m).__name__.endswith(BLOCK_SUFFIXES)}
    return [n for n, m in student.named_modules() if n in names_t and type(m).__name__.endswith(BLOCK_SUFFIXES)]


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    for key in ("last_hidden_state", "logits", "hidden_states"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _capture(model: nn.Module, names: list[str], store: dict[str, torch.Tensor]) -> list[Any]:
    handles = []
    for name in names:
        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            t = _first_tensor(out)
            if t is not None:
                store[name] = t
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return handles


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _attention_mask(batch: Any) -> torch.Tensor | None:
    """The padding mask of a batch given as a dict with "attention_mask" or as (input_ids, attention_mask)."""
    if isinstance(batch, dict):
        return batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor) \
            and isinstance(batch[0], torch.Tensor) and batch[1].shape == batch[0].shape:
        return batch[1]
    return None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Average over the tokens (dim 1) that the mask keeps: the sentence embedding of a mean-pooling encoder."""
    if mask is None:
        return hidden.float().mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _pooled_terms(s: torch.Tensor, t: torch.Tensor, batch: Any, config: Distill) -> torch.Tensor:
    """The pooled-cosine and pairwise-similarity terms. Token states [batch, tokens, hidden] are mean-pooled first;
    an output that is already one vector per input (a sentence encoder such as the zoo's MiniLM) is used as is."""
    if s.dim() == 3:
        s_vec, t_vec = mean_pool(s, _attention_mask(batch)), mean_pool(t, _attention_mask(batch))
    else:
        s_vec, t_vec = s.float(), t.float()
    loss = config.pooled_weight * (1 - F.cosine_similarity(s_vec, t_vec, dim=-1)).mean()
    if config.relation_weight and len(s_vec) > 1:
        s_unit, t_unit = F.normalize(s_vec, dim=-1), F.normalize(t_vec, dim=-1)
        loss = loss + config.relation_weight * F.mse_loss(s_unit @ s_unit.T, t_unit @ t_unit.T)
    return loss


def _match(s: torch.Tensor, t: torch.Tensor, cosine_weight: float) -> torch.Tensor:
    s, t = s.float(), t.float()
    loss = F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    if cosine_weight and s.dim() >= 2:
        loss = loss + cosine_weight * (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return loss


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[Any], config: Distill | None = None,
            blocks: list[str] | None = None, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `student` in place to match `teacher` on `batches` (model inputs, no labels); returns the losses.

    Both run in eval mode (no dropout, fixed BatchNorm statistics); masks on the student stay applied.
    """
    config = config or Distill()
    if config.steps < 1:
        raise NetshrinkError("distillation needs at least one step", where="Distill.steps")
    if not 0.0 <= config.warmup < 1.0:
        raise NetshrinkError(f"warm-up share {config.warmup!r} is outside [0, 1)", where="Distill.warmup")
    blocks = matching_blocks(student, teacher) if blocks is None else blocks
    if not config.block_weight:
        blocks = []
    teacher_flags = [(p, p.requires_grad) for p in teacher.parameters()]
    teacher_mode = teacher.training
    teacher.eval()
    student.eval()
    for p, _ in teacher_flags:
        p.requires_grad_(False)
    params = [p for name, p in student.named_parameters()
              if not any(fnmatch.fnmatchcase(name, pattern) for pattern in config.frozen)]
    if not params:
        raise NetshrinkError("every parameter is frozen: nothing to train", where="Distill.frozen")
    student_flags = [(p, p.requires_grad) for p in student.parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    mask_hook = keep_masks_after_step(optimizer, student)
    s_store: dict[str, torch.Tensor] = {}
    t_store: dict[str, torch.Tensor] = {}
    handles = _capture(student, blocks, s_store) + _capture(teacher, blocks, t_store)
    losses: list[float] = []
    try:
        cacheable = config.cache_teacher and isinstance(batches, (list, tuple))
        cache: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        for step, batch in zip(range(config.steps), _cycle(batches)):
            key = step % len(batches) if cacheable else -1
            if key in cache:
                t_out, blocks_out = cache[key]
                t_store.clear()
                t_store.update(blocks_out)
            else:
                with torch.no_grad():
                    t_out = _first_tensor(_call(teacher, batch))
                if cacheable:
                    cache[key] = (t_out, dict(t_store))
            s_out = _first_tensor(_call(student, batch))
            loss = _match(s_out, t_out, config.cosine_weight)
            if (config.pooled_weight or config.relation_weight) and s_out.dim() in (2, 3):
                loss = loss + _pooled_terms(s_out, t_out, batch, config)
            matched = [n for n in blocks if n in s_store and n in t_store and s_store[n].shape == t_store[n].shape]
            if matched:
                loss = loss + config.block_weight * sum(
                    _match(s_store[n], t_store[n], 0.0) for n in matched) / len(matched)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        for h in handles:
            h.remove()
        mask_hook.remove()
        for p, flag in teacher_flags:
            p.requires_grad_(flag)
        trained = {id(p) for p in params}
        for p, flag in student_flags:
            p.requires_grad_(flag or id(p) in trained)
        teacher.train(teacher_mode)
    return losses
