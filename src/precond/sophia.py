"""Sophia: a clipped, diagonal-curvature-preconditioned momentum method."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import bias_correction as bc
from .blocks import BlockLayout
from .engine import BlockEngine, local
from .preconditioners import DiagonalCurvature
from .refresh import refresh_due
from .sophia_correction import SophiaCorrection
from .validation import STEP_RULES, betas_rule, check_choice, check_int, check_positive, pair

__all__ = ["Sophia"]


CORRECTED = "sophia_corrected"  # the block kind of a group with bias_correction other than "std"


class Sophia(SophiaCorrection, BlockEngine):
    r"""Sophia (Liu et al. 2023, arXiv:2305.14342): second-order clipped stochastic optimization.

    .. math::
        M &\leftarrow \beta_1 M + (1-\beta_1) G \\
        H &\leftarrow \beta_2 H + (1-\beta_2)\,\hat h \quad\text{every } k \text{ steps (see below)} \\
        W &\leftarrow W - \text{lr}\cdot\text{wd}\cdot W, \qquad
        W \leftarrow W - \text{lr}\cdot\operatorname{clip}\!\big(M / \max(\rho H, \epsilon),\ 1\big)

    with ``clip`` elementwise to ``[-1, 1]`` and ``ρ`` the paper's ``γ``. The curvature estimate ``ĥ``:

    - ``estimator="gnb"`` (Sophia-G, Gauss–Newton–Bartlett): after a backward pass on the loss computed
      with labels *sampled from the model's own predictions*, ``ĥ = B · ĝ ⊙ ĝ`` with ``ĝ`` the gradient
      of that mean loss over a batch of ``B`` examples;
    - ``estimator="hutchinson"`` (Sophia-H): after ``loss.backward(create_graph=True)``,
      ``ĥ = u ⊙ (∇²L u)`` with ``u`` a Rademacher vector.

    In a training loop, every ``update_period`` steps::

        loss.backward(); opt.step(); opt.zero_grad()
        if opt.hessian_update_due():
            logits = model(x).flatten(0, -2)           # [labels, classes]: tokens of a language model
            sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
            F.cross_entropy(logits, sampled).backward()
            opt.update_hessian(batch_size=sampled.numel()); opt.zero_grad()

    ``B`` is the number of labels sampled, which the mean loss averages over: the tokens of a language
    model's batch (``batch × sequence``), as the authors' code scales by its tokens per step.

    Defaults: the paper's ``β = (0.965, 0.99)``, ``ρ = 0.01``, ``k = 10``; ``lr`` 1e-4, ``weight_decay``
    0.1 and ``eps`` 1e-15 as in the authors' code.

    ``bias_correction`` (per group, Sophia-G only; :mod:`precond.bias_correction`, Nayak et al. 2026) uses
    microbatch statistics: call :meth:`accumulate` after each microbatch's backward, in the step's pass
    *and* in the sampled-label pass before :meth:`update_hessian`. With ``n`` microbatches of ``b = B/n``
    labels, ``ĝ_j`` microbatch ``j``'s gradient and ``r_j = b·ĝ_j²`` its own GNB estimate:
    ``"cross_fit"`` feeds ``M`` the mean gradient of group A (the first ``cross_fit_fraction`` of the
    step's microbatches) and ``H`` the mean of ``r_j`` over group B of the sampled-label pass;
    ``"variance_corrected"`` replaces ``1/max(ρH, ε)`` by ``max(0, 1/d − Var(p̄)/d³)``, ``d = max(ρH, ε)``,
    with ``p_j = ρ(β₂H + (1-β₂)r_j)`` the denominator microbatch ``j`` alone would give and ``Var(p̄)``
    their sample variance over the count, kept with ``H`` until the next curvature update; ``"full"``
    does both (variance over group B). Extra memory: one tensor per parameter (``hessian_variance``) for
    the variance modes, and 2–4 per parameter while accumulating.
    ``distributed`` (``None``, ``"ddp"`` or a process group) splits the work between processes under DDP;
    FSDP2 parameters need nothing (:mod:`precond.engine.distribute`).

    ``strict=True`` raises ``FloatingPointError`` naming the parameter and block when a gradient or an update is
    not finite, instead of skipping that block's step and counting it (``preconditioner_stats()``).
    """

    _group_rules = {**STEP_RULES, "betas": betas_rule, "rho": check_positive, "eps": check_positive, **bc.RULES}

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.01, weight_decay: float = 0.1, eps: float = 1e-15, estimator: str = "gnb",
                 update_period: int = 10, *, bias_correction: str = "std", cross_fit_fraction: float = 0.5,
                 distributed: Any = None, strict: bool = False) -> None:
        check_choice("estimator", estimator, ("gnb", "hutchinson"))
        check_int("update_period", update_period, 1)
        self.preconditioner = DiagonalCurvature()
        super().__init__(params, dict(lr=lr, betas=pair(betas), rho=rho, weight_decay=weight_decay, eps=eps,
                                      estimator=estimator, update_period=update_period,
                                      bias_correction=bias_correction, cross_fit_fraction=cross_fit_fraction),
                         distributed=distributed, strict=strict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["bias_correction"] != "std" and group["estimator"] != "gnb":
            raise ValueError(f"Invalid bias_correction: {group['bias_correction']!r} (needs estimator='gnb': "
                             "Hutchinson's estimate takes a Hessian-vector product per microbatch)")

    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        return BlockLayout.build(tuple(param.shape), math.inf, "none", "identity")

    def _block_kind(self, layout, index, group):
        return None if group["bias_correction"] == "std" else CORRECTED

    def _init_block(self, shape, kind, group, dtype, device):
        return self.preconditioner.state(shape, group, dtype, device)

    def _directions(self, bucket, grads, ok, group):
        if bc.crosses(group["bias_correction"]):  # the step's gradient is group A's mean
            micro = self._micro_state(bucket)
            grads = micro["numer_sum"] / micro["n_a"]
        return self.preconditioner.direction(bucket, grads, ok, group)

    def hessian_update_due(self) -> bool:
        """True right after every ``update_period``-th step: time to call :meth:`update_hessian`.

        Counted on the first parameter that has stepped (so it survives a ``state_dict`` round trip). Across
        processes the answer is agreed by a one-number ``all_reduce`` (a process whose FSDP2 shards are all
        empty has no count of its own, and must still join the extra backward pass).
        """
        return self._agree_any(self._hessian_due_here())

    def _hessian_due_here(self) -> bool:
        for bucket in self._buckets:
            period = bucket.group["update_period"]
            return refresh_due(bucket.calls, period, period)
        for group in self.param_groups:  # not planned yet (e.g. just loaded): read a saved step count
            for p in group["params"]:
                for key, step in self.state.get(p, {}).items():
                    if key.endswith("step"):
                        return refresh_due(int(step), group["update_period"], group["update_period"])
        return False

    def update_hessian(self, batch_size: int | None = None) -> None:
        """Fold the current gradients into the curvature EMA ``H``.

        ``gnb``: the gradients must come from a loss on sampled labels; ``batch_size`` is ``B`` in
        ``ĥ = B·ĝ²`` (required): the number of labels the mean loss averaged over (tokens, for a
        language model). ``hutchinson``: the gradients must carry a graph
        (``backward(create_graph=True)``); a Hessian-vector product is taken through them. A parameter
        whose estimate is not finite keeps its ``H``.
        """
        if any(g["bias_correction"] != "std" for g in self.param_groups):
            self._corrected_hessian_update(_checked_batch_size(batch_size))
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params or group["bias_correction"] != "std":
                continue
            if group["estimator"] == "gnb":
                batch_size = _checked_batch_size(batch_size)
            estimates = self.preconditioner.estimates(params, group["estimator"], batch_size)
            self._plan()  # creates the state of parameters that have not stepped yet
            beta2 = group["betas"][1]
            for p, h in zip(params, estimates):
                state = self.state[p]
                prefix = "".join(m.prefix for m in self._members(p, group))  # one block per parameter
                if prefix + "hessian" not in state:
                    continue  # an FSDP2 shard with no rows, or a parameter another process owns (DDP)
                hessian, h = state[prefix + "hessian"], local(h.detach()).to(state[prefix + "hessian"].dtype)
                finite = torch.isfinite(h).all()  # a non-finite estimate never reaches the state
                hessian.copy_(torch.where(finite, self.preconditioner.folded(hessian, h, beta2), hessian))
                state[prefix + "hessian_updates"].add_(finite)


def _checked_batch_size(batch_size: int | None) -> int:
    if batch_size is None:
        raise ValueError("Invalid batch_size: None (Sophia-G's estimator B·ĝ² needs the batch size)")
    check_int("batch_size", batch_size, 1)
    return batch_size
