"""Input checks that turn a model's deep stack trace into one line naming the model and the input."""
from __future__ import annotations

import torch

from netshrink.errors import NetshrinkError


def check_inputs(entry, inputs: tuple) -> None:
    """Run one forward pass on `inputs`; a shape or dtype the model rejects becomes a NetshrinkError."""
    try:
        with torch.inference_mode():
            entry.model(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise NetshrinkError(f"model rejected inputs of shape/dtype {shapes}: {first}", where=entry.name,
                             hint="check --input-shape / --batch / --seq-len") from None
