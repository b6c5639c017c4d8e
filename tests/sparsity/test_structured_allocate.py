"""Non-uniform structured budgets: the DP against brute force, the unit budget per kind, and a measured scan."""
from __future__ import annotations

import itertools
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from netshrink.sparsity import Structured, prune_
from netshrink.sparsity.structured.allocate import GroupScan, _cheapest, allocate_groups, scan_groups

RATIOS = [0.25, 0.5, 0.75]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([4, 8, 12]), st.lists(st.floats(0, 1), min_size=3, max_size=3)),
                min_size=1, max_size=4),
       st.floats(0, 0.9))
def test_cheapest_matches_brute_force(groups, share):
    scans = [GroupScan(f"g{i}", "ffn", size, RATIOS, losses) for i, (size, losses) in enumerate(groups)]
    options = [[(0, 0.0, 0.0)] + [(math.floor(r * s.size + 1e-9), l, r) for r, l in zip(RATIOS, s.loss)] for s in scans]
    totals = {sum(o[0] for o in combo) for combo in itertools.product(*options)}
    target = min(totals, key=lambda t: abs(t - share * sum(s.size for s in scans)))
    best = min(sum(o[1] for o in combo) for combo in itertools.product(*options) if sum(o[0] for o in combo) == target)
    chosen = _cheapest(scans, target, "ffn")
    removed = sum(math.floor(chosen[s.name] * s.size + 1e-9) for s in scans)
    loss = sum(0.0 if chosen[s.name] == 0 else s.loss[RATIOS.index(chosen[s.name])] for s in scans)
    assert removed == target and math.isclose(loss, best, abs_tol=1e-9)


def test_allocation_keeps_each_kinds_unit_budget():
    scans = [GroupScan("l0.ffn", "ffn", 8, RATIOS, [0.1, 0.2, 0.3]),
             GroupScan("l1.ffn", "ffn", 8, RATIOS, [0.0, 0.01, 0.02]),
             GroupScan("l0.heads", "heads", 4, RATIOS, [0.5, 0.6, 0.9]),
             GroupScan("l1.heads", "heads", 4, RATIOS, [0.1, 0.1, 0.1])]
    alloc = allocate_groups(scans, Structured(ratio=0.5, head_ratio=0.5))
    assert alloc == {"l0.ffn": 0.25, "l1.ffn": 0.75, "l0.heads": 0.25, "l1.heads": 0.75}


def test_scan_finds_the_insensitive_layer_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():   # half the first hidden layer's units are nearly silent: cutting them costs nothing
        model[0].weight[8:].mul_(1e-3), model[0].bias[8:].mul_(1e-3)
    x = torch.randn(256, 8)
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).mean() / ref.pow(2).mean())

    config = Structured(ratio=0.5, importance="l2")
    scans = scan_groups(model, config, evaluate, ratios=RATIOS, example_inputs=(x[:2],))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the scan changed the model"
    by_name = {s.name: s for s in scans}
    assert len(scans) == 2 and all(len(s.loss) == 3 for s in scans)
    alloc = allocate_groups(scans, config)
    first, second = (n for n in by_name if by_name[n].size == 16)

    def summed(a: dict) -> float:
        return sum(0.0 if a[n] == 0 else by_name[n].loss[RATIOS.index(a[n])] for n in a)

    assert summed(alloc) <= summed({first: 0.5, second: 0.5}), (alloc, [s.loss for s in scans])
    assert by_name[first].loss[1] < 0.1 * by_name[second].loss[1]
    cut = prune_(model, Structured(ratio=0.5, importance="l2", per_group=alloc), example_inputs=(x[:2],))
    assert cut[0].out_features + cut[2].out_features == 16
