r"""Kronecker factor statistics and mode-wise products: the arithmetic shared by Shampoo, EShampoo, SOAP.

For a block ``G`` of order ``k``, factor ``i`` is ``G_(i) G_(i)ᵀ`` where ``G_(i)`` is the mode-``i``
unfolding; it is the contraction of ``G`` with itself over every dim but ``i``. Dims without a factor
(``None``) are passed through unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["init_factors", "update_factors", "mode_product", "factor_stats"]


def init_factors(shape: Sequence[int], preconditioned: Sequence[bool], dtype: torch.dtype,
                 device: torch.device) -> list[Tensor | None]:
    """Zero factors, one ``n×n`` matrix per preconditioned dim of length ``n``; ``None`` elsewhere."""
    return [torch.zeros(n, n, dtype=dtype, device=device) if use else None for n, use in zip(shape, preconditioned)]


def update_factors(factors: list[Tensor | None], grad: Tensor, beta: float, weight: float) -> None:
    """``F_i ← beta·F_i + weight·G_(i)G_(i)ᵀ`` in place (``beta = 1`` accumulates)."""
    order = grad.dim()
    for i, factor in enumerate(factors):
        if factor is None:
            continue
        others = list(itertools.chain(range(i), range(i + 1, order)))
        outer = torch.tensordot(grad, grad, dims=[others, others])
        if beta != 1.0:
            factor.mul_(beta)
        factor.add_(outer, alpha=weight)


def mode_product(x: Tensor, matrices: Sequence[Tensor | None], transpose: bool = False) -> Tensor:
    r"""``x ×_1 M_1 ×_2 … ×_k M_k`` with ``(x ×_i M)`` contracting dim ``i`` of ``x`` with the rows of ``M``.

    ``transpose=True`` contracts with the columns instead. For an orthogonal basis ``Q`` this is the
    projection ``Qᵀ G Q`` (``transpose=False``) and its inverse (``transpose=True``); for symmetric
    inverse roots the two agree. Each contraction moves the handled dim to the end, so after ``k`` of them
    the dims are back in order.
    """
    contract = [1] if transpose else [0]
    for m in matrices:
        if m is None:
            x = x.permute(*range(1, x.dim()), 0)
        else:
            x = torch.tensordot(x, m, dims=[[0], contract])
    return x


def factor_stats(preconditioned: Sequence[bool], dims: Sequence[int]) -> list[dict[str, int] | None]:
    """Fresh per-factor counters (see :meth:`BlockEngine.preconditioner_stats`)."""
    return [
        {"dim": n, "refreshes": 0, "skipped": 0, "qr_iterations": 0, "failures": 0} if use else None
        for n, use in zip(dims, preconditioned)
    ]
