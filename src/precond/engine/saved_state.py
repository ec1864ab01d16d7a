"""Checking a saved optimizer state against the one the optimizer would create, before anything is loaded."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

__all__ = ["STATS_KEY", "checked_state", "widen_stats"]

STATS_KEY = re.compile(r"^(?:shard\d+of\d+\.)?(?:block(\d+)\.)?stats(\d+)$")  # a factor's counters


def checked_state(engine: Any, saved: dict[str, Any], p: Tensor, group: dict[str, Any], key: Any) -> dict[str, Any]:
    """``saved`` checked against what this optimizer would create; under DDP a full state (saved by one
    process) is narrowed to the blocks this process owns."""
    expected = engine._expected_state(p, group)
    where = f"state[{key!r}] (parameter of shape {tuple(p.shape)})"
    if isinstance(saved, dict):  # torch.optim's checkpoints (AdamW's) have no skip counters: they start at 0
        counters = {k: torch.zeros((), dtype=torch.int64) for k in expected
                    if k not in saved and k.rsplit(".", 1)[-1] == "nonfinite"}
        saved = {**saved, **counters}
        saved = {k: widen_stats(k, v, expected[k]) if k in expected else v for k, v in saved.items()}
    if engine._splits_work and isinstance(saved, dict) and set(saved) > set(expected):
        everything = engine._expected_state(p, group, owned_only=False)
        if set(saved) == set(everything):
            saved = {k: saved[k] for k in expected}
    if not isinstance(saved, dict) or set(saved) != set(expected):
        got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{where}: saved keys {got} do not match expected {sorted(expected)}")
    for name, want in expected.items():
        got = saved[name]
        if not isinstance(got, Tensor):
            raise ValueError(f"{where}[{name!r}]: expected a tensor of shape {tuple(want.shape)}, "
                             f"got {type(got).__name__}")
        if got.shape != want.shape:
            raise ValueError(f"{where}[{name!r}]: saved shape {tuple(got.shape)} does not match expected "
                             f"{tuple(want.shape)}")
        if got.dtype != want.dtype:
            raise ValueError(f"{where}[{name!r}]: saved dtype {got.dtype} does not match expected {want.dtype}")
    return saved


def widen_stats(key: str, saved: Any, expected: Tensor) -> Any:
    """A factor's counters saved before a counter was added (a shorter ``stats`` row) end in zeros."""
    if (STATS_KEY.match(key) and isinstance(saved, Tensor) and saved.dim() == 1 and expected.dim() == 1
            and saved.shape[0] < expected.shape[0]):
        return torch.cat([saved, saved.new_zeros(expected.shape[0] - saved.shape[0])])
    return saved
