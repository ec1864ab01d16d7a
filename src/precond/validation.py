"""Argument checks shared by the public optimizers: each error names the argument."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["pair", "check_lr", "check_in", "check_betas", "check_nonneg", "check_finite_nonneg", "check_positive",
           "check_int", "check_choice", "check_max_dim", "check_group", "Rule", "lr_rule", "betas_rule",
           "betas_to_one_rule", "flag_rule", "fraction_rule", "preconditioner_dtype_rule", "STEP_RULES"]


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (must be a number)")
    if math.isnan(value):
        raise ValueError(f"Invalid {name}: nan")
    return float(value)


def check_lr(lr: Any) -> None:
    # A tensor lr (as torch allows) is accepted as long as it holds one non-negative value.
    value = float(lr.item()) if hasattr(lr, "item") else _number("lr", lr)
    if not value >= 0.0:
        raise ValueError(f"Invalid lr: {lr} (must be >= 0)")
    if math.isinf(value):
        raise ValueError(f"Invalid lr: {lr} (must be finite)")


def check_finite_nonneg(name: str, value: Any) -> None:
    check_nonneg(name, value)
    if math.isinf(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")


def check_in(name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    v = _number(name, value)
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if not (ok_low and ok_high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {value} (must be in {lo}{low}, {high}{hi})")


def pair(value: Any) -> Any:
    """``value`` as a tuple when it is a sequence, else as it is, for :func:`check_betas` to name the argument
    (``betas=0.9`` is refused with a ValueError, not a TypeError from ``tuple(0.9)``)."""
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def check_betas(betas: Any, name: str = "betas", beta2_may_be_one: bool = False) -> None:
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r} (must be a pair (beta1, beta2))")
    check_in(f"{name}[0]", betas[0], 0.0, 1.0, high_open=True)
    check_in(f"{name}[1]", betas[1], 0.0, 1.0, high_open=not beta2_may_be_one)


def check_nonneg(name: str, value: Any) -> None:
    if not _number(name, value) >= 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")


def check_positive(name: str, value: Any) -> None:
    if not _number(name, value) > 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {minimum})")


def check_max_dim(name: str, value: Any) -> None:
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return
    check_int(name, value, 1)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {tuple(choices)})")


# A group rule checks one hyper-parameter that a param group may set: ``rule(key, value)`` raises
# ``ValueError`` naming ``key``. Each optimizer lists its rules (``BlockEngine._group_rules``); the engine
# applies them to the constructor's defaults and to every group, added at construction or later.
Rule = Callable[[str, Any], None]


def lr_rule(name: str, value: Any) -> None:
    check_lr(value)


def betas_rule(name: str, value: Any) -> None:
    check_betas(value, name)


def betas_to_one_rule(name: str, value: Any) -> None:
    check_betas(value, name, beta2_may_be_one=True)


def flag_rule(name: str, value: Any) -> None:
    check_choice(name, value, (False, True))


def fraction_rule(name: str, value: Any) -> None:
    check_in(name, value, 0.0, 1.0, high_open=True)


def preconditioner_dtype_rule(name: str, value: Any) -> None:
    """``None`` (the state's dtype) or a floating dtype to keep the roots or eigenbases in."""
    check_choice(name, value, (None, torch.bfloat16, torch.float16, torch.float32, torch.float64))


# What every optimizer's groups may set.
STEP_RULES: dict[str, Rule] = {"lr": lr_rule, "weight_decay": check_finite_nonneg}


def check_group(rules: dict[str, Rule], group: dict[str, Any], where: str | None = None) -> None:
    """Applies every rule whose key ``group`` holds; ``where`` (e.g. "param group 2") ends the message."""
    for key, rule in rules.items():
        if key in group:
            try:
                rule(key, group[key])
            except ValueError as err:
                if where is None:
                    raise
                raise ValueError(f"{err} in {where}") from None
