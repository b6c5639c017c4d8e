"""What this machine can run fast: CPU vector features and the CUDA device, as one record read by methods,
the recommender and the report."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class HardwareInfo:
    """CPU and GPU features that decide which compressed formats actually run faster here."""

    cpu_name: str = "unknown"
    cores: int = 1
    avx2: bool = False
    avx512: bool = False
    vnni: bool = False  # AVX-512 VNNI or AVX-VNNI: fast u8 x s8 dot products (INT8 GEMM)
    avx512_bf16: bool = False
    amx: bool = False  # AMX tiles (Sapphire Rapids+): INT8 and BF16 matrix units
    torch_cpu_capability: str = "unknown"
    cuda_name: str | None = None
    cuda_capability: tuple[int, int] | None = None
    native_kernels: bool = False  # AVX-512 VNNI and a C++ compiler: netshrink's native decoder, CNN and encoder run
    notes: list[str] = field(default_factory=list)

    @property
    def int8_tensor_cores(self) -> bool:
        """NVIDIA INT8 tensor cores arrived with Turing (compute capability 7.5)."""
        return self.cuda_capability is not None and self.cuda_capability >= (7, 5)

    @property
    def sparse_2_4(self) -> bool:
        """2:4 sparse tensor cores arrived with Ampere (compute capability 8.0)."""
        return self.cuda_capability is not None and self.cuda_capability >= (8, 0)

    @property
    def fast_cpu_int8(self) -> bool:
        return self.vnni or self.amx

    @property
    def fast_cpu_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            int8_tensor_cores=self.int8_tensor_cores,
            sparse_2_4=self.sparse_2_4,
            fast_cpu_int8=self.fast_cpu_int8,
            fast_cpu_bf16=self.fast_cpu_bf16,
        )
        return data

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line (printed by `netshrink info`)."""
        yes = lambda flag: "yes" if flag else "no"  # noqa: E731
        out = [
            f"CPU: {self.cpu_name} ({self.cores} cores, torch kernels: {self.torch_cpu_capability})",
            f"  AVX2 {yes(self.avx2)}, AVX-512 {yes(self.avx512)}, VNNI {yes(self.vnni)}, "
            f"AVX-512 BF16 {yes(self.avx512_bf16)}, AMX {yes(self.amx)}",
            f"  fast INT8 GEMM: {yes(self.fast_cpu_int8)}; fast BF16: {yes(self.fast_cpu_bf16)}; "
            "fast FP16: no (no FP16 arithmetic units on x86 CPUs before AVX512-FP16)",
        ]
        if self.native_kernels:
            out.append("  netshrink native kernels (C++, compiled on first use): INT4/INT8 decoder yes, CNN yes, "
                       f"INT8 encoder {yes(self.avx512_bf16)} (needs AVX-512 BF16)")
        else:
            out.append("  netshrink native kernels: no (they need AVX-512 VNNI and a C++ compiler); torch's kernels "
                       "run instead")
        if self.cuda_capability is None:
            out.append("GPU: none (no 2:4 sparse or INT8 tensor-core speedups on this machine)")
        else:
            major, minor = self.cuda_capability
            out.append(
                f"GPU: {self.cuda_name} (compute capability {major}.{minor}; INT8 tensor cores "
                f"{yes(self.int8_tensor_cores)}, 2:4 sparse tensor cores {yes(self.sparse_2_4)})"
            )
        out.extend(self.notes)
        return out


def _cpu_flags() -> tuple[str, set[str]]:
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    name = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return name, flags


def detect() -> HardwareInfo:
    """Read this machine's CPU flags and CUDA device."""
    name, flags = _cpu_flags()
    cuda_name = cuda_cap = None
    if torch.cuda.is_available():
        cuda_name = torch.cuda.get_device_name(0)
        cuda_cap = tuple(torch.cuda.get_device_capability(0))
    return HardwareInfo(
        cpu_name=name,
        cores=os.cpu_count() or 1,
        avx2="avx2" in flags,
        avx512="avx512f" in flags,
        vnni="avx512_vnni" in flags or "avx_vnni" in flags,
        avx512_bf16="avx512_bf16" in flags,
        amx="amx_tile" in flags,
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cuda_name=cuda_name,
        cuda_capability=cuda_cap,
        native_kernels=_native_kernels(),
    )


def _native_kernels() -> bool:
    """Whether netshrink's C++ kernels can be built and run here (CPU features and a compiler; nothing compiled)."""
    from netshrink.native.build import compiler, missing_cpu_flags

    return not missing_cpu_flags() and compiler() is not None
