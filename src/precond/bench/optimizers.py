"""The optimizers the benchmark compares, each with the centre of its learning-rate sweep.

Weight decay is 0 for every method so that the comparison isolates the update rule. Shampoo, EShampoo
and SOAP recompute their decompositions every 10 steps. ASGO recomputes its root every step (its ``β₂ = 0.8``
statistics move fast: at 10 steps the root goes stale and the CPU LM ends 0.5 nats/byte worse after 100
steps) by 10 Newton–Schulz iterations, the authors' practical solver (CPU LM after 100 steps: 2.7065
against 2.7014 nats/byte with an exact eigh root, at a fraction of eigh's GPU cost). Matrix methods
(Muon, ASGO) get the hidden matrices through :func:`precond.param_groups`; the embedding, head, norms
and biases run AdamW at AdamW's best swept rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.optim import Optimizer

import precond

__all__ = ["OptimizerSpec", "SPECS", "DEFAULT_OPTIMIZERS"]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    center_lr: float
    build: Callable[[nn.Module, float, float], Optimizer]  # (model, lr, AdamW's lr for routed params)
    needs_hessian: bool = False  # Sophia: a sampled-label backward every update_period steps
    uses_adamw_lr: bool = False  # Muon, ASGO: routed parameters train at AdamW's best rate


def _params(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


SPECS: dict[str, OptimizerSpec] = {s.name: s for s in [
    OptimizerSpec("AdamW", 3e-3, lambda m, lr, _: precond.AdamW(_params(m), lr=lr, betas=(0.9, 0.95),
                                                                  weight_decay=0.0)),
    OptimizerSpec("SOAP", 3e-3, lambda m, lr, _: precond.SOAP(_params(m), lr=lr, betas=(0.95, 0.95),
                                                                weight_decay=0.0, precondition_frequency=10)),
    # The same SOAP with TF32 matmuls (not in the default list): does the loss curve follow float32's?
    OptimizerSpec("SOAP-tf32", 3e-3, lambda m, lr, _: precond.SOAP(_params(m), lr=lr, betas=(0.95, 0.95),
                                                                     weight_decay=0.0, precondition_frequency=10,
                                                                     tf32=True)),
    OptimizerSpec("EShampoo", 3e-3, lambda m, lr, _: precond.EShampoo(
        _params(m), lr=lr, betas=(0.95, 0.95), epsilon=1e-8, precondition_frequency=10)),
    OptimizerSpec("Shampoo", 3e-3, lambda m, lr, _: precond.Shampoo(
        _params(m), lr=lr, betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=10, grafting="adam",
        grafting_beta2=0.95, grafting_epsilon=1e-8)),
    OptimizerSpec("Muon", 2e-2, lambda m, lr, adam_lr: precond.Muon(
        precond.param_groups(m), lr=lr, weight_decay=0.0, adamw_lr=adam_lr, adamw_betas=(0.9, 0.95)),
        uses_adamw_lr=True),
    OptimizerSpec("ASGO", 1e-2, lambda m, lr, adam_lr: precond.ASGO(
        precond.param_groups(m), lr=lr, weight_decay=0.0, precondition_frequency=1, root_method="newton_schulz",
        ns_steps=10, adamw_lr=adam_lr, adamw_weight_decay=0.0),
        uses_adamw_lr=True),
    OptimizerSpec("Sophia", 1e-3, lambda m, lr, _: precond.Sophia(_params(m), lr=lr, rho=0.04, weight_decay=0.0),
                  needs_hessian=True),
]}

DEFAULT_OPTIMIZERS = ["AdamW", "SOAP", "EShampoo", "Shampoo", "Muon", "ASGO", "Sophia"]
