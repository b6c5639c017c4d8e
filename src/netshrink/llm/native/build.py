"""Load decode.cpp's library (built on first use by `netshrink.native.build`) with its C signatures declared."""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

from netshrink.native.build import missing_cpu_flags  # noqa: F401  (re-exported: the decoder checks the CPU with it)
from netshrink.native.build import build

SOURCE = Path(__file__).with_name("decode.cpp")


@lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """Build (if needed) and load the decode library, with its C signatures declared."""
    lib = build(SOURCE, where="native decoder", fallback="netshrink.llm.decode.LeanDecoder")
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.nsd_create.restype = p
    lib.nsd_create.argtypes = [i, i, i, i, i, i, i, i, f, f, p, p, p, p]
    lib.nsd_set_matrix.restype = None
    lib.nsd_set_shard.restype = None
    lib.nsd_set_shard.argtypes = [p, i, i, i, i, i, i, i]
    lib.nsd_set_matrix.argtypes = [p, i, i, i, p, p, p, p, i, i, i, i, i]
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
