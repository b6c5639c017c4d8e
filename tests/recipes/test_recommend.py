"""The recommender follows the playbook on simulated hardware, with a reason for each choice."""
from __future__ import annotations

import pytest

from netshrink.errors import NetshrinkError
from netshrink.hardware import HardwareInfo
from netshrink.recipes.recommend import recommend

CPU_PLAIN = HardwareInfo(cpu_name="old", avx2=True)
CPU_VNNI = HardwareInfo(cpu_name="cascade lake", avx2=True, avx512=True, vnni=True)
V100 = HardwareInfo(cuda_name="V100", cuda_capability=(7, 0))
A100 = HardwareInfo(cuda_name="A100", cuda_capability=(8, 0))
H100 = HardwareInfo(cuda_name="H100", cuda_capability=(9, 0))
T4 = HardwareInfo(cuda_name="T4", cuda_capability=(7, 5))


@pytest.mark.parametrize(
    "kind, hw, target, recipe, phrase",
    [
        ("cnn", CPU_PLAIN, "cpu", "cnn-structured50-int8", "lacks VNNI"),
        ("cnn", CPU_VNNI, "cpu", "int8-ptq", "has VNNI"),
        ("encoder", CPU_VNNI, "cpu", "int8-dynamic", "has VNNI"),
        ("cnn", V100, "gpu", "fp16", "need 7.5"),
        ("cnn", T4, "gpu", "int8-ptq", "INT8 tensor cores"),
        ("cnn", A100, "gpu", "gpu-2of4-fp16", "2:4 sparse tensor cores"),
        ("encoder", H100, "gpu", "gpu-2of4-fp16", "capability 9.0"),
        ("decoder", V100, "gpu", "llm-edge-gptq4", "need capability 8.0"),
        ("decoder", A100, "gpu", "llm-edge-2of4-gptq4", "sparse tensor cores"),
        ("decoder", CPU_VNNI, "edge", "llm-edge-gptq4", "4-bit is for LLMs only"),
        ("cnn", CPU_VNNI, "mobile", "cnn-structured50-int8", "structured pruning"),
        ("encoder", CPU_PLAIN, "edge", "int8-dynamic", "4-bit is kept for LLMs"),
    ],
)
def test_seed_choices(kind, hw, target, recipe, phrase):
    rec = recommend(kind, hw, target, max_drop=0.01)
    assert rec.recipe_name == recipe
    assert rec.recipe.name == recipe
    assert any(phrase in reason for reason in rec.reasons), rec.reasons
    if kind != "decoder":
        assert all("4-bit" not in s.method and s.method not in ("gptq", "awq", "rtn") for s in rec.recipe.stages)


def test_qat_when_measured_ptq_drop_exceeds_budget():
    rec = recommend("cnn", CPU_VNNI, "cpu", max_drop=0.01, measured_ptq_drop=0.025)
    assert rec.recipe_name == "int8-qat" and "2.50%" in rec.reasons[-1]
    within = recommend("cnn", CPU_VNNI, "cpu", max_drop=0.01, measured_ptq_drop=0.004)
    assert within.recipe_name == "int8-ptq" and within.escalation == "int8-qat"


def test_bf16_offered_where_the_cpu_has_it():
    rec = recommend("encoder", HardwareInfo(vnni=True, avx512_bf16=True), "cpu")
    assert "bf16" in rec.alternatives
    assert "bf16" not in recommend("encoder", CPU_VNNI, "cpu").alternatives


def test_bad_inputs_are_clear_errors():
    with pytest.raises(NetshrinkError, match="no CUDA GPU"):
        recommend("cnn", CPU_VNNI, "gpu")
    with pytest.raises(NetshrinkError, match="fraction"):
        recommend("cnn", CPU_VNNI, "cpu", max_drop=1.0)
    with pytest.raises(NetshrinkError, match="unknown target"):
        recommend("cnn", CPU_VNNI, "phone")
