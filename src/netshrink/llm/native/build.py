"""Compile decode.cpp once per machine into a cached shared library and load it with ctypes.

A plain shared library (no torch headers, no pybind) builds in about two seconds with the system C++ compiler,
and ctypes releases the GIL for the whole call. The library is cached under ~/.cache/netshrink/native (or
$NETSHRINK_CACHE), named by a hash of the source, flags and compiler, and written to a temporary name first.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from netshrink.errors import NetshrinkError

SOURCE = Path(__file__).with_name("decode.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread",
         "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def missing_cpu_flags() -> list[str]:
    """The CPU features the kernel needs that this machine lacks."""
    from netshrink.hardware import _cpu_flags

    _, flags = _cpu_flags()
    return [f for f in REQUIRED_CPU_FLAGS if f not in flags]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def cache_dir() -> Path:
    """$NETSHRINK_CACHE/native, else ~/.cache/netshrink/native, else (no writable home) the temp directory's."""
    if "NETSHRINK_CACHE" in os.environ:
        return Path(os.environ["NETSHRINK_CACHE"]) / "native"
    home = Path.home() / ".cache" / "netshrink" / "native"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "netshrink-native"


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Build (if needed) and load the decode library, with its C signatures declared."""
    missing = missing_cpu_flags()
    if missing:
        raise NetshrinkError(f"this CPU lacks {', '.join(missing)}", where="native decoder",
                             hint="use netshrink.llm.decode.LeanDecoder (torch's kernels) on this machine")
    cxx = compiler()
    if cxx is None:
        raise NetshrinkError("no C++ compiler found (c++ or g++, or $CXX)", where="native decoder",
                             hint="install g++ or use netshrink.llm.decode.LeanDecoder")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"decode-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
                raise NetshrinkError(f"compiling {SOURCE.name} failed: {errors[0] if errors else done.returncode}",
                                     where=str(SOURCE), hint="use netshrink.llm.decode.LeanDecoder")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.nsd_create.restype = p
    lib.nsd_create.argtypes = [i, i, i, i, i, i, i, i, i, f, f, p, p, p, p]
    lib.nsd_set_matrix.restype = None
    lib.nsd_set_matrix.argtypes = [p, i, i, p, p, p, p, i, i, i, i, i]
    lib.nsd_set_norms.restype = None
    lib.nsd_set_norms.argtypes = [p, i, p, p, p, p]
    lib.nsd_forward.restype = i
    lib.nsd_forward.argtypes = [p, p, i, i, p]
    lib.nsd_generate.restype = None
    lib.nsd_generate.argtypes = [p, p, i, i, p]
    lib.nsd_destroy.restype = None
    lib.nsd_destroy.argtypes = [p]
    lib.nsd_profile.restype = None
    lib.nsd_profile.argtypes = [p, p]
    lib.nsd_matvec.restype = None
    lib.nsd_matvec.argtypes = [p, p, p, p, i, i, i, i, i, i, p, p]
    return lib
