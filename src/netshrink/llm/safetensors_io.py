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
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_json(path: Path) -> object:
    """A JSON file's content; a file that is not valid JSON raises NetshrinkError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise NetshrinkError(f"not valid JSON ({exc})", where=str(path)) from exc


def read_index(path: Path) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file) of a `model.safetensors.index.json`."""
    data = read_json(path)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise NetshrinkError("index has no 'weight_map' of tensor names to shard files", where=str(path),
                             hint='expected {"weight_map": {"<tensor name>": "<shard file>", ...}}')
    return weight_map


class ShardedCheckpoint:
    """Tensor names -> shard files of a safetensors checkpoint folder (index json or a single file)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            weight_map = read_index(index)
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
        self._headers: dict[Path, tuple[int, dict]] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def load(self, names: Iterable[str], dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """The named tensors, read with plain file reads (no memory map, so no file pages stay resident)."""
        out = {}
        for n in names:
            if n not in self.weight_map:
                raise NetshrinkError(f"tensor {n!r} not in checkpoint", where=str(self.folder))
            t = self.read(n)
            out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def read(self, name: str) -> torch.Tensor:
        """One tensor, its bytes read straight into a new tensor."""
        return self.read_rows(name, 0, None)

    def read_rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (along its first dimension; stop None = to the end), read with one plain
        read of their contiguous bytes, so a large weight can be processed a slab at a time."""
        dtype, shape, (begin, end), source = self.raw_location(name)
        if dtype not in DTYPES:
            raise NetshrinkError(f"tensor {name!r} has unsupported dtype {dtype}", where=str(source))
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        if not 0 <= start <= stop <= rows:
            raise NetshrinkError(f"rows [{start}, {stop}) are outside {name!r}, which has {rows}",
                                 where=str(source))
        row_bytes = (end - begin) // max(rows, 1)
        raw = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with open(source, "rb", buffering=0) as fh:
            fh.seek(begin + start * row_bytes)
            _read_exact(fh, memoryview(raw.numpy()), source)
        return raw.view(DTYPES[dtype]).reshape([stop - start, *shape[1:]] if shape else shape)

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of a 2-d tensor (e.g. embeddings of the calibration tokens), as float32.

        Each row is a plain read (`read_rows`), not a slice of a memory map: a page fault in a mapped file maps its
        neighbours too (fault-around and readahead), and 256 scattered rows of a 49152 x 576 embedding mapped about
        40 MiB into the resident set for 0.6 MiB of rows."""
        _, shape, _, source = self.raw_location(name)
        n_rows = shape[0] if shape else 0
        bad = [int(i) for i in index.tolist() if not 0 <= int(i) < n_rows]
        if bad:
            raise NetshrinkError(f"index {bad[0]} is outside {name!r}, which has {n_rows} rows", where=str(source),
                                 hint="calibration token ids must be smaller than the vocabulary size")
        return torch.cat([self.read_rows(name, int(i), int(i) + 1) for i in index.tolist()]).float()

    def copy_to(self, names: list[str], path: Path, chunk_bytes: int = 1 << 20) -> None:
        """Write the named tensors unchanged into one new safetensors file (atomic).

        Bytes are copied with plain reads in chunks, not through a memory map: pages touched through a map count in
        the process's resident set, so mapping a 100 MB embedding table would grow peak memory by its full size.
        """
        header, offset, specs = {}, 0, []
        for n in names:
            dtype, shape, (begin, end), source = self.raw_location(n)
            header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + end - begin]}
            specs.append((source, begin, end))
            offset += end - begin
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((-len(blob)) % 8)
        buffer = bytearray(chunk_bytes)
        with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for source, begin, end in specs:
                with open(source, "rb", buffering=0) as src:
                    src.seek(begin)
                    for at in range(begin, end, chunk_bytes):
                        chunk = memoryview(buffer)[:min(chunk_bytes, end - at)]
                        _read_exact(src, chunk, source)
                        fh.write(chunk)

    def raw_location(self, name: str) -> tuple[str, list[int], tuple[int, int], Path]:
        """(dtype, shape, absolute byte range, shard path) of one tensor, from its shard's header."""
        source = self.folder / self.weight_map[name]
        data_start, meta = self._header(source)
        if name not in meta:
            raise NetshrinkError(f"tensor {name!r} not in its shard", where=str(source))
        begin, end = meta[name]["data_offsets"]
        return meta[name]["dtype"], list(meta[name]["shape"]), (data_start + begin, data_start + end), source

    def _header(self, source: Path) -> tuple[int, dict]:
        """(offset of the data, tensor table) of one shard, parsed once per shard."""
        if source not in self._headers:
            with open(source, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                self._headers[source] = (8 + length, json.loads(fh.read(length)))
        return self._headers[source]


def _read_exact(fh, view: memoryview, source: Path) -> None:
    """Fill `view` from the file's current position; a short file is a truncated shard."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise NetshrinkError("checkpoint shard is truncated", where=str(source))
        got += n
