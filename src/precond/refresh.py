r"""When and how an eigenbasis is recomputed: one policy shared by EShampoo and SOAP.

Each Kronecker factor ``A`` with its current basis ``Q`` decides on its own:

- **fixed** (``tolerance = 0``): recompute whenever the optimizer asks (every ``precondition_frequency``
  steps);
- **adaptive** (``tolerance = τ > 0``, "Purifying Shampoo", Eschenhagen et al. 2025): with
  ``B = QᵀAQ``, keep ``Q`` if ``‖B - diag(B)‖_F ≤ τ·‖B‖_F``, recompute otherwise.

A recomputation is one of

- ``"eigh"``: a full symmetric eigen-decomposition;
- ``"qr"``: the warm-started QR algorithm, at most ``max_iterations`` steps, stopping early once the
  criterion holds;
- ``"power_qr"``: SOAP's single power-iteration step followed by QR;
- ``"refine"``: matmul-only refinement of the current basis (:func:`precond.linalg.refine_eigenbasis`),
  at most ``max_iterations`` steps, each matrix stopping once the criterion holds. Batched matmuls only,
  so it is the one recomputation that gains from batching and from TF32; it keeps the column order.

Under the adaptive policy, ``eigh`` and ``qr`` recompute only the factors that failed the test, gathered
(one host read of the mask per bucket and factor: these cost enough per matrix that skipping pays for it);
``power_qr`` and ``refine`` recompute the whole bucket and keep the new basis only where the test failed,
with no host read (``refine`` skips the correction of a passing matrix anyway, and starts from the criterion's
``QᵀAQ``). Measured on an H100 (GPT-2 small's weight matrices, TF32), SOAP refining every step with
τ = 0.03 took 88–90 ms a step gathered and 82 ms selected, against 82 ms with no criterion (BENCHMARKS.md).

A failed recomputation keeps the last basis and is counted; training goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import STATS_FIELDS
from .kronecker import factor_chunks, permute_dim
from .linalg import (LinAlgFailure, batched_eigh, finite_bases, off_diagonal_ratio, power_qr_step, qr_algorithm,
                     refine_eigenbasis)
from .precision import matmul
from .validation import Rule, check_choice, check_in, check_int

__all__ = ["EigenbasisRefresh", "REFRESH_METHODS", "RULES", "count_refreshes_", "counted_power_qr_", "policy_of",
           "refresh_due", "skips_cholesky_qr"]

REFRESH_METHODS = ("eigh", "qr", "power_qr", "refine")

# Columns of a factor's ``stats`` counters (their layout: precond.engine.STATS_FIELDS).
REFRESHES, SKIPPED, QR_ITERATIONS, FAILURES, FALLBACKS, CHOLESKY_FAILURES = (
    STATS_FIELDS.index(name) for name in ("refreshes", "skipped", "qr_iterations", "failures", "fallbacks",
                                          "cholesky_failures"))

# A factor whose first CholeskyQR failed in more than 1/RETRY_SHARE of its refreshes skips it (power-QR).
RETRY_SHARE = 4

GATHERED = ("eigh", "qr")  # under the criterion, computed for the failing factors only (see above)


# The group rules of an optimizer with an eigenbasis refresh (EShampoo, SOAP; see precond.validation.check_group):
# checked once, for the constructor's arguments and for every param group alike.
RULES: dict[str, Rule] = {
    "refresh_method": lambda name, value: check_choice(name, value, REFRESH_METHODS),
    "refresh_tolerance": lambda name, value: check_in(name, value, 0.0, 1.0),
    "max_qr_iterations": lambda name, value: check_int(name, value, 1),
}


def policy_of(group: dict, descending: bool = False) -> EigenbasisRefresh:
    """The refresh policy a param group sets (``refresh_method``, ``refresh_tolerance``, ``max_qr_iterations``)."""
    return EigenbasisRefresh(group["refresh_method"], group["refresh_tolerance"], group["max_qr_iterations"],
                             descending)


def refresh_due(t: int, frequency: int, start: int) -> bool:
    """Whether step ``t`` recomputes a preconditioner: at ``t == start``, then at every multiple of ``frequency``
    after it. The one schedule of every method, each counting ``t`` its own way: Shampoo and EShampoo from the
    first step with ``start_preconditioning_step``; SOAP from its first update (``calls - 1``, the first step
    only gathers statistics) with ``start = frequency``; ASGO from ``calls - 1`` with ``start = 0`` (its first
    step has a root); Sophia's curvature from the first step with ``start = update_period``."""
    return t == start or (t > start and t % frequency == 0)


def skips_cholesky_qr(failures: Tensor, refreshes: Tensor) -> Tensor:
    """Which factors go straight to power-QR's retry: CholeskyQR failed in more than ``1/RETRY_SHARE`` of
    their refreshes (:func:`counted_power_qr_`)."""
    return RETRY_SHARE * failures > refreshes


def counted_power_qr_(A: Tensor, Q: Tensor, stats: Tensor, sort: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`~precond.linalg.power_qr_step` for a stack of factors with their counters ``stats``
    (``[B, STATS_WIDTH]``, updated in place: fallbacks and CholeskyQR failures). Returns ``(Q, order)``.

    A factor whose CholeskyQR (in its own precision) failed in more than a quarter of its refreshes
    (``RETRY_SHARE · cholesky_failures > refreshes``) skips it and goes straight to the retry (float64
    CholeskyQR on an A100/H100/H200, Householder QR elsewhere), which is what a failure would have led to
    after paying for two of CholeskyQR3's three passes. A trained factor that fails once tends to fail again
    (on a 20M LM's factors float32's CholeskyQR failed for every 1408- and 1536-wide factor at every
    refresh: ``benchmarks/cholesky_qr_probe.py``); since a skipped refresh adds to ``refreshes`` and not to
    the failures, such a factor still tries float32 at every fourth refresh, and one whose conditioning
    improves is back on float32 within a few. The counters live in the optimizer's state, so the choice
    resumes with it."""
    retry_first = skips_cholesky_qr(stats[:, CHOLESKY_FAILURES], stats[:, REFRESHES])
    Q_new, order, fell_back, failed = power_qr_step(A, Q, sort, retry_first)
    stats[:, FALLBACKS] += fell_back
    stats[:, CHOLESKY_FAILURES] += failed
    return Q_new, order


def count_refreshes_(stats: Tensor, ok: Tensor, good: Tensor) -> None:
    """One refresh of the blocks with ``ok`` into a factor's counters ``stats`` (``[B, STATS_WIDTH]``):
    a refresh where it was ``good``, a failure (the last good result kept) where not."""
    stats[:, REFRESHES] += ok & good
    stats[:, FAILURES] += ok & ~good


@dataclass(frozen=True)
class EigenbasisRefresh:
    """Refresh policy. ``descending`` orders the basis by decreasing eigenvalue (SOAP's convention).

    Works on a bucket: ``A`` and ``Q`` are stacks ``[B, n, n]``, ``stats`` the per-block counters
    ``[B, STATS_WIDTH]`` (updated in place), ``ok`` the blocks that take part this step.
    """

    method: str = "eigh"
    tolerance: float = 0.0
    max_iterations: int = 1
    descending: bool = False

    def __post_init__(self) -> None:
        if self.method not in REFRESH_METHODS:
            raise ValueError(f"refresh method must be one of {REFRESH_METHODS}, got {self.method!r}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"Invalid tolerance: {self.tolerance} (must be in [0, 1])")
        if self.max_iterations < 1:
            raise ValueError(f"Invalid max_iterations: {self.max_iterations} (must be >= 1)")

    def initial(self, A: Tensor, Q: Tensor, stats: Tensor, ok: Tensor) -> Tensor:
        """First bases of ``A`` by eigh; a block whose eigh fails (or that is not ``ok``) keeps ``Q``."""
        _, Q_new, good = batched_eigh(A)
        if self.descending:
            Q_new = torch.flip(Q_new, [-1])
        count_refreshes_(stats, ok, good)
        return torch.where((ok & good)[:, None, None], Q_new, Q)

    def refresh(self, A: Tensor, Q: Tensor, stats: Tensor, ok: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(bases, order, changed)``: ``order[b]`` is the column permutation of the old basis
        that the new one follows (for permuting per-column statistics; the identity where none), and
        ``changed[b]`` whether block ``b``'s basis was recomputed."""
        n = A.shape[-1]
        identity = torch.arange(n, device=A.device).expand(A.shape[0], n)
        stale = ok
        if self.tolerance > 0.0:
            B = matmul(Q.mT, matmul(A, Q))
            stale = ok & (off_diagonal_ratio(B) > self.tolerance)
            stats[:, SKIPPED] += ok & ~stale
            if self.method not in GATHERED:  # the whole bucket, selected below: no host read
                Q_new, order, good = self._recompute(A, Q, stats, None, B)
                return self._select(Q, Q_new, order, identity, stale, good, stats)
            # Only the factors that drifted are recomputed: one host read of the mask per refresh.
            index = stale.nonzero().flatten()
            if index.numel() == 0:
                return Q, identity, stale
            Q_sub, order_sub, good_sub = self._recompute(A[index], Q[index], stats, index, B[index])
            good = torch.zeros_like(stale)
            good[index] = good_sub
            Q_new, order = Q.clone(), identity.clone()
            Q_new[index], order[index] = Q_sub, order_sub
        else:
            Q_new, order, good = self._recompute(A, Q, stats, None)
        return self._select(Q, Q_new, order, identity, stale, good, stats)

    @staticmethod
    def _select(Q: Tensor, Q_new: Tensor, order: Tensor, identity: Tensor, stale: Tensor, good: Tensor,
                stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The new basis where it was due and came out finite, the old one elsewhere; counted."""
        changed = stale & good
        count_refreshes_(stats, stale, good)
        return (torch.where(changed[:, None, None], Q_new, Q), torch.where(changed[:, None], order, identity),
                changed)

    def refresh_bucket_(self, state: dict[str, Tensor], kind: tuple[bool, ...], ok: Tensor, per_column: Tensor,
                        prepare: Callable[[Tensor, slice], Tensor] | None = None) -> Tensor:
        """Refresh, in place, the ``basis{i}`` of every factor ``factor{i}`` of a bucket (the layout of
        :func:`precond.kronecker.init_factor_state`), through ``prepare(factor, part)`` if given (``part``: the
        blocks of the chunk). ``per_column`` (a ``[B, …]`` per-coordinate statistic) is permuted along dim ``i``
        with power-QR's column order. Chunk by chunk (:func:`precond.kronecker.factor_chunks`). Returns which
        blocks had a basis recomputed."""
        changed = torch.zeros_like(ok)
        for i, use in enumerate(kind):
            if not use:
                continue
            factors, basis, stats = state[f"factor{i}"], state[f"basis{i}"], state[f"stats{i}"]
            for part, A in factor_chunks(factors, basis.shape[-1]):
                if prepare is not None:
                    A = prepare(A, part)
                new, order, changed_part = self.refresh(A, basis[part].to(A.dtype), stats[part], ok[part])
                if self.method in ("power_qr", "qr"):  # the columns were re-sorted: the statistic follows them
                    per_column[part] = permute_dim(per_column[part], 1 + i, order)
                basis[part] = new
                changed[part] |= changed_part
        return changed

    def _recompute(self, A: Tensor, Q: Tensor, stats: Tensor, index: Tensor | None,
                   B: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """New bases for every matrix of ``A``: ``(Q, order, good)``. ``B = QᵀAQ`` when the criterion has
        already computed it (the QR algorithm and the refinement start from it)."""
        n = A.shape[-1]
        order = torch.arange(n, device=A.device).expand(A.shape[0], n)
        try:
            if self.method == "eigh":
                _, Q_new, good = batched_eigh(A)
            elif self.method == "power_qr":  # never gathered (GATHERED): ``stats`` is the whole stack's
                Q_new, order = counted_power_qr_(A, Q, stats)
            elif self.method == "qr":
                _, Q_new, iterations, order = qr_algorithm(A, Q, self.max_iterations, self.tolerance, B)
            else:
                Q_new, iterations = refine_eigenbasis(A, Q, self.max_iterations, self.tolerance, projected=B)
        except LinAlgFailure:
            return Q, order, torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
        if self.method in ("qr", "refine"):
            stats[slice(None) if index is None else index, QR_ITERATIONS] += iterations
        if self.method != "eigh":
            good = finite_bases(Q_new)
        if self.descending and self.method in ("eigh", "qr"):  # both sort ascending; refine keeps the order
            Q_new = torch.flip(Q_new, [-1])
            if self.method == "qr":
                order = torch.flip(order, [-1])
        return Q_new, order, good
