r"""Kronecker factor statistics and mode-wise products on bucket stacks (Shampoo, EShampoo, SOAP, ASGO).

A stack ``G`` of shape ``[B, n_1, …, n_k]`` holds ``B`` blocks of order ``k``. Factor ``i`` of a block is
``G_(i) G_(i)ᵀ`` where ``G_(i)`` is the mode-``i`` unfolding: the contraction of the block with itself
over every dim but ``i``. Dims without a factor (``None``) pass through unchanged. Everything is a
batched matmul over the stack.

A factor is symmetric: with ``packed`` it is kept as its upper triangle, ``n(n+1)/2`` numbers a block (as
Distributed Shampoo keeps its factors): it is updated in that form (the statistic packed, then added), and
unpacked into a full matrix only for the moment it is read (:func:`full_factor`: a refresh, one bucket's
factors at a time).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .engine import STATS_FIELDS, Bucket, commit_
from .engine.batched import decay_, ema_
from .precision import matmul, matmul_add_

__all__ = ["init_factor_state", "unfold", "factor_outer", "update_factors_", "mode_product", "permute_dim",
           "factor_matrices", "full_factor", "pack", "matrix_chunks", "factor_chunks", "STATS_WIDTH", "REFRESH_CHUNK_BYTES"]

STATS_WIDTH = len(STATS_FIELDS)  # a factor's counters (precond.engine.STATS_FIELDS)

# A refresh (eigh, QR, roots) of a stack of factors holds several stack-sized temporaries at once; it runs over
# chunks of at most this many bytes of matrices, so that its peak memory does not grow with the bucket (24
# factors of 3072² in GPT-2 small's body: 864 MiB a copy). Batching pays for small matrices, which still share
# a chunk; one large matrix fills a GPU alone. Measured on the 20M body (CPU, BENCHMARKS.md): SOAP's peak with
# packed factors 1,404 MiB at 64 MiB chunks, 1,174 at 32, 1,030 at 16; Distributed Shampoo's 1,228.
REFRESH_CHUNK_BYTES = 32 << 20


def matrix_chunks(count: int, n: int, dtype: torch.dtype) -> list[slice]:
    """Slices of a stack of ``count`` ``n × n`` matrices of ``dtype``, each at most :data:`REFRESH_CHUNK_BYTES`
    (at least one matrix)."""
    size = max(1, REFRESH_CHUNK_BYTES // (n * n * torch.empty((), dtype=dtype).element_size()))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def factor_chunks(factors: Tensor, n: int) -> Iterator[tuple[slice, Tensor]]:
    """``(part, F)`` for each chunk (:func:`matrix_chunks`) of a stack of ``n × n`` factors, packed or not:
    the blocks ``part`` and their factors as whole matrices (a refresh's input)."""
    for part in matrix_chunks(factors.shape[0], n, factors.dtype):
        yield part, full_factor(factors[part])


def init_factor_state(shape: Sequence[int], preconditioned: Sequence[bool], dtype: torch.dtype,
                      device: torch.device | str, matrix: str | None = None, packed: bool = False,
                      matrix_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """One block's zero factors ``factor{i}`` (``[n, n]``, or its upper triangle ``[n(n+1)/2]`` when
    ``packed``) and counters ``stats{i}`` for its preconditioned dims, and, when ``matrix`` names it, a
    per-factor identity matrix (``"root"`` or ``"basis"``; a root is symmetric, so packed too) in
    ``matrix_dtype`` (default ``dtype``; :func:`factor_matrices` reads a narrower one back in ``dtype``)."""
    state: dict[str, Tensor] = {}
    for i, (n, use) in enumerate(zip(shape, preconditioned)):
        if not use:
            continue
        state[f"factor{i}"] = torch.zeros((n * (n + 1) // 2,) if packed else (n, n), dtype=dtype, device=device)
        if matrix is not None:
            eye = torch.eye(n, dtype=matrix_dtype or dtype, device=device)
            state[f"{matrix}{i}"] = pack(eye[None])[0] if packed and matrix == "root" else eye
        stats = torch.zeros(STATS_WIDTH, dtype=torch.int64, device=device)
        if stats.device.type != "meta":
            stats[0] = n
        state[f"stats{i}"] = stats
    return state


@functools.lru_cache(maxsize=64)
def _triangle(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For ``n × n`` matrices: the flat positions of the upper triangle (what :func:`pack` keeps, row by row)
    and, for every flat position, its entry in that packed triangle (what :func:`full_factor` reads). Cached
    per size and device: ``1.5 n²`` int32 (56 MiB for n = 3072), kept while the process lives."""
    rows, cols = torch.triu_indices(n, n, device=device)
    entry = torch.arange(rows.numel(), device=device, dtype=torch.int32)  # int32: half the cached bytes
    where = torch.empty(n, n, dtype=torch.int32, device=device)
    where[rows, cols] = entry
    where[cols, rows] = entry
    return (rows * n + cols).to(torch.int32), where.flatten()


def full_factor(factor: Tensor) -> Tensor:
    """A bucket's factor stack as ``[B, n, n]``: itself, or unpacked (a new tensor, one gather) from
    ``[B, n(n+1)/2]``."""
    if factor.dim() == 3:
        return factor
    n = int(round(((8 * factor.shape[-1] + 1) ** 0.5 - 1) / 2))
    return factor.index_select(1, _triangle(n, factor.device)[1]).view(factor.shape[0], n, n)


def pack(full: Tensor) -> Tensor:
    """The upper triangles ``[B, n(n+1)/2]`` of a stack of (symmetric) ``[B, n, n]`` matrices (one gather)."""
    n = full.shape[-1]
    return full.reshape(full.shape[0], n * n).index_select(1, _triangle(n, full.device)[0])


def unfold(grads: Tensor, i: int) -> Tensor:
    """``G_(i)``, the mode-``i`` unfolding of every block (``[B, n_i, ∏_{j≠i} n_j]``)."""
    return grads.movedim(1 + i, 1).reshape(grads.shape[0], grads.shape[1 + i], -1)


def factor_outer(grads: Tensor, i: int) -> Tensor:
    """``G_(i) G_(i)ᵀ`` for every block of the stack ``grads`` (``[B, n_i, n_i]``)."""
    unfolded = unfold(grads, i)
    return matmul(unfolded, unfolded.mT)


def update_factors_(state: dict[str, Tensor], grads: Tensor, beta: float, weight: float, ok: Tensor,
                    outers: dict[int, Tensor] | None = None) -> None:
    """``F_i ← beta·F_i + weight·G_(i)G_(i)ᵀ`` for every factor of the bucket, blocks with ``ok`` only;
    ``outers[i]`` replaces ``G_(i)G_(i)ᵀ`` where given (a cross-fitted statistic). ``grads`` are the engine's
    (refused blocks zeroed), so the factors are updated in place: the decay is one pass (by 1 on refused
    blocks, :func:`~precond.engine.batched.decay_`) and the GEMM adds ``weight·G_(i)G_(i)ᵀ`` into the factor
    itself (:func:`~precond.precision.matmul_add_`, on a GPU), never writing the outer product out. Given outers are
    not zero on refused blocks: their new factors are computed aside and committed where finite."""
    for i in range(grads.dim() - 1):
        factor = state.get(f"factor{i}")
        if factor is not None:
            _update_factor_(factor, grads, i, beta, weight, ok, outers)


def _update_factor_(factor: Tensor, grads: Tensor, i: int, beta: float, weight: float, ok: Tensor,
                    outers: dict[int, Tensor] | None) -> None:
    """:func:`update_factors_` for factor ``i``: a ``[B, n, n]`` stack, or packed ``[B, n(n+1)/2]``, which is
    updated as it is (the statistic packed, then added entry by entry: the same arithmetic on the kept
    entries as the unpacked update off the GPU)."""
    packed = factor.dim() == 2
    if outers is None and factor.is_cuda and not packed:
        unfolded = unfold(grads, i)
        matmul_add_(decay_(factor, beta, ok), unfolded, unfolded.mT, alpha=weight)
    elif outers is None:
        # Off the GPU the outer product is written out and added, the references' rounding: a factor of
        # lower rank than its size (the first steps) has a null-space basis that rounding alone sets, and
        # the GEMM's fused add moved SOAP 5e-3 away from the reference SOAP in float64 (1e-15 this way).
        # Written out a chunk of blocks at a time, so that the step's peak does not grow with the bucket.
        for part in matrix_chunks(grads.shape[0], grads.shape[1 + i], factor.dtype):
            outer = factor_outer(grads[part], i)
            ema_(factor[part], pack(outer) if packed else outer, beta, weight, ok[part])
    else:
        outer = pack(outers[i]) if packed else outers[i]
        new = torch.add(factor * beta, outer, alpha=weight) if beta != 1.0 else torch.add(factor, outer, alpha=weight)
        commit_(factor, new, ok, require_finite=True)


def mode_product(x: Tensor, matrices: Sequence[Tensor | None], transpose: bool = False) -> Tensor:
    r"""``x ×_1 M_1 ×_2 … ×_k M_k`` per block, ``(x ×_i M)`` contracting dim ``i`` with the rows of ``M``.

    ``x`` is ``[B, n_1, …, n_k]`` and ``M_i`` is ``[B, n_i, n_i]`` or ``None``. ``transpose=True``
    contracts with the columns instead. For an orthogonal basis ``Q`` this is the projection ``Qᵀ G Q``
    (``transpose=False``) and its inverse (``transpose=True``). Each contraction moves the handled dim to
    the end, so after ``k`` of them the dims are back in order.
    """
    batch = x.shape[0]
    for m in matrices:
        x = x.movedim(1, -1)
        if m is not None:
            shape = x.shape
            x = matmul(x.reshape(batch, -1, shape[-1]), m.mT if transpose else m).view(shape)
    return x


def permute_dim(x: Tensor, dim: int, order: Tensor) -> Tensor:
    """``x`` with dim ``dim`` of each block permuted by that block's ``order[b]`` (``order``: ``[B, n]``)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = order.shape
    return x.gather(dim, order.view(shape).expand_as(x))


def factor_matrices(bucket: Bucket, name: str) -> list[Tensor | None]:
    """The stacks ``{name}{i}`` of a bucket (``"root"``, ``"basis"``), ``None`` for dims without a factor; one
    kept narrower than the bucket's dtype (``preconditioner_dtype``) is read back as a copy in that dtype
    (write to ``bucket.state`` itself)."""
    matrices = [bucket.state.get(f"{name}{i}") for i in range(len(bucket.shape))]
    return [m if m is None or m.dtype == bucket.dtype else m.to(bucket.dtype) for m in matrices]
