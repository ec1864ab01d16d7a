"""Iterate averaging around any optimizer: Generalized Primal Averaging and Schedule-Free.

Both keep three sequences per parameter (Defazio et al. 2024, "The Road Less Scheduled"; GPA:
arXiv 2512.17131): ``z``, the base optimizer's own iterates; ``x``, their weighted average, the weights
to evaluate; and ``y = μ_y·x + (1 − μ_y)·z``, the weights the gradient is taken at, which the model holds
while training. With ``P`` the base optimizer's step (``z`` would move by ``d = −lr·P``), one step is::

    z ← z·(1 − lr·wd)                                  (decoupled weight decay acts on z alone)
    y ← y + (1 − μ_x·μ_y)·d + (1 − μ_x)·(z − y)
    z ← z + d

which, without decay, is ``x ← μ_x·x + (1 − μ_x)·z`` followed by ``y = μ_y·x + (1 − μ_y)·z`` (with decay,
``x`` is read off the shrunk ``z``, as in Distributed Shampoo). GPA holds ``μ_x``
(``eval_interp_coeff``) and ``μ_y`` (``train_interp_coeff``) fixed: ``μ_y = 1`` with the base optimizer
``SGD(momentum=0)`` at ``lr / (1 − μ_x)`` is heavy-ball momentum ``μ_x``, ``μ_y = μ_x`` is Nesterov's.
Schedule-Free sets ``μ_x = 1 − lr_t^p / Σ_{i≤t} lr_i^p`` at every step (``p = eval_coeff_lr_power``, the
paper's Eq. 23 for ``p = 2``), an average weighted by the rate, which replaces the decay schedule.
Either averaging is a momentum of its own: around Adam, SOAP and the like give the base optimizer ``β₁ = 0``
(with ``β₁ = 0.9`` the two momenta compound, and the benchmark's LM trains far slower; BENCHMARKS.md).

:meth:`IterateAveraging.eval` moves the parameters to ``x`` (``y + (1 − 1/μ_y)·(z − y)``) and
:meth:`~IterateAveraging.train` back to ``y`` (``x + (1 − μ_y)·(z − x)``); a step in eval mode is an error.
These are Distributed Shampoo's ``GeneralizedPrimalAveragingConfig`` / ``ScheduleFreeConfig`` semantics,
weight decay included, for any base optimizer: the base optimizer steps with its decoupled weight decay
set to 0 (its ``d`` is then the parameters' change) and the decay is applied to ``z`` at the rate the base
optimizer would have used (:meth:`precond.BlockEngine.decoupled_decay`; for ``torch.optim.AdamW`` and
``torch.optim.Muon`` the group's ``lr`` and ``weight_decay``). Weight decay of the L2 kind (added to the
gradient, e.g. ``Shampoo(use_decoupled_weight_decay=False)``, ``torch.optim.SGD``) stays in the base step.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .validation import check_in, check_positive

__all__ = ["IterateAveraging", "PrimalAveraging", "ScheduleFree"]

_DECAY_KEYS = ("weight_decay", "adamw_weight_decay")  # the base optimizers' decoupled-decay options


def _torch_decoupled(optimizer: torch.optim.Optimizer) -> bool:
    muon = getattr(torch.optim, "Muon", None)
    return isinstance(optimizer, torch.optim.AdamW) or (muon is not None and isinstance(optimizer, muon))


@contextlib.contextmanager
def _decay_moved(optimizer: torch.optim.Optimizer) -> Iterator[bool]:
    """``optimizer``'s decoupled weight decay set to 0 while it steps (restored after); yields whether its
    decay is decoupled (and so is to be applied to ``z``)."""
    groups = optimizer.param_groups
    if hasattr(optimizer, "decoupled_decay"):  # ours: per group (Shampoo may decay by L2)
        moved = [optimizer.decouples_weight_decay(g) for g in groups]
    else:
        moved = [_torch_decoupled(optimizer)] * len(groups)
    saved = [{k: g[k] for k in _DECAY_KEYS if k in g} if m else {} for g, m in zip(groups, moved)]
    for group, values in zip(groups, saved):
        group.update(dict.fromkeys(values, 0.0))
    try:
        yield any(moved)
    finally:
        for group, values in zip(groups, saved):
            group.update(values)


def _decay_rates(optimizer: torch.optim.Optimizer) -> dict[Tensor, tuple[Any, float]]:
    """Per parameter, the ``(lr, weight_decay)`` of the decoupled decay ``optimizer`` would have applied."""
    if hasattr(optimizer, "decoupled_decay"):
        return optimizer.decoupled_decay()
    return {p: (g["lr"], g.get("weight_decay", 0.0)) for g in optimizer.param_groups for p in g["params"]}


# Where the wrapper's own state goes in a state_dict: beside the base optimizer's, in its flat layout.
_Z, _LR_SUM, _TRAINING = "iterate_averaging_z", "iterate_averaging_lr_sum", "iterate_averaging_training"


def _with_z(state: dict[Any, dict], zs: dict[Tensor, Tensor], params: list[Tensor]) -> dict[Any, dict]:
    """A saved base state (keyed by parameter index) with each parameter's ``z`` added to its entry."""
    index = {id(p): i for i, p in enumerate(params)}
    state = {k: dict(v) for k, v in state.items()}
    for p, z in zs.items():
        state.setdefault(index[id(p)], {})[_Z] = z
    return state


def _merged_state(base_state: dict[Tensor, dict], zs: dict[Tensor, Tensor]) -> collections.defaultdict:
    """Per parameter, the base optimizer's state with ``z`` added."""
    return collections.defaultdict(dict, {p: {**base_state.get(p, {}), **({_Z: zs[p]} if p in zs else {})}
                                          for p in set(zs) | set(base_state)})


def _split_z(state: dict[Any, dict], params: list[Tensor]) -> tuple[dict[Any, dict], dict[Tensor, Tensor]]:
    """The inverse of :func:`_with_z`: the base optimizer's saved state, and ``z`` per parameter (checked)."""
    base_state, zs = {}, {}
    for i, entry in state.items():
        if _Z in entry:
            if int(i) >= len(params) or entry[_Z].shape != params[int(i)].shape:
                raise ValueError(f"state_dict's iterate_averaging z for parameter {i} does not match the "
                                 "optimizer's parameters")
            zs[params[int(i)]] = entry[_Z]
        rest = {k: v for k, v in entry.items() if k != _Z}
        if rest:
            base_state[i] = rest
    return base_state, zs


def _average(p: Tensor, z: Tensor, y: Tensor, mu_x: float, mu_y: float, lr: float, wd: float) -> None:
    """One averaging step in place: the base optimizer moved ``p`` from ``y`` by ``d``; ``z`` takes the
    whole move (and the base's decoupled decay), ``y`` (the new parameters) the interpolation between them."""
    if wd != 0.0:
        z.mul_(1.0 - lr * wd)
    d = p.detach() - y
    z_minus_y = z - y
    z.add_(d)
    y.add_(d, alpha=1.0 - mu_x * mu_y).add_(z_minus_y, alpha=1.0 - mu_x)
    p.copy_(y)


class IterateAveraging(torch.optim.Optimizer):
    """The base of :class:`PrimalAveraging` and :class:`ScheduleFree`: wraps ``optimizer`` and shares its
    ``param_groups`` (an LR scheduler given this object edits the base optimizer's rates). Its state per
    parameter is ``z``; per group ``lr_sum`` (Schedule-Free's ``Σ lr^p``) and the mode, kept in the shared
    groups (``"iterate_averaging_lr_sum"``, ``"iterate_averaging_training"``). ``state_dict()`` is the base
    optimizer's with ``z`` one more tensor of each parameter's state (``"iterate_averaging_z"``): the flat
    layout distributed checkpointing (DCP) and its ``get_optimizer_state_dict`` expect, flattened or not."""

    def __init__(self, optimizer: torch.optim.Optimizer, train_interp_coeff: float) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_in("train_interp_coeff", train_interp_coeff, 0.0, 1.0, low_open=True)
        self.optimizer = optimizer
        self.train_interp_coeff = float(train_interp_coeff)
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self._zs: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            group.setdefault(_LR_SUM, 0.0)
            group[_TRAINING] = True
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        self._patch_step_function()

    def _eval_interp_coeff(self, group_index: int) -> float:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:  # the base optimizer's own API (preconditioner_stats, ...)
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def _params(self) -> Iterator[Tensor]:
        return (p for group in self.param_groups for p in group["params"])

    def _z(self, p: Tensor) -> Tensor:
        if p not in self._zs:  # z starts at the parameters (x = y = z)
            self._zs[p] = p.detach().clone()
        return self._zs[p]

    @property
    def state(self) -> collections.defaultdict:
        """Per parameter, the base optimizer's state and ``z``, as one state (what ``state_dict`` saves)."""
        return _merged_state(self.optimizer.state, self._zs)

    @property
    def training(self) -> bool:
        """Whether the parameters are at ``y`` (train mode) rather than ``x``."""
        return bool(self.param_groups[0].get(_TRAINING, True))

    @property
    def lr_sums(self) -> list[float]:
        """Per group, Schedule-Free's ``Σ lr^p`` so far."""
        return [float(g.get(_LR_SUM, 0.0)) for g in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the base optimizer, averaged (see the module docstring)."""
        if not self.training:
            raise RuntimeError("an iterate-averaging optimizer steps in train mode: call optimizer.train() "
                               "before optimizer.step() (optimizer.eval() moved the parameters to x)")
        params = [p for p in self._params() if p.grad is not None]
        zs = [self._z(p) for p in params]
        before = [p.detach().clone() for p in params]
        with _decay_moved(self.optimizer) as decoupled:
            loss = self.optimizer.step(closure)
        rates = _decay_rates(self.optimizer) if decoupled else {}
        mu_xs = [self._eval_interp_coeff(i) for i in range(len(self.param_groups))]
        coeffs = {id(p): mu_x for mu_x, g in zip(mu_xs, self.param_groups) for p in g["params"]}
        for p, z, y in zip(params, zs, before):
            _average(p, z, y, coeffs[id(p)], self.train_interp_coeff, *rates.get(p, (0.0, 0.0)))
        return loss

    @torch.no_grad()
    def _move(self, factor: float, training: bool) -> None:
        """The parameters ``factor`` of the way to ``z``; then the mode is ``training``."""
        for p in self._params():
            if p in self._zs:
                p.add_(self._zs[p] - p, alpha=factor)
        for group in self.param_groups:
            group[_TRAINING] = training

    def eval(self) -> None:
        """Parameters to the averaged iterate ``x``, to evaluate (a no-op in eval mode)."""
        if self.training:
            self._move(1.0 - 1.0 / self.train_interp_coeff, training=False)

    def train(self) -> None:
        """Parameters back to ``y``, where gradients are taken (a no-op in train mode)."""
        if not self.training:
            self._move(1.0 - self.train_interp_coeff, training=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        saved = self.optimizer.state_dict()  # its groups hold lr_sum and the mode
        return {**saved, "state": _with_z(saved["state"], self._zs, list(self._params()))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not all(_LR_SUM in g and _TRAINING in g for g in state_dict["param_groups"]):
            raise ValueError(f"state_dict has no {_LR_SUM!r} in its param groups: it was not saved by "
                             f"{type(self).__name__}.state_dict()")
        base_state, zs = _split_z(state_dict["state"], list(self._params()))
        self.optimizer.load_state_dict({**state_dict, "state": base_state})
        self.param_groups = self.optimizer.param_groups
        self._zs = {p: z.detach().to(p.device, copy=True) for p, z in zs.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


class PrimalAveraging(IterateAveraging):
    """Generalized Primal Averaging (GPA) around ``optimizer``: fixed ``μ_x`` and ``μ_y``.

    ``x ← μ_x·x + (1 − μ_x)·z``, ``y = μ_y·x + (1 − μ_y)·z``, ``z`` the base optimizer's iterates (see
    :mod:`precond.averaging`). Arguments and defaults follow Distributed Shampoo's
    ``GeneralizedPrimalAveragingConfig``: ``eval_interp_coeff`` ``μ_x ∈ [0, 1)`` (0.9),
    ``train_interp_coeff`` ``μ_y ∈ (0, 1]`` (0.8). The base step counts ``1 − μ_x·μ_y`` times in ``y``: to
    match ``SGD(lr, momentum=β)``, wrap ``SGD(lr / (1 − β))`` with ``μ_x = β`` and ``μ_y = 1``.

    Evaluate between ``optimizer.eval()`` and ``optimizer.train()``::

        opt = PrimalAveraging(precond.SOAP(model.parameters(), lr=3e-3))
        ...; opt.step(); ...
        opt.eval(); evaluate(model); opt.train()
    """

    def __init__(self, optimizer: torch.optim.Optimizer, eval_interp_coeff: float = 0.9,
                 train_interp_coeff: float = 0.8) -> None:
        check_in("eval_interp_coeff", eval_interp_coeff, 0.0, 1.0, high_open=True)
        super().__init__(optimizer, train_interp_coeff)
        self.eval_interp_coeff = float(eval_interp_coeff)

    def _eval_interp_coeff(self, group_index: int) -> float:
        return self.eval_interp_coeff


class ScheduleFree(IterateAveraging):
    """Schedule-Free around ``optimizer``: ``μ_x = 1 − lr_t^p / Σ_{i≤t} lr_i^p`` at each step.

    Defazio et al. 2024, "The Road Less Scheduled" (Eq. 23 for ``p = 2``): ``x`` averages the base
    optimizer's iterates ``z`` weighted by the rate to the power ``p``, which takes the place of a decaying
    schedule (keep warmup, drop the decay). Arguments and defaults follow Distributed Shampoo's
    ``ScheduleFreeConfig``: ``train_interp_coeff`` ``μ_y ∈ (0, 1]`` (0.8), ``eval_coeff_lr_power`` ``p``
    (2). ``Σ lr^p`` is kept per param group and saved by ``state_dict``. Evaluate between ``eval()`` and
    ``train()`` (see :class:`PrimalAveraging`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train_interp_coeff: float = 0.8,
                 eval_coeff_lr_power: float = 2) -> None:
        check_positive("eval_coeff_lr_power", eval_coeff_lr_power)
        super().__init__(optimizer, train_interp_coeff)
        self.eval_coeff_lr_power = eval_coeff_lr_power

    def _eval_interp_coeff(self, group_index: int) -> float:
        group = self.param_groups[group_index]
        lr = float(group["lr"]) ** self.eval_coeff_lr_power
        group[_LR_SUM] = lr_sum = group.get(_LR_SUM, 0.0) + lr
        return 1.0 - lr / lr_sum if lr_sum > 0 else 0.0
