"""AdamW on the engine: the diagonal path as a public optimizer, and the rule Muon and ASGO route to."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .blocks import BlockLayout
from .engine import BlockEngine, state_dtype
from .validation import check_betas, check_lr, check_nonneg, check_positive

__all__ = ["AdamW", "init_adam_state", "adam_direction"]


def init_adam_state(block: Tensor) -> dict[str, Any]:
    dtype = state_dtype(block)
    return {"step": 0, "exp_avg": torch.zeros(block.shape, dtype=dtype, device=block.device),
            "exp_avg_sq": torch.zeros(block.shape, dtype=dtype, device=block.device)}


def adam_direction(state: dict[str, Any], grad: Tensor, betas: tuple[float, float], eps: float) -> Tensor:
    r"""One Adam step's direction ``m̂ / (√v̂ + ε)``, in ``torch.optim.AdamW``'s arithmetic order."""
    beta1, beta2 = betas
    state["step"] += 1
    t = state["step"]
    state["exp_avg"].lerp_(grad, 1.0 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - beta2**t)).add_(eps)
    return state["exp_avg"] / (1.0 - beta1**t) / denom


class AdamW(BlockEngine):
    r"""AdamW (Loshchilov & Hutter 2019) on precond's engine, a drop-in for ``torch.optim.AdamW``.

    .. math::
        W &\leftarrow W(1 - \text{lr}\cdot\text{wd}) \\
        M &\leftarrow \beta_1 M + (1-\beta_1) G,\quad V \leftarrow \beta_2 V + (1-\beta_2) G^{\odot 2} \\
        W &\leftarrow W - \text{lr}\,\frac{M/(1-\beta_1^t)}{\sqrt{V/(1-\beta_2^t)} + \epsilon}

    Args: ``lr`` (1e-3), ``betas`` ((0.9, 0.999)), ``eps`` (1e-8), ``weight_decay`` (1e-2), as torch's.
    Unlike torch's, a non-finite gradient skips the parameter (counted) instead of poisoning its state.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        check_lr(lr)
        check_betas(betas)
        check_positive("eps", eps)
        check_nonneg("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        return BlockLayout.build(tuple(param.shape), math.inf, "none", "identity")

    def _init_block(self, block, layout, index, group):
        return init_adam_state(block)

    def _direction(self, state, grad, group):
        return adam_direction(state, grad, group["betas"], group["eps"])
