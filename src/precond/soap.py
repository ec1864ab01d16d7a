"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner, with the reference SOAP's arguments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .blocks import BlockLayout
from .engine import BlockEngine, Bucket
from .precision import TF32_MODES
from .preconditioners import EigenbasisAdam
from .refresh import RULES as REFRESH_RULES
from .validation import (STEP_RULES, betas_rule, check_choice, check_in, check_int, check_max_dim, check_positive,
                         flag_rule, pair, preconditioner_dtype_rule)

__all__ = ["SOAP"]


class SOAP(BlockEngine):
    r"""SOAP (Vyas et al. 2024, arXiv:2409.11321): Adam run in the slowly changing eigenbasis of
    Shampoo's factors.

    Per parameter ``G`` (dims longer than ``max_precond_dim`` get no factor), in the reference
    implementation's order:

    .. math::
        \text{first step: } & L_i \leftarrow (1-\beta_s) G_{(i)}G_{(i)}^\top,\ Q_i = \operatorname{eigvecs}(L_i)
            \text{ (descending); no update} \\
        G' &= G \times_1 Q_1^\top \cdots \times_k Q_k^\top \\
        M &\leftarrow \beta_1 M + (1-\beta_1) G' \quad\text{(kept in the eigenbasis)} \\
        V &\leftarrow \beta_2 V + (1-\beta_2) G'^{\odot 2} \\
        N &= \Big[\frac{M}{\sqrt V + \epsilon}\Big] \times_1 Q_1 \cdots \times_k Q_k
             \quad(\text{optionally } N \leftarrow N/\operatorname{rms}(N)) \\
        W &\leftarrow W - \text{lr}\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} N,\qquad
        W \leftarrow W - \text{lr}\cdot\text{wd}\cdot W \\
        L_i &\leftarrow \beta_s L_i + (1-\beta_s) G_{(i)}G_{(i)}^\top \\
        \text{every } F:\ & Q_i \leftarrow \operatorname{qr}(L_i\, Q_i[:, \pi]),\ \pi = \operatorname{argsort}
            \downarrow \operatorname{diag}(Q_i^\top L_i Q_i),\ V \text{ permuted by } \pi;\ M \text{ re-projected}

    ``β_s`` is ``shampoo_beta`` (``-1`` → ``betas[1]``). The refresh every ``F`` steps is the reference's
    power-QR step by default, its QR by CholeskyQR (matmuls, batched Cholesky): a float32 factor whose
    CholeskyQR fails (a trained factor's power step is often conditioned past float32's reach) retries in
    float64 on an A100/H100/H200, then takes Householder QR, counted as ``fallbacks`` in
    ``preconditioner_stats()``. ``refresh_method`` (``"power_qr"``, ``"eigh"``, ``"qr"``, or the matmul-only
    ``"refine"``), ``refresh_tolerance`` and ``max_qr_iterations`` select another recomputation and the
    adaptive criterion of "Purifying Shampoo" (see :class:`~precond.refresh.EigenbasisRefresh`). On a GPU,
    ``"refine"`` costs a third of power-QR for a refresh of equal quality (``BENCHMARKS.md``); the default
    stays the reference's. Measured on GPT-2 small's body (85M parameters, 800 steps, one H100):
    ``refresh_method="refine", precondition_frequency=1, tf32=True`` reaches AdamW's final loss in 0.76× its
    steps and ends 6% below it, where the default (F=10) does not reach it; refine at F=10 is worse than
    power-QR at F=10, as one refine iteration only follows a basis that moved little. The every-step refresh
    makes the step 2.1× AdamW's there; ``refresh_tolerance=0.03`` on top refreshes 24% fewer bases at the
    same loss, though not faster: the criterion costs two products of every factor, and the refine is computed
    for the whole bucket and kept where due, with no host sync (``docs/reports/purifying.md``).

    Args:
        lr: learning rate (default 3e-3). betas: Adam's (default (0.95, 0.95)).
        shampoo_beta: decay of the factors; -1 uses ``betas[1]``.
        eps: Adam's epsilon (default 1e-8). weight_decay: decoupled, applied after the step (default 0.01).
        precondition_frequency: steps between eigenbasis refreshes (default 10).
        max_precond_dim: longest dim that gets a factor (default 10000).
        merge_dims: merge small adjacent dims before preconditioning (default False).
        precondition_1d: give 1-D parameters a factor (default False: plain Adam).
        normalize_grads: divide the update by its RMS (default False).
        correct_bias: Adam's bias correction (default True).
        large_dim_policy: ``"identity"`` (default, the reference) or ``"split"`` into blocks.
        max_factor_ratio: memory guard (default 64; :class:`~precond.Shampoo`'s): a dim of length ``n`` in a
            block of ``m`` elements gets a factor only if ``n² <= max_factor_ratio·m`` (a 1×N matrix runs
            Adam); the reference SOAP has none (``float("inf")``).
        tf32: float32 matmuls on CUDA (:mod:`precond.precision`): ``False`` (default) IEEE float32, ``True``
            TF32 tensor cores (~1e-3 relative), ``"3x"`` three TF32 passes per product (float32-class accuracy;
            ~0.6× the time of ``False`` on 2304² and larger, no gain on 768²).
        spectral_normalize: rescale each block's update to spectral norm ``sqrt(d_out/d_in)`` (default False;
            see :class:`~precond.Shampoo`).
        packed_factors: keep each Kronecker factor as its upper triangle, ``n(n+1)/2`` numbers instead of
            ``n²`` (default False), as Distributed Shampoo keeps its factors: the state then equals Distributed
            Shampoo's for SOAP and EShampoo. A factor is updated packed (its statistic packed by one gather)
            and unpacked only to be read at a refresh (one bucket's factors at a time).
        preconditioner_dtype: keep the eigenbases in this dtype (``torch.bfloat16``, ``torch.float16``; default
            ``None``: the state's), read back in the state's dtype for every product (Distributed Shampoo's
            ``factor_matrix_eigenvectors_dtype``). Halves the bases' memory; the factors, moments and
            arithmetic stay in the state's dtype.
        strict: raise ``FloatingPointError`` naming the parameter and block when a gradient or an update is not
            finite, instead of skipping that block's step and counting it (default False).
        distributed: ``None`` (one process, or FSDP2 ``DTensor`` parameters), ``"ddp"`` or a process
            group: split the work between processes (:mod:`precond.engine.distribute`).
    """

    _group_rules = {**STEP_RULES, "betas": betas_rule, "eps": check_positive, "max_factor_ratio": check_positive,
                    "spectral_normalize": flag_rule, "packed_factors": flag_rule,
                    "preconditioner_dtype": preconditioner_dtype_rule, **REFRESH_RULES}

    def __init__(self, params: Iterable[Any], lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float = -1, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 10000, merge_dims: bool = False,
                 precondition_1d: bool = False, normalize_grads: bool = False, correct_bias: bool = True,
                 refresh_method: str = "power_qr", refresh_tolerance: float = 0.0, max_qr_iterations: int = 1,
                 large_dim_policy: str = "identity", max_factor_ratio: float = 64.0, tf32: bool | str = False, *,
                 spectral_normalize: bool = False, packed_factors: bool = False,
                 preconditioner_dtype: torch.dtype | None = None, distributed: Any = None,
                 strict: bool = False) -> None:
        if shampoo_beta != -1:
            check_in("shampoo_beta", shampoo_beta, 0.0, 1.0, high_open=True)
        check_int("precondition_frequency", precondition_frequency, 1)
        check_max_dim("max_precond_dim", max_precond_dim)
        check_choice("large_dim_policy", large_dim_policy, ("split", "identity"))
        check_choice("tf32", tf32, TF32_MODES)
        defaults = dict(lr=lr, betas=pair(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        merge_dims=merge_dims, precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                        correct_bias=correct_bias, refresh_method=refresh_method,
                        refresh_tolerance=refresh_tolerance, max_qr_iterations=max_qr_iterations,
                        large_dim_policy=large_dim_policy, max_factor_ratio=max_factor_ratio, tf32=tf32,
                        spectral_normalize=spectral_normalize, packed_factors=packed_factors,
                        preconditioner_dtype=preconditioner_dtype)
        self.preconditioner = self._make_preconditioner()
        super().__init__(params, defaults, distributed=distributed, strict=strict)

    def _make_preconditioner(self) -> EigenbasisAdam:
        """The component this class runs (KL-SOAP: another)."""
        return EigenbasisAdam()

    def _weight_decay_mode(self, group: dict[str, Any]) -> str:
        return "decoupled_after"

    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        layout = BlockLayout.build(tuple(param.shape), group["max_precond_dim"],
                                   "leading" if group["merge_dims"] else "none", group["large_dim_policy"],
                                   group["max_factor_ratio"])
        return self._note_guard(param, layout, group["precondition_1d"])

    def _block_kind(self, layout: BlockLayout, index: int, group: dict[str, Any]) -> tuple[bool, ...]:
        return layout.preconditioned_dims(index, group["precondition_1d"])

    def _init_block(self, shape, kind, group, dtype, device):
        return self.preconditioner.state(shape, kind, dtype, device, packed=group["packed_factors"],
                                         basis_dtype=group["preconditioner_dtype"])

    def _host_work_next(self, bucket: Bucket) -> bool:
        return any(bucket.kind) and self.preconditioner.host_work_next(bucket, bucket.group)

    def _makes_update(self, bucket: Bucket) -> bool:
        return bucket.calls > 1  # the first step only builds the statistics

    def _directions(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor | None:
        if bucket.calls == 1:
            self.preconditioner.start(bucket, grads, ok, group)
            return None
        direction = self.preconditioner.direction(bucket, grads, ok, group)
        self.preconditioner.fold(bucket, grads, ok, group)
        return direction
