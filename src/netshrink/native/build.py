"""Compile one C++ source (plus the shared headers here) into a cached shared library and load it with ctypes.

A plain shared library (no torch headers, no pybind) builds in a few seconds with the system C++ compiler, and
ctypes releases the GIL for the whole call. Libraries are cached under ~/.cache/netshrink/native (or
$NETSHRINK_CACHE), named by a hash of the sources, flags and compiler, and written to a temporary name first.
`build_extension` builds a CPython extension module the same way (for call paths where ctypes' ~0.45 us per call
shows), when Python's headers are installed.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable

from netshrink.errors import NetshrinkError

HEADERS = Path(__file__).parent
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread",
         "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def missing_cpu_flags(extra: tuple[str, ...] = ()) -> list[str]:
    """The CPU features the kernels need (REQUIRED_CPU_FLAGS plus `extra`, /proc/cpuinfo names) that this machine
    lacks."""
    from netshrink.hardware import _cpu_flags

    _, flags = _cpu_flags()
    return [f for f in (*REQUIRED_CPU_FLAGS, *extra) if f not in flags]


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


def build(source: Path, where: str, fallback: str, extra_flags: tuple[str, ...] = (),
          extra_cpu_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build `source` (if its cached library is missing) and load it; errors name `where` and suggest `fallback`.
    `extra_flags` go to the compiler; `extra_cpu_flags` are CPU features needed beyond REQUIRED_CPU_FLAGS."""
    return ctypes.CDLL(str(compile_library(source, where, fallback, extra_flags, extra_cpu_flags)))


def build_extension(source: Path, name: str, where: str, fallback: str) -> ModuleType:
    """Build `source` as a CPython extension module (needs Python's headers) and import it as `name`."""
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        raise NetshrinkError(f"Python's headers are not installed (no {include / 'Python.h'})", where=where,
                             hint=f"install the Python development package, or use {fallback}")
    path = compile_library(source, where, fallback, (f"-I{include}",))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise NetshrinkError(f"cannot load {path} as a Python extension", where=where, hint=f"use {fallback}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_library(source: Path, where: str, fallback: str, extra_flags: tuple[str, ...] = (),
                    extra_cpu_flags: tuple[str, ...] = ()) -> Path:
    """The cached shared library built from `source` (compiled first if missing); see `build`."""
    if not source.is_file():
        raise NetshrinkError(f"kernel source {source.name} is missing from the installed package", where=str(source),
                             hint=f"reinstall netshrink, or use {fallback}")
    missing = missing_cpu_flags(extra_cpu_flags)
    if missing:
        raise NetshrinkError(f"this CPU lacks {', '.join(missing)}", where=where, hint=f"use {fallback} on this machine")
    cxx = compiler()
    if cxx is None:
        raise NetshrinkError("no C++ compiler found (c++ or g++, or $CXX)", where=where,
                             hint=f"install g++ or use {fallback}")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(HEADERS.glob("*.h")):
        digest.update(header.read_bytes())
    flags = [*FLAGS, *extra_flags]
    digest.update((" ".join(flags) + version).encode())
    target = cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cxx, *flags, f"-I{HEADERS}", str(source), "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
                raise NetshrinkError(f"compiling {source.name} failed: {errors[0] if errors else done.returncode}",
                                     where=str(source), hint=f"use {fallback}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def available(load: Callable[[], ctypes.CDLL], extra_cpu_flags: tuple[str, ...] = ()) -> bool:
    """Whether this CPU has the features and `load` (a kernel's cached build-and-load) succeeds."""
    if missing_cpu_flags(extra_cpu_flags):
        return False
    try:
        load()
    except NetshrinkError:
        return False
    return True
