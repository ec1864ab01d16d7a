"""Sophia: a clipped, diagonal-curvature-preconditioned momentum method."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .blocks import BlockLayout
from .engine import BlockEngine, commit_, local
from .validation import STEP_RULES, betas_rule, check_choice, check_int, check_positive

__all__ = ["Sophia"]


class Sophia(BlockEngine):
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
    ``distributed`` (``None``, ``"ddp"`` or a process group) splits the work between processes under DDP;
    FSDP2 parameters need nothing (:mod:`precond.engine.distributed`).
    """

    _group_rules = {**STEP_RULES, "betas": betas_rule, "rho": check_positive, "eps": check_positive}

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.01, weight_decay: float = 0.1, eps: float = 1e-15, estimator: str = "gnb",
                 update_period: int = 10, *, distributed: Any = None) -> None:
        check_choice("estimator", estimator, ("gnb", "hutchinson"))
        check_int("update_period", update_period, 1)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
                                      estimator=estimator, update_period=update_period), distributed=distributed)

    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        return BlockLayout.build(tuple(param.shape), math.inf, "none", "identity")

    def _init_block(self, shape, kind, group, dtype, device):
        return {"exp_avg": torch.zeros(shape, dtype=dtype, device=device),
                "hessian": torch.zeros(shape, dtype=dtype, device=device),
                "hessian_updates": torch.zeros((), dtype=torch.int64, device=device)}

    def _directions(self, bucket, grads, ok, group):
        beta1 = group["betas"][0]
        exp_avg, hessian = bucket.state["exp_avg"], bucket.state["hessian"]
        commit_(exp_avg, torch.add(exp_avg * beta1, grads, alpha=1.0 - beta1), ok)
        denom = torch.clamp(group["rho"] * hessian, min=group["eps"])
        return torch.clamp(exp_avg / denom, -1.0, 1.0)

    def hessian_update_due(self) -> bool:
        """True right after every ``update_period``-th step: time to call :meth:`update_hessian`.

        Counted on the first parameter that has stepped (so it survives a ``state_dict`` round trip). Across
        processes the answer is agreed by a one-number ``all_reduce`` (a process whose FSDP2 shards are all
        empty has no count of its own, and must still join the extra backward pass).
        """
        due = self._hessian_due_here()
        group = self._topology.group
        if group is not None:
            flag = torch.tensor([int(due)], device=self.param_groups[0]["params"][0].device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            due = bool(flag.item())
        return due

    def _hessian_due_here(self) -> bool:
        for bucket in self._buckets:
            return bucket.calls > 0 and bucket.calls % bucket.group["update_period"] == 0
        for group in self.param_groups:  # not planned yet (e.g. just loaded): read a saved step count
            for p in group["params"]:
                for key, step in self.state.get(p, {}).items():
                    if key.endswith("step"):
                        t = int(step)
                        return t > 0 and t % group["update_period"] == 0
        return False

    def update_hessian(self, batch_size: int | None = None) -> None:
        """Fold the current gradients into the curvature EMA ``H``.

        ``gnb``: the gradients must come from a loss on sampled labels; ``batch_size`` is ``B`` in
        ``ĥ = B·ĝ²`` (required): the number of labels the mean loss averaged over (tokens, for a
        language model). ``hutchinson``: the gradients must carry a graph
        (``backward(create_graph=True)``); a Hessian-vector product is taken through them. A parameter
        whose estimate is not finite keeps its ``H``.
        """
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["estimator"] == "gnb":
                if batch_size is None:
                    raise ValueError("Invalid batch_size: None (Sophia-G's estimator B·ĝ² needs the batch size)")
                check_int("batch_size", batch_size, 1)
                estimates = [batch_size * p.grad.detach() * p.grad.detach() for p in params]
            else:
                if any(p.grad.grad_fn is None for p in params):
                    raise RuntimeError("Sophia-H needs gradients with a graph: call loss.backward(create_graph=True)")
                probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
                hvps = torch.autograd.grad([p.grad for p in params], params, grad_outputs=probes)
                estimates = [u * hv for u, hv in zip(probes, hvps)]
            self._plan()  # creates the state of parameters that have not stepped yet
            beta2 = group["betas"][1]
            for p, h in zip(params, estimates):
                state = self.state[p]
                prefix = "".join(m.prefix for m in self._members(p, group))  # one block per parameter
                if prefix + "hessian" not in state:
                    continue  # an FSDP2 shard with no rows, or a parameter another process owns (DDP)
                hessian, h = state[prefix + "hessian"], local(h.detach()).to(state[prefix + "hessian"].dtype)
                finite = torch.isfinite(h).all()  # a non-finite estimate never reaches the state
                hessian.copy_(torch.where(finite, torch.add(hessian * beta2, h, alpha=1.0 - beta2), hessian))
                state[prefix + "hessian_updates"].add_(finite)
