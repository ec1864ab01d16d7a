"""The optimizers the benchmark compares: ours and the same algorithms from peers, each with the centre of
its learning-rate sweep and its published hyper-parameters.

Ours, at each method's published defaults:

- AdamW: betas (0.9, 0.95), weight decay 0.1 (the GPT-2/3 pretraining recipe); the protocol sweeps its
  weight decay once over :data:`ADAMW_WEIGHT_DECAYS` at the best rate, and AdamW's tuned (lr, weight decay)
  trains every parameter that a matrix method routes to AdamW (embedding, head, norms).
- SOAP: the reference SOAP's betas (0.95, 0.95), weight decay 0.01, refresh every 10 steps.
- EShampoo: SOAP's betas and weight decay, so that the two eigenbasis methods differ only in their update
  rule (Distributed Shampoo's own defaults, β₂ = 1 and no weight decay, are an AdaGrad setting meant for
  grafting), ε = 1e-8, refresh every 10 steps.
- Shampoo: Distributed Shampoo's betas (0.9, 0.999), ε = 1e-12, Adam grafting (β₂ 0.95), roots every 10 steps;
  KLShampoo the same.
- KLSOAP: SOAP's settings above (its authors' Adam has no bias correction, and neither has this row).
- AdamW+GPA, SOAP+GPA: Generalized Primal Averaging (μ_x 0.9, μ_y 0.8, Distributed Shampoo's defaults)
  around AdamW / SOAP at the settings here, evaluated at the averaged weights. ``-b0``: the same with the
  base optimizer's β₁ = 0, so that the averaging is the only momentum (Distributed Shampoo's GPA examples).
- Muon: ``torch.optim.Muon``'s momentum 0.95 (Nesterov) and weight decay 0.1 on the hidden matrices.
- ASGO: its root every step (``β₂ = 0.8`` statistics move fast: at 10 steps the root goes stale and the CPU
  LM ends 0.5 nats/byte worse after 100 steps) by 10 Newton–Schulz iterations, the authors' practical solver
  (CPU LM after 100 steps: 2.7065 against 2.7014 nats/byte with an exact eigh root).
- Sophia: ρ = 0.04 and weight decay 0.2, the Sophia paper's GPT-2 settings.

Peers (``peer`` names the package) run the same algorithm with the same hyper-parameters, so that a row
pair isolates the implementation: ``torch.AdamW`` (fused on a GPU), ``torch.Muon`` with a fused
``torch.optim.AdamW`` for the rest (the split users write by hand) and, when installed (the ``peers``
extra), pytorch-optimizer's and heavyball's SOAP and Muon.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

import precond
from precond.registry import OPTIMIZERS

__all__ = ["OptimizerSpec", "AdamWSetting", "Split", "SPECS", "DEFAULT_OPTIMIZERS", "ADAMW_WEIGHT_DECAYS",
           "available_optimizers"]

ADAMW_WEIGHT_DECAYS = (0.0, 0.1, 0.3)  # the documented sweep; 0.1 is the default


@dataclass(frozen=True)
class AdamWSetting:
    """AdamW's tuned rate and weight decay: AdamW's own, and those of parameters routed to AdamW."""

    lr: float
    weight_decay: float = 0.1


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    center_lr: float
    build: Callable[[nn.Module, float, AdamWSetting], Optimizer]  # (model, lr, AdamW's tuned setting)
    needs_hessian: bool = False  # Sophia: a sampled-label backward every update_period steps
    uses_adamw: bool = False  # trains parameters with AdamW's tuned setting: runs made under another are stale
    peer: str | None = None  # the package of a peer implementation; None for ours

    def available(self) -> bool:
        return self.peer is None or importlib.util.find_spec(self.peer) is not None


class Split:
    """Several optimizers stepped as one, each on its own parameters: what users write by hand to pair
    ``torch.optim.Muon`` (matrices only) with AdamW for the rest. ``param_groups`` is the concatenation, so
    a learning-rate schedule that edits ``group["lr"]`` reaches every part."""

    def __init__(self, *optimizers: Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for o, part in zip(self.optimizers, state_dict["parts"], strict=True):
            o.load_state_dict(part)


def _params(model: nn.Module):
    return [p for p in model.parameters() if p.requires_grad]


def _matrix_and_rest(model: nn.Module):
    groups: dict[bool, list] = {True: [], False: []}
    for g in precond.param_groups(model):  # frozen parameters are listed too: they are left out here
        groups[g["matrix"]] += [p for p in g["params"] if p.requires_grad]
    return groups[True], groups[False]


def _fused(model: nn.Module) -> dict:
    return {"fused": True} if next(model.parameters()).is_cuda else {"foreach": True}


def _torch_adamw(params, model: nn.Module, adamw: AdamWSetting, lr: float | None = None) -> Optimizer:
    return torch.optim.AdamW(params, lr=adamw.lr if lr is None else lr, betas=(0.9, 0.95),
                             weight_decay=adamw.weight_decay, **_fused(model))


def _torch_muon(model: nn.Module, lr: float, adamw: AdamWSetting) -> Split:
    matrices, rest = _matrix_and_rest(model)
    return Split(torch.optim.Muon(matrices, lr=lr, weight_decay=0.1, momentum=0.95, nesterov=True),
                 _torch_adamw(rest, model, adamw))


def _pytorch_optimizer_muon(model: nn.Module, lr: float, adamw: AdamWSetting) -> Optimizer:
    from pytorch_optimizer import Muon

    matrices, rest = _matrix_and_rest(model)
    return Muon([{"params": matrices, "use_muon": True}, {"params": rest, "use_muon": False}], lr=lr,
                momentum=0.95, nesterov=True, weight_decay=0.1, adamw_lr=adamw.lr, adamw_betas=(0.9, 0.95),
                adamw_wd=adamw.weight_decay, adamw_eps=1e-8)


def _heavyball_muon(model: nn.Module, lr: float, adamw: AdamWSetting) -> Split:
    import heavyball

    matrices, rest = _matrix_and_rest(model)
    return Split(heavyball.Muon(matrices, lr=lr, weight_decay=0.1), _torch_adamw(rest, model, adamw))


def _pytorch_optimizer_soap(model: nn.Module, lr: float, _: AdamWSetting) -> Optimizer:
    from pytorch_optimizer import SOAP

    return SOAP(_params(model), lr=lr, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10)


def _heavyball_soap(model: nn.Module, lr: float, _: AdamWSetting) -> Optimizer:
    import heavyball

    return heavyball.SOAP(_params(model), lr=lr, betas=(0.95, 0.95), shampoo_beta=0.95, weight_decay=0.01,
                          precondition_frequency=10)


def _soap(**options) -> Callable[[nn.Module, float, AdamWSetting], Optimizer]:
    """Our SOAP at the reference SOAP's defaults, with ``options`` on top."""
    kw = dict(betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10) | options
    return lambda m, lr, _: precond.SOAP(_params(m), lr=lr, **kw)


def _eshampoo(**options) -> Callable[[nn.Module, float, AdamWSetting], Optimizer]:
    """Our EShampoo with SOAP's betas and weight decay (see the module's docstring), ``options`` on top."""
    kw = dict(betas=(0.95, 0.95), epsilon=1e-8, weight_decay=0.01, precondition_frequency=10) | options
    return lambda m, lr, _: precond.EShampoo(_params(m), lr=lr, **kw)


def _adamw(betas=(0.9, 0.95)) -> Callable[[nn.Module, float, AdamWSetting], Optimizer]:
    """Our AdamW at the GPT-2/3 recipe's betas and the tuned weight decay."""
    return lambda m, lr, a: precond.AdamW(_params(m), lr=lr, betas=betas, weight_decay=a.weight_decay)


def _shampoo(**options) -> Callable[[nn.Module, float, AdamWSetting], Optimizer]:
    """Our Shampoo at Distributed Shampoo's defaults with Adam grafting (SOAP's β₂ and ε), ``options`` on top."""
    kw = dict(betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=10, grafting="adam", grafting_beta2=0.95,
              grafting_epsilon=1e-8) | options
    return lambda m, lr, _: precond.Shampoo(_params(m), lr=lr, **kw)


SPECS: dict[str, OptimizerSpec] = {s.name: s for s in [
    OptimizerSpec("AdamW", 3e-3, _adamw(), uses_adamw=True),
    OptimizerSpec("SOAP", 3e-3, _soap()),
    # The same SOAP with TF32 matmuls (not in the default list): does the loss curve follow float32's?
    OptimizerSpec("SOAP-tf32", 3e-3, _soap(tf32=True)),
    OptimizerSpec("EShampoo", 3e-3, _eshampoo()),
    # Not in the default list: the matmul refresh (`refine`) of every basis at every step, with TF32 matmuls
    # (82 ms a step on the 85M body, against 904 ms for emerging-optimizers' every-step SOAP): does a fresh
    # basis close the gap to AdamW that SOAP and EShampoo refreshed every 10 steps leave?
    OptimizerSpec("SOAP-F1-tf32", 3e-3, _soap(tf32=True, precondition_frequency=1, refresh_method="refine")),
    OptimizerSpec("SOAP-refine-tf32", 3e-3, _soap(tf32=True, refresh_method="refine")),  # the same, at F=10
    # The least state: factors as upper triangles, eigenbases in bfloat16 (does the loss stay?)
    OptimizerSpec("SOAP-packed-bf16", 3e-3, _soap(packed_factors=True, preconditioner_dtype=torch.bfloat16)),
    OptimizerSpec("SOAP-F1-tf32-packed-bf16", 3e-3, _soap(tf32=True, precondition_frequency=1,
                                                          refresh_method="refine", packed_factors=True,
                                                          preconditioner_dtype=torch.bfloat16)),
    # The same checked every step by Purifying Shampoo's criterion: refreshed only where
    # ‖QᵀLQ - diag‖ > τ‖QᵀLQ‖ (centred on SOAP-F1-tf32's best rate)
    *[OptimizerSpec(f"SOAP-F1-tf32-tau{tau}", 1e-3, _soap(tf32=True, precondition_frequency=1,
                                                          refresh_method="refine", refresh_tolerance=tau))
      for tau in (0.01, 0.03)],
    OptimizerSpec("EShampoo-F1-tf32", 3e-3, _eshampoo(tf32=True, precondition_frequency=1,
                                                       refresh_method="refine")),
    # Why EShampoo-F1-tf32 trails SOAP-F1-tf32 on the 20M model at 1M bytes a step (BENCHMARKS) when it leads on the
    # CPU preset: the same without blocking (SOAP's whole dims), and the same in float32 matmuls
    OptimizerSpec("EShampoo-F1-tf32-whole", 3e-3, _eshampoo(tf32=True, precondition_frequency=1,
                                                             refresh_method="refine", max_preconditioner_dim=10000)),
    OptimizerSpec("EShampoo-F1", 3e-3, _eshampoo(precondition_frequency=1, refresh_method="refine")),
    OptimizerSpec("Shampoo", 3e-3, _shampoo()),
    # the same with its roots from a warm-started eigenbasis, refined by matmuls (no eigh after the first)
    OptimizerSpec("Shampoo-refine", 3e-3, _shampoo(root_method="refine")),
    # bfloat16 roots and eigenbases (with packed factors): where does the narrow storage cost loss?
    OptimizerSpec("Shampoo-packed-bf16", 3e-3, _shampoo(packed_factors=True, preconditioner_dtype=torch.bfloat16)),
    OptimizerSpec("EShampoo-packed-bf16", 3e-3, _eshampoo(packed_factors=True, preconditioner_dtype=torch.bfloat16)),
    OptimizerSpec("KLShampoo", 3e-3, lambda m, lr, _: precond.KLShampoo(
        _params(m), lr=lr, betas=(0.9, 0.999), epsilon=1e-12, precondition_frequency=10, grafting="adam",
        grafting_beta2=0.95, grafting_epsilon=1e-8)),
    OptimizerSpec("KLSOAP", 3e-3, lambda m, lr, _: precond.KLSOAP(
        _params(m), lr=lr, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10)),
    # Iterate averaging (Distributed Shampoo's GPA defaults, mu_x 0.9, mu_y 0.8) around AdamW and SOAP at their
    # settings above; evaluated at the averaged weights x
    OptimizerSpec("AdamW+GPA", 3e-3, lambda m, lr, a: precond.PrimalAveraging(_adamw()(m, lr, a)), uses_adamw=True),
    OptimizerSpec("SOAP+GPA", 3e-3, lambda m, lr, a: precond.PrimalAveraging(_soap()(m, lr, a))),
    # The same with the base optimizer's first moment off (beta1 = 0): GPA's averaging is then the only momentum,
    # as in Distributed Shampoo's GPA examples (betas=(0.0, ...)); with beta1 = 0.9 the two momenta compound
    OptimizerSpec("AdamW+GPA-b0", 3e-3, lambda m, lr, a: precond.PrimalAveraging(_adamw((0.0, 0.95))(m, lr, a)),
                  uses_adamw=True),
    OptimizerSpec("SOAP+GPA-b0", 3e-3, lambda m, lr, a: precond.PrimalAveraging(_soap(betas=(0.0, 0.95))(m, lr, a))),
    OptimizerSpec("Muon", 2e-2, lambda m, lr, a: precond.Muon(
        precond.param_groups(m), lr=lr, weight_decay=0.1, adamw_lr=a.lr, adamw_betas=(0.9, 0.95),
        adamw_weight_decay=a.weight_decay), uses_adamw=True),
    # Muon's iteration carried by the Gram matrix, float16 (Zhang, Amsel, Chen & Dao 2026): fewer FLOPs
    OptimizerSpec("Muon-gram", 2e-2, lambda m, lr, a: precond.Muon(
        precond.param_groups(m), lr=lr, weight_decay=0.1, adamw_lr=a.lr, adamw_betas=(0.9, 0.95),
        adamw_weight_decay=a.weight_decay, ns_algorithm="gram_newton_schulz", ns_dtype="float16"), uses_adamw=True),
    OptimizerSpec("ASGO", 1e-2, lambda m, lr, a: precond.ASGO(
        precond.param_groups(m), lr=lr, weight_decay=0.0, precondition_frequency=1, root_method="newton_schulz",
        ns_steps=10, adamw_lr=a.lr, adamw_weight_decay=a.weight_decay), uses_adamw=True),
    OptimizerSpec("Sophia", 1e-3, lambda m, lr, _: precond.Sophia(_params(m), lr=lr, rho=0.04, weight_decay=0.2),
                  needs_hessian=True),
    OptimizerSpec("torch.AdamW", 3e-3, lambda m, lr, a: _torch_adamw(_params(m), m, a, lr), uses_adamw=True,
                  peer="torch"),
    OptimizerSpec("torch.Muon", 2e-2, _torch_muon, uses_adamw=True, peer="torch"),
    OptimizerSpec("pytorch_optimizer.SOAP", 3e-3, _pytorch_optimizer_soap, peer="pytorch_optimizer"),
    OptimizerSpec("pytorch_optimizer.Muon", 2e-2, _pytorch_optimizer_muon, uses_adamw=True,
                  peer="pytorch_optimizer"),
    # heavyball compiles each step function with torch.compile (minutes before the first step on a GPU)
    OptimizerSpec("heavyball.SOAP", 3e-3, _heavyball_soap, peer="heavyball"),
    OptimizerSpec("heavyball.Muon", 2e-2, _heavyball_muon, uses_adamw=True, peer="heavyball"),
]}

OURS = list(OPTIMIZERS)
# heavyball's rows only when named: its compilation takes minutes per optimizer before the first step
DEFAULT_OPTIMIZERS = OURS + ["AdamW+GPA-b0", "torch.AdamW", "torch.Muon", "pytorch_optimizer.SOAP", "pytorch_optimizer.Muon"]


def available_optimizers(names: list[str]) -> list[str]:
    """``names`` without the peers whose package is not installed."""
    return [n for n in names if SPECS[n].available()]
