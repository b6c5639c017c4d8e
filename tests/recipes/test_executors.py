"""The same sensitivity sweep gives the same results in the local process pool and on a local Ray instance."""
from __future__ import annotations

from netshrink.recipes.executors import LocalExecutor, RayExecutor
from netshrink.recipes.sweep import sensitivity_scan


def test_local_and_ray_agree():
    args = ("digit-cnn", ["conv_layers.0", "fc_layers.0"], [0.5, 0.9], "digits")
    local = sensitivity_scan(*args, LocalExecutor(workers=2), n=100)
    ray_executor = RayExecutor(num_cpus=2)
    try:
        remote = sensitivity_scan(*args, ray_executor, n=100)
    finally:
        ray_executor.close()
    assert remote == local
    assert [(r["layer"], r["sparsity"]) for r in local] == [(l, s) for l in args[1] for s in args[2]]
    # pruning the first conv layer to 90% must hurt more than to 50%: the scan measured something real
    assert local[1]["quality"] < local[0]["quality"]
