"""Reading (sharded) safetensors checkpoints tensor by tensor, and writing a safetensors file in chunks.

Nothing here loads a whole checkpoint: a block's tensors are read by name, embedding rows by slice, and large
tensors are copied to the output in row chunks, so memory stays at about one block whatever the model's size.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from netshrink.atomic import atomic_file
from netshrink.errors import NetshrinkError

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                      "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


class ShardedCheckpoint:
    """Tensor names -> shard files of a safetensors checkpoint folder (index json or a single file)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise NetshrinkError("no safetensors weights found", where=str(self.folder),
                                     hint=f"expected {INDEX} or *.safetensors")
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as handle:
                    weight_map.update({k: f.name for k in handle.keys()})
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).exists()})
        if missing:
            raise NetshrinkError(f"checkpoint shard(s) missing: {', '.join(missing)}", where=str(self.folder))
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def load(self, names: Iterable[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """The named tensors (each shard opened once, closed after)."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise NetshrinkError(f"tensor {n!r} not in checkpoint", where=str(self.folder))
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(self.folder / f, "pt") as handle:
                for n in ns:
                    t = handle.get_tensor(n)
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of a 2-d tensor (e.g. embeddings of the calibration tokens), read one slice each."""
        with safe_open(self.folder / self.weight_map[name], "pt") as handle:
            sl = handle.get_slice(name)
            return torch.stack([sl[int(i): int(i) + 1][0] for i in index.tolist()]).float()

    def info(self, name: str) -> tuple[str, list[int]]:
        with safe_open(self.folder / self.weight_map[name], "pt") as handle:
            sl = handle.get_slice(name)
            return sl.get_dtype(), list(sl.get_shape())

    def copy_to(self, names: list[str], path: Path, chunk_rows: int = 4096) -> None:
        """Write the named tensors unchanged into one new safetensors file, streaming row chunks (atomic)."""
        header, offset, specs = {}, 0, []
        for n in names:
            dtype, shape = self.info(n)
            nbytes = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
            for d in shape:
                nbytes *= d
            header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            specs.append((n, shape))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for n, shape in specs:
                with safe_open(self.folder / self.weight_map[n], "pt") as handle:
                    sl = handle.get_slice(n)
                    rows = shape[0] if shape else 1
                    for a in range(0, rows, chunk_rows):
                        t = sl[a: a + chunk_rows] if shape else handle.get_tensor(n)
                        fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
