"""GPTQ's Hessian kept as its upper triangle only and factored in place, for streaming in bounded memory.

H = 2/N sum x x^T is symmetric, and all GPTQ reads of it is the upper Cholesky factor U of H^-1 (H^-1 = U^T U).
Stored whole, a 1536-wide layer's H is 9 MiB and its factorisation needs a second matrix; here H and then U live
in one buffer of n(n+1)/2 floats (4.5 MiB), factored by LAPACK's packed routines in place:
spptrf (H = L L^T), spptri (H^-1 from L), spptrf again (H^-1 = L2 L2^T, so U = L2^T).

Layout: the rows of the upper triangle one after another (row i is H[i, i:], at offset i*n - i*(i-1)/2). For a
symmetric matrix that is LAPACK's packed *lower* format (its column j is our row j), so the routines run with
lower=1, and after the last one row i of U is contiguous. Columns may be accumulated in any order (`order`, GPTQ's
act order); everything here is then in that order.

Above PACKED_UP_TO columns the packed routines (unblocked LAPACK) get slow (minutes for a 14336-wide input), so
`new_hessian` hands out a `DenseHessian` there: the whole matrix, factored in place by the blocked routines.
"""
from __future__ import annotations

import mmap

import torch

from netshrink.errors import NetshrinkError


class _Hessian:
    """What both storages share: 2/N sum x x^T of a layer's inputs (columns in `order`), in its own anonymous
    mapping (not malloc: glibc raises its mmap threshold to the size of any mapped block it frees, after which freed
    temporaries up to that size stay resident as heap; a mapping of our own goes back to the OS with this object,
    and starts as zero pages)."""

    def __init__(self, n: int, order: torch.Tensor | None, elements: int):
        self.n = n
        self.order = order
        self._map = mmap.mmap(-1, max(4 * elements, 1))
        self.data = torch.frombuffer(self._map, dtype=torch.float32, count=elements)
        self.tokens = 0
        self.factored = False

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs x [..., n] (a batch of calibration tokens)."""
        if self.factored:
            raise NetshrinkError("the Hessian was already factored", where=f"{type(self).__name__}.add")
        x = x.detach().reshape(-1, self.n).float()
        if self.order is not None:
            x = x[:, self.order]
        self._accumulate(x)
        self.tokens += x.shape[0]

    def finish(self, where: str | None = None) -> torch.Tensor:
        """Scale the sum to 2/N sum x x^T (in place); returns its diagonal. `where` names the layer in errors."""
        if self.tokens == 0:
            raise NetshrinkError("no calibration token reached this layer", where=where or type(self).__name__,
                                 hint="use more or more varied calibration samples")
        self.data.mul_(2.0 / self.tokens)
        return self.diagonal()

    def dense(self) -> torch.Tensor:
        """The whole matrix (upper triangle, zeros below): for tests."""
        return self.upper_rows(0, self.n)


class PackedHessian(_Hessian):
    """The Hessian as a packed upper triangle, factored by LAPACK's packed routines."""

    def __init__(self, n: int, order: torch.Tensor | None = None, update_elements: int = 1 << 16):
        super().__init__(n, order, n * (n + 1) // 2)
        self.rows_per_update = max(1, min(n, update_elements // n))  # bounds the temporaries of `add`

    def offset(self, i: int) -> int:
        """Where row i of the upper triangle starts."""
        return i * self.n - i * (i - 1) // 2

    def _accumulate(self, x: torch.Tensor) -> None:
        n, step = self.n, self.rows_per_update
        for i0 in range(0, n, step):
            i1 = min(n, i0 + step)
            slab = x[:, i0:i1].t() @ x[:, i0:]                               # rows i0..i1 from column i0 on
            # row by row: a boolean-mask gather would first build int64 indices, 16 bytes per element of the slab
            for r in range(i1 - i0):
                at = self.offset(i0 + r)
                self.data[at: at + n - i0 - r] += slab[r, r:]

    def diagonal_index(self) -> torch.Tensor:
        i = torch.arange(self.n)
        return i * self.n - i * (i - 1) // 2

    def diagonal(self) -> torch.Tensor:
        return self.data[self.diagonal_index()]

    def add_to_diagonal(self, values: torch.Tensor | float) -> None:
        idx = self.diagonal_index()
        self.data[idx] = self.data[idx] + values

    def factor_inverse_cholesky(self) -> bool:
        """Replace H by U, the upper Cholesky factor of H^-1, in place; False if H is not positive definite
        (the buffer is then spoilt: accumulate it again)."""
        from scipy.linalg.lapack import spptrf, spptri

        ap = self.data.numpy()
        self.factored = True
        for routine in (spptrf, spptri, spptrf):
            out, info = routine(self.n, ap, lower=1, overwrite_ap=1)
            if out.ctypes.data != ap.ctypes.data:          # LAPACK worked on a copy: keep it (never expected)
                ap[:] = out
            if info != 0:
                return False
        return bool(torch.isfinite(self.data.sum()))

    def upper_rows(self, i1: int, i2: int, c0: int | None = None, c1: int | None = None) -> torch.Tensor:
        """Rows i1..i2, columns c0..c1 (default: i1..n) of the (factored) upper triangle, dense, zeros below the
        diagonal: a block of GPTQ's U."""
        n = self.n
        c0 = i1 if c0 is None else c0
        c1 = n if c1 is None else c1
        out = torch.zeros(i2 - i1, c1 - c0)
        for r in range(i2 - i1):
            i = i1 + r
            start = max(c0, i)
            if start < c1:
                at = self.offset(i) + start - i
                out[r, start - c0:] = self.data[at: at + c1 - start]
        return out


class DenseHessian(_Hessian):
    """The whole [n, n] matrix, factored in place by LAPACK's blocked routines (spotrf, spotri, spotrf): twice
    PackedHessian's memory, and 7-10x faster (0.39 s against 3.85 s at n=4096). U ends in the upper triangle; what
    is left below it is never read."""

    def __init__(self, n: int, order: torch.Tensor | None = None):
        super().__init__(n, order, n * n)
        self.data = self.data.view(n, n)

    def _accumulate(self, x: torch.Tensor) -> None:
        self.data.addmm_(x.t(), x)

    def diagonal(self) -> torch.Tensor:
        return self.data.diagonal().clone()

    def add_to_diagonal(self, values: torch.Tensor | float) -> None:
        self.data.diagonal().add_(values)

    def factor_inverse_cholesky(self) -> bool:
        from scipy.linalg.lapack import spotrf, spotri

        a = self.data.numpy().T                 # Fortran order; the matrix is symmetric, so the same matrix
        self.factored = True
        steps = ((spotrf, {"lower": 1, "clean": 0, "overwrite_a": 1}), (spotri, {"lower": 1, "overwrite_c": 1}),
                 (spotrf, {"lower": 1, "clean": 0, "overwrite_a": 1}))
        for routine, options in steps:
            out, info = routine(a, **options)
            if out.ctypes.data != a.ctypes.data:
                a[:] = out
            if info != 0:
                return False
        # Fortran's lower triangle is our upper one: U (H^-1 = U^T U)
        return bool(torch.isfinite(self.data.sum()))

    def upper_rows(self, i1: int, i2: int, c0: int | None = None, c1: int | None = None) -> torch.Tensor:
        c0 = i1 if c0 is None else c0
        c1 = self.n if c1 is None else c1
        return torch.triu(self.data[i1:i2, c0:c1], diagonal=i1 - c0)


PACKED_UP_TO = 4096  # inputs this wide or narrower use PackedHessian (its unblocked routines take <= ~4 s)


def new_hessian(n: int, order: torch.Tensor | None = None, update_elements: int = 1 << 16,
                packed: bool | None = None) -> "PackedHessian | DenseHessian":
    """A Hessian accumulator for an n-wide input: packed (half the memory) up to PACKED_UP_TO, dense (blocked
    factorisation) above, where the packed routines would take minutes per layer; `packed` forces either."""
    if packed is None:
        packed = n <= PACKED_UP_TO
    return PackedHessian(n, order, update_elements) if packed else DenseHessian(n, order)
