"""Calibration token windows: fixed-length samples cut from real text, the data every LLM method measures on."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from netshrink.errors import NetshrinkError


def calibration_ids(calibration: Any, tokenizer: Any = None, n_samples: int = 32, seq_len: int = 512,
                    seed: int = 0) -> torch.Tensor:
    """Token ids [n, seq_len] from a tensor of ids, a text, or a list of texts (random windows, fixed seed).

    A text shorter than `seq_len` tokens raises NetshrinkError; with fewer tokens than n_samples * seq_len the
    windows overlap (as in GPTQ's reference sampling).
    """
    if isinstance(calibration, torch.Tensor):
        if calibration.is_floating_point() or calibration.is_complex() or calibration.dtype == torch.bool:
            raise NetshrinkError(f"calibration ids must be integer token ids, got {calibration.dtype}",
                                 where="calibration", hint="pass a LongTensor (e.g. a tokenizer's input_ids)")
        ids = calibration.long()
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise NetshrinkError(f"calibration ids must be [samples, seq_len], got {tuple(ids.shape)}",
                                 where="calibration")
        return ids
    if isinstance(calibration, str):
        texts: Sequence[str] = [calibration]
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        texts = calibration
    else:
        raise NetshrinkError(f"calibration must be token ids, a text or a list of texts, got {type(calibration)}",
                             where="calibration")
    if tokenizer is None:
        raise NetshrinkError("text calibration needs a tokenizer", where="calibration", hint="pass tokenizer=")
    sep = "\n\n"
    stream = tokenizer(sep.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if stream.numel() < seq_len:
        raise NetshrinkError(f"calibration text has {stream.numel()} tokens, fewer than seq_len={seq_len}",
                             where="calibration", hint="give more text or a shorter seq_len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])


def check_ids_in_vocab(ids: torch.Tensor, n_rows: int, embed: str) -> None:
    """Every calibration token id is a row of the embedding `embed` (which has `n_rows` rows)."""
    bad = ids[(ids < 0) | (ids >= n_rows)]
    if bad.numel():
        raise NetshrinkError(f"token id {int(bad[0])} is outside {embed!r}, which has {n_rows} rows",
                             where="calibration", hint="calibration token ids must be smaller than the vocabulary size")
