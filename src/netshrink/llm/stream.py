"""Compress a checkpoint on disk block by block, in memory of about one block, resumable after a crash.

`compress_checkpoint(src, out, config, calibration)` reads a Hugging Face folder (config.json + sharded
safetensors), and for each decoder block: loads its tensors, compresses it on the current calibration activations,
writes it as its own output shard, then computes the next block's inputs. Work happens in `.<out>.partial/`;
after every block the shard, the activations and `state.json` (written last, the commit point) are written
atomically, so a killed run resumes from the last finished block and `out` appears only when complete.
Weight-only methods read one Linear at a time (`compress_block_lazily`); GPTQ reads one slab of a Linear's rows at a
time against a packed Hessian (`stream_gptq`); the other calibrated methods load the whole FP32 block.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from netshrink.atomic import atomic_file, refuse_existing
from netshrink.errors import NetshrinkError
from netshrink.llm.arch import LINEARS, arch_for
from netshrink.llm.context import QWEIGHT_ATTR, BlockContext
from netshrink.llm.calibration import calibration_ids, check_ids_in_vocab
from netshrink.llm.checks import check_finite, check_pack
from netshrink.llm.gptq import GPTQ
from netshrink.llm.packed_linear import PackedLinear
from netshrink.llm import rtn
from netshrink.llm.pipeline import NEEDS_CALIBRATION, compress_block, method_of
from netshrink.llm.rtn import RTN
from netshrink.llm.runner import BlockRunner
from netshrink.llm.safetensors_io import INDEX, ShardedCheckpoint, read_json
from netshrink.llm.smoothquant import W8A8Linear
from netshrink.llm.stream_gptq import gptq_block_from_disk

MANIFEST = "netshrink.json"
HESSIANS = {"auto": None, "packed": True, "dense": False}  # compress_checkpoint's `hessian` -> new_hessian's `packed`


def read_config(src: Path):
    """The transformers config of a checkpoint folder, checking the architecture is supported."""
    path = src / "config.json"
    if not path.exists():
        raise NetshrinkError("config.json missing", where=str(src))
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise NetshrinkError("config.json is not a JSON object", where=str(path))
    arch = arch_for(raw.get("model_type"), where=str(path))
    config = arch.config_class().from_dict(raw)
    config._attn_implementation = "sdpa"
    return arch, config, raw


def block_keys(arch, config, i: int) -> list[str]:
    """The tensor names decoder block i must have in the checkpoint."""
    with torch.device("meta"):
        block = arch.new_block(config, i)
    return [f"{arch.layers}.{i}.{k}" for k in block.state_dict()]


def check_names(ckpt: ShardedCheckpoint, arch, config, src: Path) -> None:
    """Every tensor the architecture needs is in the checkpoint, and nothing under the blocks is unexpected."""
    need = {arch.embed + ".weight", arch.norm + ".weight"}
    first = f"{arch.layers}.0."
    local = [k[len(first):] for k in block_keys(arch, config, 0)]   # every block has the same names
    for i in range(config.num_hidden_layers):
        need.update(f"{arch.layers}.{i}.{k}" for k in local)
    if not getattr(config, "tie_word_embeddings", False):
        need.add(arch.lm_head + ".weight")
    have = set(ckpt.names())
    missing = sorted(need - have)
    extra = sorted(n for n in have - need if n.startswith(arch.layers + "."))
    if missing or extra:
        detail = (f"missing {missing[:5]}" if missing else "") + (f" unexpected {extra[:5]}" if extra else "")
        raise NetshrinkError(f"tensor names do not match the {arch.model_type} architecture: {detail.strip()}",
                             where=str(src), hint=f"{len(missing)} missing, {len(extra)} unexpected")


def check_shapes(ckpt: ShardedCheckpoint, arch, config) -> None:
    """Every tensor's header shape is the one the architecture expects (the meta-device block's, and the config's
    for the embedding, final norm and LM head), so a wrong-shaped tensor is refused before any block runs."""
    with torch.device("meta"):
        local = {k: list(v.shape) for k, v in arch.new_block(config, 0).state_dict().items()}
    table = [config.vocab_size, config.hidden_size]
    want = {arch.embed + ".weight": table, arch.norm + ".weight": [config.hidden_size], arch.lm_head + ".weight": table}
    for i in range(config.num_hidden_layers):
        want.update({f"{arch.layers}.{i}.{k}": shape for k, shape in local.items()})
    for name in ckpt.names():
        if name in want:
            _, got, _, source = ckpt.raw_location(name)
            if got != want[name]:
                raise NetshrinkError(f"tensor {name} has shape {got}, expected {want[name]}", where=str(source),
                                     hint="the weights do not fit config.json")


def fingerprint(src: Path, config: Any, ids: torch.Tensor | None, pack: bool) -> str:
    """What a partial run was started with; resuming with anything else is refused."""
    h = hashlib.sha256()
    h.update(json.dumps([str(src.resolve()), type(config).__name__, dataclasses.asdict(config), pack],
                        sort_keys=True, default=str).encode())
    if ids is not None:
        h.update(ids.numpy().tobytes())
    return h.hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str))


def load_block(ckpt: ShardedCheckpoint, arch, config, i: int) -> nn.Module:
    """Decoder block i with its weights from the checkpoint (float32), built without random initialisation."""
    keys = block_keys(arch, config, i)
    tensors = ckpt.load(keys)
    with torch.device("meta"):
        block = arch.new_block(config, i)
    prefix = f"{arch.layers}.{i}."
    block.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, assign=True)
    return block.float().eval()


def compress_block_lazily(ckpt: ShardedCheckpoint, arch, config, i: int, method_config: Any, where: str,
                          pack: bool) -> tuple[nn.Module, dict[str, dict]]:
    """A weight-only method (no calibration) on block i, one Linear at a time.

    Each Linear is read from the checkpoint just before it is compressed and, with `pack`, swapped for its packed
    form right after, so the block never holds all of its FP32 weights at once: peak memory is about the largest
    Linear plus the packed block, under one FP32 block. Packed RTN goes further and reads each weight 64 rows at a
    time (`_rtn_packed_from_disk`).
    """
    block, _ = arch.block_without_linears(config, i, ckpt.load)
    prefix = f"{arch.layers}.{i}."
    if pack and isinstance(method_config, RTN):
        return _rtn_packed_from_disk(ckpt, block, prefix, method_config, where), {
            f"{where}.{name}": rtn.record(method_config) for name in LINEARS}

    def enter(name: str) -> None:
        layer = block.get_submodule(name)            # still on the meta device: give it its real tensors
        keys = {p: f"{prefix}{name}.{p}" for p, _ in layer.named_parameters()}
        tensors = ckpt.load(keys.values())
        for p, key in keys.items():
            check_finite(tensors[key], f"{where}.{name}", p)
            setattr(layer, p, nn.Parameter(tensors[key], requires_grad=False))

    def exit_(name: str) -> None:
        layer = block.get_submodule(name)
        qw = getattr(layer, QWEIGHT_ATTR, None)
        if pack and qw is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent_name), child, PackedLinear.from_quantized(qw, layer.bias))

    ctx = BlockContext(block, None, None, where, on_enter=enter, on_exit=exit_, packed_on_exit=pack)
    method_of(method_config)(ctx, method_config)
    return block.eval(), ctx.records


def _rtn_packed_from_disk(ckpt: ShardedCheckpoint, block: nn.Module, prefix: str, config: RTN,
                          where: str) -> nn.Module:
    """RTN straight from the shard into packed layers, 64 rows at a time: not even one Linear's FP32 weight is
    ever whole in memory (same tensors as the per-Linear path; tested)."""
    for name in LINEARS:
        key = f"{prefix}{name}.weight"
        _, shape, _, _ = ckpt.raw_location(key)
        if len(shape) != 2:
            raise NetshrinkError(f"expected a 2-d weight, got shape {shape}", where=key)

        def read(a: int, b: int, key: str = key, name: str = name) -> torch.Tensor:
            rows = ckpt.read_rows(key, a, b).float()
            check_finite(rows, f"{where}.{name}")
            return rows

        qw = rtn.quantize_in_row_chunks(read, shape[0], config)
        bias_key = f"{prefix}{name}.bias"
        bias = ckpt.read(bias_key).float() if bias_key in ckpt.weight_map else None
        if bias is not None:
            check_finite(bias, f"{where}.{name}", "bias")
        parent_name, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent_name), child, PackedLinear.from_quantized(qw, bias))
    return block.eval()


@torch.no_grad()
def compress_checkpoint(src: str | os.PathLike, out: str | os.PathLike, config: Any, calibration: Any = None, *,
                        tokenizer: Any = None, n_samples: int = 32, seq_len: int = 512, batch_size: int = 8,
                        pack: bool = True, seed: int = 0, resume: bool = True, hessian: str = "auto",
                        on_block_done: Callable[[int, int], None] | None = None) -> Path:
    """Compress checkpoint folder `src` into new folder `out` block by block (see module doc); returns `out`.

    `hessian` (streamed GPTQ): "packed" stores each Hessian as its upper triangle (least memory), "dense" as the
    whole matrix (its factorisation is 4-10x faster), "auto" packs inputs up to 4096 wide."""
    if hessian not in HESSIANS:
        raise NetshrinkError(f"hessian must be 'auto', 'packed' or 'dense', got {hessian!r}",
                             where="compress_checkpoint")
    src, out = Path(src), refuse_existing(out, "output checkpoint")
    method_of(config)
    check_pack(config, pack)
    arch, hf_config, raw_config = read_config(src)
    ckpt = ShardedCheckpoint(src)
    check_names(ckpt, arch, hf_config, src)
    check_shapes(ckpt, arch, hf_config)
    n_blocks = hf_config.num_hidden_layers
    ids = None
    if calibration is not None or isinstance(config, NEEDS_CALIBRATION):
        if calibration is None:
            raise NetshrinkError(f"{type(config).__name__} needs calibration data", where="compress_checkpoint")
        ids = calibration_ids(calibration, tokenizer, n_samples, seq_len, seed)
        check_ids_in_vocab(ids, ckpt.raw_location(arch.embed + ".weight")[1][0], arch.embed + ".weight")
    work = out.parent / f".{out.name}.partial"
    state_path = work / "state.json"
    fp = fingerprint(src, config, ids, pack)
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else None
    if state is not None and state.get("fingerprint") != fp:
        raise NetshrinkError("a partial run with different settings is in the way", where=str(work),
                             hint="remove it, or resume with the same source, config and calibration")
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        state = {"fingerprint": fp, "next_block": 0, "hidden": None, "records": {}}
    hidden = runner = None
    if ids is not None:
        if state["hidden"]:
            with safe_open(work / state["hidden"], "pt") as handle:
                hidden = handle.get_tensor("hidden")
        else:
            uniq, inverse = torch.unique(ids, return_inverse=True)
            hidden = ckpt.rows(arch.embed + ".weight", uniq)[inverse]
        runner = BlockRunner(arch.rotary(hf_config), ids.shape[1], hidden.shape[-1], batch_size)
    for i in range(state["next_block"], n_blocks):
        where = f"{arch.layers}.{i}"
        if ids is None:
            block, records = compress_block_lazily(ckpt, arch, hf_config, i, config, where, pack)
        elif pack and isinstance(config, GPTQ) and config.true_sequential:
            block, records, hidden = gptq_block_from_disk(ckpt, arch, hf_config, i, config, hidden, runner, where,
                                                          HESSIANS[hessian])
        else:
            block = load_block(ckpt, arch, hf_config, i)
            records, hidden = compress_block(block, hidden, runner, config, where, pack)
        shard = f"block-{i:05d}.safetensors"
        tensors = {f"{where}.{k}": v.contiguous() for k, v in block.state_dict().items()}
        with atomic_file(work / shard, overwrite=True) as tmp:
            save_file(tensors, str(tmp))
        old = state["hidden"]
        if hidden is not None:
            state["hidden"] = f"hidden-{i + 1:05d}.safetensors"
            with atomic_file(work / state["hidden"], overwrite=True) as tmp:
                save_file({"hidden": hidden.contiguous()}, str(tmp))
        state["records"].update(records)
        state["next_block"] = i + 1
        write_json(state_path, state)
        if old and old != state["hidden"]:
            (work / old).unlink(missing_ok=True)
        del block, tensors
        if on_block_done is not None:
            on_block_done(i + 1, n_blocks)
    finish(ckpt, arch, hf_config, raw_config, work, out, state, config, n_blocks)
    return out


def finish(ckpt: ShardedCheckpoint, arch, hf_config, raw_config: dict, work: Path, out: Path, state: dict,
           config: Any, n_blocks: int) -> None:
    """Copy the non-block tensors, write index, config and manifest, then rename the folder into place."""
    rest = [n for n in ckpt.names() if not n.startswith(arch.layers + ".")]
    ckpt.copy_to(rest, work / "rest.safetensors")
    weight_map = {n: "rest.safetensors" for n in rest}
    for i in range(n_blocks):
        shard = f"block-{i:05d}.safetensors"
        with safe_open(work / shard, "pt") as handle:
            weight_map.update({k: shard for k in handle.keys()})
    write_json(work / INDEX, {"metadata": {}, "weight_map": weight_map})
    raw = dict(raw_config)
    raw["torch_dtype"] = "float32"
    raw["quantization_config"] = {"quant_method": "netshrink", "method": getattr(config, "method", ""),
                                  **dataclasses.asdict(config)}
    write_json(work / "config.json", raw)
    write_json(work / MANIFEST, {"format": "netshrink-llm-1", "method": getattr(config, "method", ""),
                                 "config": dataclasses.asdict(config), "layers": state["records"]})
    (work / "state.json").unlink()
    if state["hidden"]:
        (work / state["hidden"]).unlink(missing_ok=True)
    os.replace(work, out)


def load_compressed(folder: str | os.PathLike) -> nn.Module:
    """Load a `compress_checkpoint` output as a runnable causal LM (PackedLinear / W8A8Linear where stored)."""
    folder = Path(folder)
    arch, hf_config, _ = read_config(folder)
    hf_config.quantization_config = None
    ckpt = ShardedCheckpoint(folder)
    names = set(ckpt.names())
    records = json.loads((folder / MANIFEST).read_text())["layers"] if (folder / MANIFEST).exists() else {}
    model = arch.causal_lm_class()(hf_config).float().eval()
    for i, block in enumerate(model.get_submodule(arch.layers)):
        for name in LINEARS:
            key = f"{arch.layers}.{i}.{name}"
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            layer = getattr(parent, child)
            if f"{key}.qweight" in names:
                rec = records.get(key, {})
                setattr(parent, child, PackedLinear(layer.in_features, layer.out_features, rec["bits"],
                                                    rec.get("group_size"), bias=f"{key}.bias" in names))
            elif f"{key}.weight_int8" in names:
                setattr(parent, child, W8A8Linear(layer.in_features, layer.out_features,
                                                  bias=f"{key}.bias" in names))
    state = ckpt.load(ckpt.names(), dtype=None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {arch.lm_head + ".weight"} if getattr(hf_config, "tie_word_embeddings", False) else set()
    if set(missing) - allowed or unexpected:
        raise NetshrinkError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}",
                             where=str(folder))
    model.tie_weights()
    return model
