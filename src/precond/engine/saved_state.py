"""Loading a saved optimizer state: checked against the one the optimizer would create, before anything is loaded."""

from __future__ import annotations

import itertools
import re
from typing import Any

import torch
from torch import Tensor

from .plan import engine_entries, fresh_block_state, state_dtype

__all__ = ["STATS_KEY", "StateLoading", "checked_state", "widen_stats"]

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


class StateLoading:
    """:meth:`load_state_dict` of :class:`~precond.engine.core.BlockEngine` (a base class of it, before
    ``torch.optim.Optimizer``, whose loading it finishes with)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state saved by :meth:`state_dict` (or by distributed checkpointing, DCP; AdamW also loads
        ``torch.optim.AdamW``'s, whose groups' extra options then stay in the groups, and torch's loads ours).

        Every saved tensor is checked against the shape and dtype this optimizer would create (computed
        on the ``meta`` device, so no second state is built) before anything is changed; tensors keep
        their saved dtype (the float32 state of a bf16 parameter stays float32) and are copied, so
        continuing from a checkpoint is bit-identical to not stopping.
        """
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        for index, saved in enumerate(saved_groups):  # a torch.optim.AdamW checkpoint with options we lack
            for option in ("amsgrad", "maximize", "differentiable"):
                if saved.get(option, False):
                    raise ValueError(f"state_dict's param group {index} has {option}=True, which "
                                     f"{type(self).__name__} does not implement")
        if len(groups) != len(saved_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, the optimizer {len(groups)}")
        params = list(itertools.chain.from_iterable(g["params"] for g in groups))
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in saved_groups))
        if len(saved_ids) != len(params):
            raise ValueError(f"state_dict has {len(saved_ids)} parameters, the optimizer has {len(params)}")
        # The hyper-parameters that shape the state are the saved groups' (they replace the current ones).
        group_of = [dict(g, **{k: v for k, v in s.items() if k != "params"})
                    for g, s in zip(groups, saved_groups) for _ in g["params"]]
        by_id = {saved: (p, group) for saved, p, group in zip(saved_ids, params, group_of)}
        loaded = {}
        for key, value in state_dict["state"].items():
            if key not in by_id:
                raise ValueError(f"state_dict has state for parameter {key!r}, which its param_groups do not list")
            p, group = by_id[key]
            loaded[p] = checked_state(self, value, p, group, key)
        defaults = dict(self.defaults)
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        self.defaults = defaults  # torch's load adds "differentiable" to the defaults, and so to every group
        for group in self.param_groups:  # a checkpoint from before an option existed takes its default
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for p, value in loaded.items():
            self.state[p] = {k: v.detach().to(device=p.device, copy=True) if isinstance(v, Tensor) else v
                             for k, v in value.items()}
        self._plan_key = None
        self._work.reset()
        self._skips.reset()

    def _expected_state(self, p: Tensor, group: dict[str, Any], owned_only: bool = True) -> dict[str, Tensor]:
        """The per-parameter state this optimizer creates for ``p``, as meta tensors (of the blocks this
        process owns; every block's counters)."""
        expected = {}
        for m in self._members(p, group):
            shape = tuple(m.data().shape) if m.fused else tuple(m.layout.block_shapes[m.block])
            if owned_only and m.owner not in (None, self._topology.rank):
                fresh = engine_entries("meta")
            else:
                fresh = fresh_block_state(self, shape, m.kind, group, state_dtype(p), "meta")
            expected.update({m.prefix + k: v for k, v in fresh.items()})
        return expected
