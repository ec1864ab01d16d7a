"""``precond.explain(optimizer)``: which rule each parameter gets, how it is cut into blocks, and the
optimizer state it costs, so that a user can check the routing before training.

State sizes come from building each block's state on the ``meta`` device (no memory is allocated), so the
report is the same before and after the first step. They leave out the engine's two counters per block
(``step``, ``nonfinite``: 12 bytes).
"""

from __future__ import annotations

from torch import Tensor

from .engine import ADAM, BlockEngine
from .engine.plan import Member, engine_entries

__all__ = ["explain"]


def _rule(member: Member, factors: list[int]) -> str:
    if member.kind == ADAM:
        return "diagonal (fused AdamW)" if member.fused else "diagonal (Adam)"
    if member.kind == "matrix":
        return "orthogonalised (Newton–Schulz)"
    if member.kind in ("left", "right"):
        return f"one-sided root ({member.kind})"
    if factors:
        return "Kronecker " + " ⊗ ".join(f"{n}×{n}" for n in factors)
    return "diagonal"


def _method_state_bytes(optimizer: BlockEngine, param: Tensor, group: dict) -> int:
    """Bytes of the state the optimizer creates for ``param`` (every block's, as if one process held them
    all), built as meta tensors by the engine's own :meth:`_expected_state`; the counters left out."""
    counters = set(engine_entries("meta"))
    state = optimizer._expected_state(param, group, owned_only=False)
    return sum(v.numel() * v.element_size() for k, v in state.items() if k.rsplit(".", 1)[-1] not in counters)


def explain(optimizer: BlockEngine) -> str:
    """A table, one row per parameter: its group, name (from ``param_names`` when the group has them),
    shape, the rule its blocks follow (several rules when its blocks differ), block count, and optimizer
    state in bytes and as a multiple of the parameter's own bytes; a total line last."""
    if not isinstance(optimizer, BlockEngine):
        raise TypeError(f"explain() takes a precond optimizer, got {type(optimizer).__name__}")
    lines = ["| group | parameter | shape | rule | blocks | state bytes | × parameter |", "|---|---|---|---|---|---|---|"]
    total_state = total_params = 0
    for g, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
        for name, param in zip(names, group["params"]):
            members = optimizer._blocks_of(param, group)
            rules = []
            for m in members:
                shape = tuple(m.layout.block_shapes[m.block])
                kind = m.kind if isinstance(m.kind, tuple) else ()
                rule = _rule(m, [n for n, use in zip(shape, kind) if use])
                if rule not in rules:
                    rules.append(rule)
            state = _method_state_bytes(optimizer, param, group)
            own = param.numel() * param.element_size()
            ratio = f"{state / own:.2f}" if own else "—"
            lines.append(f"| {g} | {name} | {tuple(param.shape)} | {'; '.join(rules) or 'none (no elements)'} "
                         f"| {len(members)} | {state:,} | {ratio} |")
            total_state += state
            total_params += own
    ratio = f"{total_state / total_params:.2f}" if total_params else "—"
    lines.append(f"| all | | | | | {total_state:,} | {ratio} |")
    return "\n".join(lines)
