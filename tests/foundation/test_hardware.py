"""Hardware record: derived capabilities follow NVIDIA's compute-capability thresholds."""
from __future__ import annotations

from netshrink.hardware import HardwareInfo, detect


def test_gpu_thresholds():
    assert not HardwareInfo(cuda_capability=(7, 0)).int8_tensor_cores
    assert HardwareInfo(cuda_capability=(7, 5)).int8_tensor_cores
    assert not HardwareInfo(cuda_capability=(7, 5)).sparse_2_4
    assert HardwareInfo(cuda_capability=(8, 0)).sparse_2_4 and HardwareInfo(cuda_capability=(9, 0)).sparse_2_4


def test_detect_reads_this_machine():
    hw = detect()
    assert hw.cores >= 1
    flags = open("/proc/cpuinfo").read()
    assert hw.vnni == ("avx512_vnni" in flags or "avx_vnni" in flags)
    assert hw.avx512 == ("avx512f" in flags)
    assert any("VNNI" in line for line in hw.lines())
    assert set(hw.to_dict()) >= {"vnni", "sparse_2_4", "int8_tensor_cores", "native_kernels"}
    from netshrink.native.build import compiler, missing_cpu_flags

    assert hw.native_kernels == (not missing_cpu_flags() and compiler() is not None)
    assert any("native kernels" in line for line in hw.lines())
