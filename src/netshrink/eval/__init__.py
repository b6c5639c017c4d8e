"""Task quality of a model, measured on real data; every function returns a plain dict of floats."""
from __future__ import annotations

from typing import Any

from netshrink.errors import NetshrinkError
from netshrink.eval.classification import accuracy, evaluate_digits, evaluate_fashion
from netshrink.eval.embedding import embed, embedding_fidelity, human_similarity
from netshrink.eval.perplexity import perplexity

__all__ = ["accuracy", "evaluate_digits", "evaluate_fashion", "embed", "embedding_fidelity", "human_similarity",
           "perplexity", "evaluate", "TASKS", "primary_metric"]

TASKS = ("digits", "fashion", "similarity", "fidelity", "perplexity", "perplexity-austen")
PRIMARY = {"digits": "accuracy", "fashion": "accuracy", "similarity": "spearman", "fidelity": "mean_cosine",
           "perplexity": "perplexity", "perplexity-austen": "perplexity"}
HIGHER_IS_BETTER = {"accuracy": True, "spearman": True, "pearson": True, "mean_cosine": True, "perplexity": False}


def primary_metric(task: str) -> tuple[str, bool]:
    """The headline metric of a task and whether higher is better."""
    metric = PRIMARY[task]
    return metric, HIGHER_IS_BETTER[metric]


def evaluate(zoo_model: Any, task: str | None = None, n: int | None = None, reference: Any = None) -> dict[str, float]:
    """Score a ZooModel on `task` (default: its own). `n` caps the sample size (images, sentences or tokens)."""
    from netshrink.data import prose, sentences

    task = task or zoo_model.task
    model, tok = zoo_model.model, zoo_model.tokenizer
    if task == "digits":
        return evaluate_digits(model, n=n)
    if task == "fashion":
        return evaluate_fashion(model, n=n)
    if task in ("similarity", "fidelity", "perplexity", "perplexity-austen") and tok is None:
        raise NetshrinkError(f"task '{task}' needs a tokenizer and this model has none", where=zoo_model.name)
    if task == "similarity":
        return human_similarity(model, tok)
    if task == "fidelity":
        if reference is None:
            raise NetshrinkError("task 'fidelity' needs the reference (original) model", where=zoo_model.name)
        return embedding_fidelity(model, reference, tok, sentences(n or 200))
    if task in ("perplexity", "perplexity-austen"):
        text = prose("austen" if task.endswith("austen") else "lee")
        return perplexity(model, tok, text, max_tokens=n or 4096)
    raise NetshrinkError(f"unknown task '{task}' ({', '.join(TASKS)})", where="--task")
