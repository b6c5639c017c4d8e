"""`NativeDecoder`: greedy batch-1 decoding with each token one C++ call (decode.cpp) over packed weights.

`LeanDecoder` removed transformers' per-layer machinery, yet still pays about 10 us of dispatch per kernel call
and per small op: some 400 calls a token on SmolLM2, several times the time its weights take to stream. Here
the whole token runs natively, on this machine's threads, with activations quantized to int8 per block of 64
so the VNNI dot products read the packed codes directly. Each thread owns a shard of every block (its heads and
a slice of the MLP: shards.py), so threads meet twice per block rather than around every matrix. Logits differ
from the model's forward by that activation rounding (tests bound it), and between thread counts by the order in
which the shards' partial sums are added; the weights are the model's own grid, untouched.
"""
from __future__ import annotations

import ctypes

import torch
from torch import nn

from netshrink.errors import NetshrinkError
from netshrink.llm.arch import arch_of
from netshrink.llm.decode import check_length, sliding_window
from netshrink.llm.fuse import FusedSlice
from netshrink.llm.native.build import load_library, missing_cpu_flags
from netshrink.llm.native.layout import NativeMatrix, check_native, layout_nbytes, native_matrix
from netshrink.llm.native.shards import grid_columns, grid_rows, plan_shards
from netshrink.llm.packed_linear import PackedLinear
from netshrink.llm.packing import QuantizedWeight

QKV, O, GATE_UP, DOWN, HEAD = range(5)


def native_available() -> bool:
    """Whether this CPU has the instructions the native kernel uses (the compiler is checked when it builds)."""
    return not missing_cpu_flags()


def _grid(module: nn.Module, name: str) -> tuple[QuantizedWeight, torch.Tensor | None]:
    if not isinstance(module, PackedLinear):
        raise NetshrinkError(f"{name} is a {type(module).__name__}, not a packed layer", where=name,
                             hint="pack the model (netshrink.llm methods with pack=True, pack_lm_head) first, "
                                  "or decode it with netshrink.llm.decode.LeanDecoder")
    return module.quantized_weight(), module.bias


def _stacked(modules: list[nn.Module], names: list[str]) -> tuple[QuantizedWeight, torch.Tensor | None]:
    """Sibling projections (q/k/v or gate/up) as one grid whose rows are theirs in order, with its bias."""
    if all(isinstance(m, FusedSlice) for m in modules) and len({id(m._shared[0]) for m in modules}) == 1:
        modules, names = [modules[0]._shared[0].fused], [names[0] + " (fused)"]
    grids = [_grid(m, n) for m, n in zip(modules, names)]
    first = grids[0][0]
    for (qw, _), name in zip(grids, names):
        if (qw.shape[1], qw.bits, qw.group_size) != (first.shape[1], first.bits, first.group_size):
            raise NetshrinkError(f"{name} is packed as {qw.bits}-bit g{qw.group_size}, unlike {names[0]} "
                                 f"({first.bits}-bit g{first.group_size})", where=name,
                                 hint="the native decoder stacks q/k/v and gate/up: pack them alike")
    qw = QuantizedWeight(torch.cat([g.codes for g, _ in grids]), torch.cat([g.scales for g, _ in grids]),
                         torch.cat([g.zeros for g, _ in grids]), first.bits, first.group_size)
    biases = [b for _, b in grids]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.float() if b is not None else torch.zeros(g.shape[0]) for (g, _), b in zip(grids, biases)])
    return qw, bias


def _bias_rows(bias: torch.Tensor | None, ranges: list[tuple[int, int]]) -> torch.Tensor | None:
    return None if bias is None else torch.cat([bias[a:b] for a, b in ranges])


HUGE_PAGE = 2 << 20


def _huge_page_arena(entries: list[tuple[int, int, int, NativeMatrix]]) -> torch.Tensor | None:
    """Move every matrix's tensors into one buffer backed by 2 MiB pages where the kernel allows (Linux, THP in
    "madvise" or "always" mode): a token streams all the weights, and with 4 KiB pages it would cross one TLB
    entry per 4 KiB. Returns the buffer (kept alive by the decoder), or None where madvise is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    slots = [(m, name) for *_, m in entries for name in ("codes", "scales", "zeros")]
    sizes = [getattr(m, name).numel() * getattr(m, name).element_size() for m, name in slots]
    total = sum(-(-n // 64) * 64 for n in sizes)                   # each tensor starts on a cache line
    arena = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)     # large: mmap'd, pages not touched yet
    start = (-arena.data_ptr()) % HUGE_PAGE
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    length = (total + HUGE_PAGE - start) // HUGE_PAGE * HUGE_PAGE              # whole pages inside the buffer
    if madvise(arena.data_ptr() + start, length, 14) != 0:                      # MADV_HUGEPAGE
        return None
    offset = start
    for (m, name), n in zip(slots, sizes):
        t = getattr(m, name)
        view = arena[offset: offset + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        setattr(m, name, view)
        offset += -(-n // 64) * 64
    return arena


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class NativeDecoder:
    """Greedy batch-1 decoding of a packed Llama/Mistral/Qwen2/Qwen3 model, one native call per token."""

    def __init__(self, model: nn.Module, max_len: int = 1024, threads: int | None = None, huge_pages: bool = True):
        arch = arch_of(model)
        config = model.config
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise NetshrinkError(f"activation {act!r} is not SiLU", where="config.hidden_act",
                                 hint="decode it with netshrink.llm.decode.LeanDecoder")
        self.window = sliding_window(config)
        if max_len < 1 or (threads is not None and threads < 1):
            raise NetshrinkError(f"need max_len >= 1 and threads >= 1, got {max_len} and {threads}",
                                 where="NativeDecoder")
        self.lib = load_library()
        self.max_len, self.threads = max_len, threads or torch.get_num_threads()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if self.head_dim > 1024 or self.head_dim % 16:
            raise NetshrinkError(f"head_dim={self.head_dim} is not supported", where="config.head_dim")
        blocks = model.get_submodule(arch.layers)
        embed = model.get_submodule(arch.embed).weight
        self.embed = embed.detach().float().contiguous()
        self.vocab, self.hidden = self.embed.shape
        with torch.inference_mode():
            cos, sin = model.get_submodule("model.rotary_emb")(torch.zeros(1), torch.arange(max_len)[None])
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()   # [max_len, head_dim]
        final_norm = model.get_submodule(arch.norm)
        self.eps = float(final_norm.variance_epsilon)
        self.keep: list[torch.Tensor] = [self.embed, self.cos, self.sin]
        self.final_norm = self._vector(final_norm.weight)
        self._pending: list[tuple[int, int, int, NativeMatrix]] = []
        first = blocks[0].self_attn
        scaling = float(first.scaling)
        H, KV, D, t = self.heads, self.kv_heads, self.head_dim, self.threads
        o_grid = _grid(first.o_proj, f"{arch.layers}.0.self_attn.o_proj")[0]
        down_grid = _grid(blocks[0].mlp.down_proj, f"{arch.layers}.0.mlp.down_proj")[0]
        inter = down_grid.shape[1]
        self.shards = plan_shards(H, KV, D, inter, o_grid.group_size, down_grid.group_size, t)
        handle = self.lib.nsd_create(len(blocks), self.hidden, H, KV, D, self.vocab, max_len, t,
                                     self.eps, scaling, _ptr(self.embed), _ptr(self.cos), _ptr(self.sin),
                                     _ptr(self.final_norm))
        self._handle = handle
        for k, sh in enumerate(self.shards):
            self.lib.nsd_set_shard(handle, k, sh.h0, sh.h1, sh.j0, sh.j1, sh.i0, sh.i1)
        self._unique_bytes = 0
        self.shard_matrices: list[list[dict[int, NativeMatrix]]] = [[{} for _ in blocks] for _ in range(t)]
        for i, block in enumerate(blocks):
            p = f"{arch.layers}.{i}"
            if float(block.self_attn.scaling) != scaling:
                raise NetshrinkError("blocks differ in attention scaling", where=f"{p}.self_attn")
            self._add_block(i, block, p, inter, (o_grid.group_size, down_grid.group_size))
            attn = block.self_attn
            norms = [block.input_layernorm, block.post_attention_layernorm,
                     getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
            for norm in filter(None, norms):
                if abs(float(norm.variance_epsilon) - self.eps) > 0:
                    raise NetshrinkError("RMSNorm epsilons differ between norms", where=p)
            self.lib.nsd_set_norms(handle, i, *[_ptr(self._vector(n.weight)) if n is not None else None
                                                for n in norms])
        head = model.get_submodule(arch.lm_head)
        head_grid, head_bias = _grid(head, arch.lm_head)
        self._unique_bytes += layout_nbytes(head_grid, head_bias)
        self.head_matrix = native_matrix(head_grid, head_bias, arch.lm_head, t)
        self._set(0, 0, HEAD, self.head_matrix)
        self._pending.sort(key=lambda e: (e[2] == HEAD, e[0], e[1], e[2]))   # each thread's weights in one run
        self._arena = _huge_page_arena(self._pending) if huge_pages else None
        for thread, layer, which, m in self._pending:
            self.lib.nsd_set_matrix(self._handle, thread, layer, which, _ptr(m.codes), _ptr(m.scales),
                                    _ptr(m.zeros), _ptr(m.bias), m.rows, m.cols, m.bits, m.groups,
                                    m.blocks_per_group)
        del self._pending
        self._token = torch.zeros(1, dtype=torch.int64)    # step()'s one-token buffer
        self._token_ptr = self._token.data_ptr()
        self._forward = self.lib.nsd_forward
        self.pos = 0

    def _add_block(self, i: int, block: nn.Module, p: str, inter: int, planned_groups: tuple[int, int]) -> None:
        """Check block i's grids and give each thread its shard of them (see `shards.plan_shards`)."""
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        attn, mlp = block.self_attn, block.mlp
        qkv = _stacked([attn.q_proj, attn.k_proj, attn.v_proj], [f"{p}.self_attn.{n}_proj" for n in "qkv"])
        o = _grid(attn.o_proj, f"{p}.self_attn.o_proj")
        gate_up = _stacked([mlp.gate_proj, mlp.up_proj], [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        down = _grid(mlp.down_proj, f"{p}.mlp.down_proj")
        expected = {"q/k/v": (qkv, ((H + 2 * KV) * D, self.hidden), None),
                    "o_proj": (o, (self.hidden, H * D), planned_groups[0]),
                    "gate/up": (gate_up, (2 * inter, self.hidden), None),
                    "down_proj": (down, (self.hidden, inter), planned_groups[1])}
        for name, ((qw, bias), shape, group) in expected.items():
            if qw.shape != shape:
                raise NetshrinkError(f"a {qw.shape[0]}x{qw.shape[1]} {name} where the config implies "
                                     f"{shape[0]}x{shape[1]}", where=p)
            if group is not None and qw.group_size != group:
                raise NetshrinkError(f"{name} is quantized with group size {qw.group_size}, block 0's with {group}",
                                     where=f"{p}.{name}", hint="the native decoder splits every block alike")
            check_native(qw.shape[1], qw.bits, qw.group_size, f"{p} {name}")
            self._unique_bytes += layout_nbytes(qw, bias)
        for k, sh in enumerate(self.shards):
            parts = {}
            if sh.h1 > sh.h0:
                rows = [(sh.h0 * D, sh.h1 * D), ((H + sh.j0) * D, (H + sh.j1) * D),
                        ((H + KV + sh.j0) * D, (H + KV + sh.j1) * D)]
                parts[QKV] = (grid_rows(qkv[0], rows), _bias_rows(qkv[1], rows), "self_attn.q/k/v")
                parts[O] = (grid_columns(o[0], sh.h0 * D, sh.h1 * D), o[1] if sh.h0 == 0 else None, "self_attn.o_proj")
            if sh.i1 > sh.i0:
                rows = [(sh.i0, sh.i1), (inter + sh.i0, inter + sh.i1)]
                parts[GATE_UP] = (grid_rows(gate_up[0], rows), _bias_rows(gate_up[1], rows), "mlp.gate/up")
                parts[DOWN] = (grid_columns(down[0], sh.i0, sh.i1), down[1] if sh.i0 == 0 else None, "mlp.down_proj")
            for which, (qw, bias, name) in parts.items():
                self._set(k, i, which, native_matrix(qw, bias, f"{p}.{name} (thread {k}'s share)"))

    def _vector(self, t: torch.Tensor) -> torch.Tensor:
        v = t.detach().float().contiguous()
        self.keep.append(v)
        return v

    def _set(self, thread: int, layer: int, which: int, m: NativeMatrix) -> None:
        self._pending.append((thread, layer, which, m))
        if which != HEAD:
            self.shard_matrices[thread][layer][which] = m

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle:
            self.lib.nsd_destroy(handle)
            self._handle = None

    @property
    def weight_bytes(self) -> int:
        """The model's bytes per token in this layout: every packed matrix once with its scales, plus one
        embedding row. The floor; the threads read a little more (`bytes_read`), each its copy of a shared kv head."""
        return self._unique_bytes + self.hidden * 4

    @property
    def matrices(self) -> list[NativeMatrix]:
        """Every matrix the kernel reads: each thread's shards, then the head."""
        return [m for shard in self.shard_matrices for layer in shard for m in layer.values()] + [self.head_matrix]

    @property
    def bytes_read(self) -> int:
        """Bytes the threads read per token together: every shard's matrices and the head, plus one embedding row."""
        return sum(m.nbytes for m in self.matrices) + self.hidden * 4

    PHASES = ("norm + quantize", "q/k/v", "attention", "o_proj", "wait", "norm + gate/up", "SiLU", "down", "wait",
              "head")

    def profile(self) -> torch.Tensor:
        """Time-stamp-counter ticks per thread and phase (`PHASES`) since the last call: where a token's time goes."""
        out = torch.zeros(self.threads, len(self.PHASES), dtype=torch.int64)
        self.lib.nsd_profile(self._handle, out.data_ptr())
        return out

    def reset(self) -> None:
        """Forget the cached tokens (the cache memory is kept)."""
        self.pos = 0

    def _check(self, ids: torch.Tensor, end: int) -> torch.Tensor:
        ids = ids.reshape(-1).to(torch.int64).contiguous()
        check_length(end, self.max_len, self.window, "NativeDecoder")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise NetshrinkError(f"token id outside the vocabulary of {self.vocab}", where="NativeDecoder")
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Append the tokens `ids` ([T] or [1, T]) to the sequence; the logits [vocab] of the last of them."""
        n = ids.numel()
        if n == 0:
            raise NetshrinkError("no tokens to decode", where="NativeDecoder.forward")
        ids = self._check(ids, self.pos + n)
        logits = torch.empty(self.vocab)
        self.lib.nsd_forward(self._handle, _ptr(ids), n, self.pos, _ptr(logits))
        self.pos += n
        return logits

    def step(self, token: int) -> int:
        """Append one token; the greedy next token (argmax taken natively: no logits tensor, no torch op, checks
        in plain Python: at SmolLM2's 1.5 ms a token, tensor-based checks cost about 1%)."""
        token = int(token)
        check_length(self.pos + 1, self.max_len, self.window, "NativeDecoder")
        if not 0 <= token < self.vocab:
            raise NetshrinkError(f"token id {token} outside the vocabulary of {self.vocab}", where="NativeDecoder")
        self._token[0] = token
        best = self._forward(self._handle, self._token_ptr, 1, self.pos, None)
        self.pos += 1
        return best

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, T, vocab] at every position of `ids` ([T] or [1, T]), decoded from an empty cache: lets
        `netshrink.eval.perplexity` score the native runtime exactly as it scores a model."""
        ids = ids.reshape(-1)
        self._check(ids, ids.numel())
        self.reset()
        return torch.stack([self.forward(ids[i: i + 1]) for i in range(ids.numel())])[None]

    @torch.inference_mode()
    def perplexity(self, ids: torch.Tensor) -> float:
        """exp(mean negative log-likelihood) of ids[1:] given the tokens before each, decoded from an empty cache."""
        ids = ids.reshape(-1)
        if ids.numel() < 2:
            raise NetshrinkError("need at least 2 tokens to score", where="NativeDecoder.perplexity")
        logits = self(ids[:-1])[0]
        return float(torch.exp(torch.nn.functional.cross_entropy(logits, ids[1:])))

    def generate(self, ids: torch.Tensor, new_tokens: int) -> list[int]:
        """Greedy continuation of the prompt `ids`: the `new_tokens` token ids after it (the cache starts empty)."""
        n = ids.numel()
        if n == 0:
            raise NetshrinkError("empty prompt", where="NativeDecoder.generate")
        if new_tokens <= 0:
            return []
        ids = self._check(ids, n + new_tokens - 1)
        out = torch.empty(new_tokens, dtype=torch.int64)
        self.lib.nsd_generate(self._handle, _ptr(ids), n, new_tokens, _ptr(out))
        self.pos = n + new_tokens - 1
        return out.tolist()
