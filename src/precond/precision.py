r"""How an optimizer's float32 matmuls are computed on CUDA: full float32, TF32, or three TF32 passes.

The ``tf32`` option of the Kronecker optimizers takes

- ``False``: IEEE float32 matmuls (the CUDA cores; on an H100 ~7× slower than TF32);
- ``True``: TF32 tensor cores, inputs rounded to 10 mantissa bits (relative error ~1e-3);
- ``"3x"``: each product ``AB`` as ``A_lo B_hi + A_hi B_lo + A_hi B_hi`` in TF32, where
  ``A = A_hi + A_lo`` splits every float32 into its leading 11 significant bits (exact in TF32) and the
  rest. Only ``A_lo B_lo`` (below ``2⁻²²`` relative) is dropped, and TF32 products accumulate in float32.
  Measured on an H100 against float64: 25× more accurate than TF32, 5–9× less than IEEE float32, at 0.6× the
  time of IEEE float32 on stacks of 2304² and 3072² and the same time on 768² (three tensor-core passes and
  the splits). This is the "3xTF32" of NVIDIA's CUTLASS.

The choice stays with the optimizer that asked for it: :func:`tf32_matmuls` sets it for a block of code and
restores the previous global setting on exit. Matmuls written as :func:`matmul` follow ``"3x"``; anything
else in such a block runs in IEEE float32. On a CPU, or for other dtypes, every mode is the plain product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["TF32_MODES", "tf32_matmuls", "matmul", "matmul_add_", "matmul_epsilon", "split_tf32", "three_pass_matmul"]

TF32_MODES = (False, True, "3x")

_three_pass = False  # set within tf32_matmuls("3x")

# TF32 keeps 10 of float32's 23 explicit mantissa bits: clearing the other 13 leaves a number TF32 holds exactly.
_HIGH_BITS = -(1 << 13)


@contextlib.contextmanager
def _global_tf32(enabled: bool) -> Iterator[None]:
    matmul_backend = torch.backends.cuda.matmul
    if not enabled:
        yield
    elif hasattr(matmul_backend, "fp32_precision"):  # torch >= 2.9
        previous = matmul_backend.fp32_precision
        matmul_backend.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul_backend.fp32_precision = previous
    else:
        previous = matmul_backend.allow_tf32
        matmul_backend.allow_tf32 = True
        try:
            yield
        finally:
            matmul_backend.allow_tf32 = previous


@contextlib.contextmanager
def tf32_matmuls(mode: bool | str) -> Iterator[None]:
    """Within the block, float32 matmuls on CUDA follow ``mode`` (one of :data:`TF32_MODES`); the previous
    setting is restored on exit."""
    global _three_pass
    if mode == "3x":
        previous, _three_pass = _three_pass, True
        try:
            yield
        finally:
            _three_pass = previous
    else:
        with _global_tf32(bool(mode)):
            yield


def _tf32_on() -> bool:
    matmul_backend = torch.backends.cuda.matmul
    if hasattr(matmul_backend, "fp32_precision"):  # torch >= 2.9 (reading allow_tf32 there may raise)
        precision = matmul_backend.fp32_precision
        return precision == "tf32" or (precision == "none" and torch.get_float32_matmul_precision() != "highest")
    return bool(matmul_backend.allow_tf32)


def matmul_epsilon(x: Tensor) -> float:
    """The relative spacing of the numbers a :func:`matmul` of ``x`` multiplies at this point: TF32's ``2⁻¹⁰``
    for a CUDA float32 ``x`` while TF32 matmuls are on (and not ``"3x"``), else ``x``'s dtype's ``eps``. A
    check of a product's result (an orthonormality test, say) sizes its tolerance by it."""
    if x.is_cuda and x.dtype == torch.float32 and not _three_pass and _tf32_on():
        return 2.0 ** -10
    return torch.finfo(x.dtype).eps


def split_tf32(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` with ``hi + lo == x`` exactly: ``hi`` keeps the sign, exponent and leading 10 mantissa
    bits of each float32 (so TF32 holds it exactly), ``lo`` the rest (at most ``2⁻¹⁰·|x|``)."""
    hi = (x.view(torch.int32) & _HIGH_BITS).view(torch.float32)
    return hi, x - hi


def _add_product_(out: Tensor, a: Tensor, b: Tensor, alpha: float) -> None:
    """``out += alpha·(a @ b)``, added in the GEMM (``beta = 1``) where the shapes allow: no temporary."""
    if out.dim() == a.dim() == b.dim() == 3:
        out.baddbmm_(a, b, alpha=alpha)
    elif out.dim() == a.dim() == b.dim() == 2:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_(a @ b, alpha=alpha)


def _three_passes(a: Tensor, b: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The operand pairs of the three TF32 products of ``a @ b``, smallest terms first."""
    a_hi, a_lo = split_tf32(a)
    b_hi, b_lo = split_tf32(b)
    return [(a_lo, b_hi), (a_hi, b_lo), (a_hi, b_hi)]


def three_pass_matmul(a: Tensor, b: Tensor, product: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """``a @ b`` for float32 ``a, b`` as three TF32 products, smallest terms first (see the module's text).
    ``product`` computes one of them (default: ``@`` with TF32 enabled)."""
    passes = _three_passes(a, b)
    if product is None:
        (x, y), *rest = passes
        with _global_tf32(True):
            out = x @ y
            for x, y in rest:
                _add_product_(out, x, y, 1.0)
        return out
    first, second, third = (product(x, y) for x, y in passes)
    return first + second + third


def _three_pass_wanted(a: Tensor, b: Tensor) -> bool:
    return _three_pass and a.is_cuda and a.dtype == torch.float32 and b.dtype == torch.float32


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; within ``tf32_matmuls("3x")``, a float32 product on CUDA is :func:`three_pass_matmul`."""
    return three_pass_matmul(a, b) if _three_pass_wanted(a, b) else a @ b


def matmul_add_(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``out += alpha·(a @ b)`` in place, the sum done by the GEMM itself (``beta = 1``): the product is
    never written out and read back, which for a stack of Kronecker factors saves two of the four passes of
    ``out.add_(a @ b, alpha=alpha)``. Follows ``"3x"`` like :func:`matmul` (three passes added in turn).
    Returns ``out``."""
    if _three_pass_wanted(a, b):
        with _global_tf32(True):
            for x, y in _three_passes(a, b):
                _add_product_(out, x, y, alpha)
    else:
        _add_product_(out, a, b, alpha)
    return out
