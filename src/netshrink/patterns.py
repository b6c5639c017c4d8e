"""Layer-name patterns shared by recipes, quantization and pruning: which names a pattern can select, and the one
error (with a "did you mean" hint) for a pattern that selects nothing, since a typo would otherwise do nothing."""
from __future__ import annotations

import difflib
import fnmatch

from torch import nn

from netshrink.errors import NetshrinkError


def has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def layer_names(model: nn.Module) -> list[str]:
    """Names of the modules that hold their own parameters (what a pattern can usefully select)."""
    return [name for name, module in model.named_modules() if name and has_own_params(module)]


def no_match(pattern: str, names: list[str], where: str, what: str = "layer", kind: str = "pattern") -> NetshrinkError:
    """The error for a pattern (or, with `kind="name"`, an exact name) that selects none of `names`. The hint is the
    '<pattern>.*' meant when the pattern names a module holding such layers, else the closest name, else examples."""
    if kind == "pattern" and any(n.startswith(pattern + ".") or fnmatch.fnmatchcase(n, pattern + ".*") for n in names):
        hint = f"did you mean '{pattern}.*'? a pattern selects {what}s by their own name, not a module holding them"
    elif close := difflib.get_close_matches(pattern, names, n=1, cutoff=0.5):
        hint = f"did you mean '{close[0]}'?"
    elif names:
        hint = f"{what}s look like: {', '.join(names[:4])}, ..."
    else:
        hint = f"this model has no {what}s"
    return NetshrinkError(f"{kind} '{pattern}' matches no {what} of this model", where=where, hint=hint)
