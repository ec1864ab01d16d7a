r"""Learning-rate and weight-decay multipliers that carry hyper-parameters tuned on a narrow model to a wide one.

The rules follow the spectral condition for feature learning (Yang, Simon & Bernstein 2023,
arXiv:2310.17813), the form of μP that Qiu, Chen, Phan, Lei & Wilson ("Hyperparameter Transfer Enables
Consistent Gains of Matrix-Preconditioned Optimizers Across Scales", arXiv:2512.05620) extend to Shampoo,
SOAP and Muon: a hidden weight's update should keep a spectral norm of order :math:`\sqrt{d_{out}/d_{in}}`
as the width grows. How a rate must scale for that depends on how the optimizer's update scales:

- **entrywise-normalised updates** (AdamW, Sophia, SOAP — Adam in a rotated basis — and anything grafted
  onto Adam's norm: Shampoo/EShampoo with ``grafting="adam"``): the entries of the update are of order 1,
  and on the nearly low-rank gradients of wide layers the update's spectral norm grows as
  :math:`\sqrt{d_{out} d_{in}}`, so the rate scales as :math:`1/d_{in}` (μP for Adam, Tensor Programs V);
- **spectrally normalised updates** (Muon, ASGO, Shampoo/EShampoo without grafting — with exponents
  :math:`-1/4` on each side the update is invariant to the gradient's scale and of spectral norm order 1):
  the rate scales as :math:`\sqrt{d_{out}/d_{in}}`;
- **explicitly normalised updates** (Shampoo, EShampoo or SOAP with ``spectral_normalize=True``: each block's
  update is rescaled to spectral norm :math:`\sqrt{d_{out}/d_{in}}`, the spectral condition itself): a
  hidden matrix's rate needs no multiplier; an embedding, stored ``[vocab, width]`` and so normalised to
  :math:`\sqrt{vocab/width}` where the condition asks :math:`\sqrt{width/vocab}`, takes ``width/base``;
- embeddings (a one-hot input) keep their rate under Adam, and so do biases and gains (vectors); the output
  head, a hidden-like matrix whose output dim does not grow, follows its optimizer's hidden rule.

Multipliers are relative to a *base* model (the one the hyper-parameters were tuned on): each parameter is
matched to the base parameter of the same name, and only the ratios ``d/d_base`` enter. Independent weight
decay is scaled as ``1/width`` (the paper's compute-optimal finding); since PyTorch's decay is coupled to the
rate (``W ← W(1 - lr·wd)``), a group's ``weight_decay`` is divided by its rate multiplier too. The depth rule
(residual branches multiplied by ``1/L``, relative to the base depth) is :func:`residual_multiplier`, for
model code. These multipliers were derived here from the spectral condition; the transfer experiment
(``benchmarks/transfer_study.py``) measures whether the optimal rate stays put.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import nn

from .registry import OPTIMIZERS
from .routing import param_groups as route

__all__ = ["RULES", "NORMALIZABLE", "rule_of", "lr_multiplier", "scaled_param_groups", "residual_multiplier"]

# optimizer name → how its update's spectral norm scales ("entrywise" like Adam, "spectral" like Muon)
RULES = {name: entry.update for name, entry in OPTIMIZERS.items()}
NORMALIZABLE = tuple(name for name, entry in OPTIMIZERS.items() if entry.normalizable)


def rule_of(optimizer: str, grafting: str | None = None, spectral_normalize: bool = False) -> str:
    """``"entrywise"``, ``"spectral"`` or ``"normalized"`` for an optimizer class name; Shampoo/EShampoo
    grafted onto Adam, RMSprop or AdaGrad take their graft's norm, hence its entrywise rule; with
    ``spectral_normalize`` (Shampoo, EShampoo, SOAP) the update's norm is set explicitly."""
    if optimizer not in RULES:
        raise ValueError(f"Invalid optimizer: {optimizer!r} (one of {sorted(RULES)})")
    if spectral_normalize:
        if optimizer not in NORMALIZABLE:
            raise ValueError(f"Invalid spectral_normalize: {optimizer} has no such option (one of {NORMALIZABLE})")
        return "normalized"
    if optimizer in ("Shampoo", "EShampoo") and grafting in ("adam", "rmsprop", "adagrad"):
        return "entrywise"
    return RULES[optimizer]


def lr_multiplier(role: str, rule: str, fan_in: int, fan_out: int, base_fan_in: int, base_fan_out: int) -> float:
    """The rate multiplier of one parameter.

    ``role`` is ``"hidden"`` (a preconditioned matrix, or the output head), ``"embedding"`` or ``"vector"``;
    ``rule`` is ``"entrywise"``, ``"spectral"`` or ``"normalized"``; fans are those of the parameter and of
    its base.
    """
    if role not in ("hidden", "embedding", "vector"):
        raise ValueError(f"Invalid role: {role!r} (hidden, embedding or vector)")
    r_in, r_out = fan_in / base_fan_in, fan_out / base_fan_out
    if rule == "normalized":
        return r_in if role == "embedding" else 1.0
    if role in ("embedding", "vector"):
        return 1.0
    if rule == "entrywise":
        return 1.0 / r_in
    if rule == "spectral":
        return math.sqrt(r_out / r_in)
    raise ValueError(f"Invalid rule: {rule!r} (entrywise, spectral or normalized)")


def _fans(shape: tuple[int, ...], transposed: bool = False) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight in ``nn.Linear``/conv layout ``[out, in, *kernel]``, or stored ``[in, out]``
    when ``transposed`` (Hugging Face's ``Conv1D``)."""
    if transposed:
        return int(shape[0]), int(shape[1])
    return (math.prod(shape[1:]) if len(shape) > 1 else 1), (int(shape[0]) if shape else 1)


def scaled_param_groups(model: nn.Module, base: nn.Module, optimizer: str, *, lr: float, weight_decay: float = 0.0,
                        width: int | None = None, base_width: int | None = None, grafting: str | None = None,
                        adamw_lr: float | None = None, head: str | Iterable[str] | None = "auto",
                        spectral_normalize: bool = False) -> list[dict[str, Any]]:
    """Param groups for ``model`` carrying ``lr``/``weight_decay`` tuned on ``base`` (same architecture,
    another width), one group per distinct multiplier, in :func:`precond.param_groups`'s routing.

    Matrices (the ``"matrix": True`` group of the routing, and the head) get the hidden rule of
    ``optimizer`` (see the module docstring); for Muon and ASGO the parameters routed to AdamW (embeddings,
    head, vectors) take AdamW's rules and ``adamw_lr``. ``width``/``base_width`` (default: inferred as the
    most common fan-in ratio) scale independent weight decay as ``1/width``. ``spectral_normalize=True``
    (Shampoo, EShampoo, SOAP) takes the normalised rule and sets the option in every group, so the optimizer's
    updates are normalised as the multipliers assume. Each group carries ``lr_multiplier`` for reference;
    matrices stored ``(fan_in, fan_out)`` (Hugging Face's ``Conv1D``) are read so and keep ``"transposed"``.
    """
    rule = rule_of(optimizer, grafting, spectral_normalize)
    splits_adamw = OPTIMIZERS[optimizer].routes_vectors
    base_shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    entries = []
    for group in route(model, head=head):
        for name, p in zip(group["param_names"], group["params"]):
            if name not in base_shapes:
                raise ValueError(f"parameter {name!r} has no namesake in the base model")
            base_shape = base_shapes[name]
            if p.dim() != len(base_shape):
                raise ValueError(f"parameter {name!r}: shape {tuple(p.shape)} and base shape {base_shape} "
                                 "differ in rank")
            if p.dim() < 2:
                role = "vector"
            elif id(p) in embeddings:
                role = "embedding"
            else:
                role = "hidden"
            transposed = group.get("transposed", False)
            fan_in, fan_out = _fans(tuple(p.shape), transposed)
            base_fan_in, base_fan_out = _fans(base_shape, transposed)
            to_adamw = splits_adamw and not group["matrix"]
            param_rule = "entrywise" if to_adamw else rule
            multiplier = lr_multiplier(role, param_rule, fan_in, fan_out, base_fan_in, base_fan_out)
            entries.append((name, p, group["matrix"], transposed, to_adamw, multiplier, fan_in / base_fan_in))
    if width is None or base_width is None:
        ratios = [r for *_, r in entries if r != 1.0] or [1.0]
        width_ratio = max(set(ratios), key=ratios.count)
    else:
        width_ratio = width / base_width
    groups: dict[tuple, dict[str, Any]] = {}
    for name, p, matrix, transposed, to_adamw, multiplier, _ in entries:
        key = (matrix, transposed, to_adamw, multiplier)
        if key not in groups:
            base_lr = (adamw_lr if adamw_lr is not None else lr) if to_adamw else lr
            groups[key] = {"params": [], "param_names": [], "matrix": matrix, "lr": base_lr * multiplier,
                           "weight_decay": weight_decay / (width_ratio * multiplier), "lr_multiplier": multiplier}
            if transposed:
                groups[key]["transposed"] = True
            if spectral_normalize:
                groups[key]["spectral_normalize"] = True
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def residual_multiplier(depth: int, base_depth: int) -> float:
    """The ``1/L`` depth rule: multiply each residual branch's output by ``base_depth / depth``."""
    if depth < 1 or base_depth < 1:
        raise ValueError(f"Invalid depth: {depth}, {base_depth} (must be >= 1)")
    return base_depth / depth
