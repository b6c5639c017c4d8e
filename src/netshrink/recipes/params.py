"""The parameters each recipe method accepts, as strict pydantic models: unknown keys, wrong types and impossible
values (a sparsity of 1.5, 5-bit GPTQ) are refused before any work starts."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fraction = Field(ge=0.0, lt=1.0, description="fraction removed, in [0, 1)")


class Params(BaseModel):
    """Base of every method's parameters: no unknown keys, no silent type coercion ('0.5' is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---- prune -------------------------------------------------------------------------------------------------------
class MagnitudeParams(Params):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    scope: Literal["layer", "global"] = "global"
    importance: Literal["magnitude", "magnitude_x_grad", "lamp"] = "magnitude"


class StructuredParams(Params):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)  # fraction of channels / FFN neurons removed
    head_ratio: float | None = Field(None, ge=0.0, lt=1.0)  # fraction of attention heads removed
    importance: Literal["l1", "l2", "group_l2", "bn_scale", "taylor", "random"] = "l2"
    round_to: int = Field(1, ge=1)  # keep a multiple of this many units


class NMParams(Params):
    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)

    @model_validator(mode="after")
    def _n_below_m(self) -> "NMParams":
        if self.n >= self.m:
            raise ValueError(f"n={self.n} must be smaller than m={self.m} (keep n of every m weights)")
        return self


class LLMPruneParams(Params):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    pattern: Literal["2:4", "4:8"] | None = None  # when set, N:M replaces the unstructured sparsity
    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)


class LLMMagnitudeParams(Params):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0)
    pattern: Literal["2:4", "4:8"] | None = None


# ---- finetune ----------------------------------------------------------------------------------------------------
class FinetuneParams(Params):
    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)


# ---- quantize ----------------------------------------------------------------------------------------------------
Backend = Literal["auto", "eager", "compile", "native"]  # "compile": torch.compile fuses the ops around each int8
# GEMM; "native": netshrink's fused int8 encoder forward (Int8Dynamic, BERT-style encoders)


class CastParams(Params):
    backend: Backend = "auto"


class Int8DynamicParams(Params):
    per_channel: bool = True
    backend: Backend = "auto"


class Int8StaticParams(Params):
    calibration_samples: int = Field(256, ge=1)
    per_channel: bool = True
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = "minmax"
    backend: Backend = "auto"


class QATParams(Params):
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1)
    calibration_samples: int = Field(256, ge=1)
    weight_bits: int = Field(8, ge=2, le=8)
    act_bits: int = Field(8, ge=2, le=8)


class WeightOnlyParams(Params):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int | None = Field(128, ge=8)  # null: one scale per output channel
    symmetric: bool = False
    pack: bool = False  # swap in packed INT4/INT8 Linears (real low-bit kernels) instead of dequantized floats
    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)


class GPTQParams(WeightOnlyParams):
    damp: float = Field(0.01, gt=0.0, lt=1.0)
    act_order: bool = True


class AWQParams(WeightOnlyParams):
    n_grid: int = Field(20, ge=2)


class SmoothQuantParams(Params):
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)


# ---- export ------------------------------------------------------------------------------------------------------
class ExportParams(Params):
    path: str | None = None  # file or folder name inside --out (default: model.<ext>)
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)
