"""What the engine tells people: the guard's warnings and errors, and the per-factor counters.

:class:`EngineReports` is a part of :class:`~precond.engine.core.BlockEngine` (a base class of it): naming a
parameter, warning once per parameter about skipped steps and about layouts the memory guard changed, raising
under ``strict=True``, and :meth:`~EngineReports.preconditioner_stats`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from torch import Tensor

from ..blocks import BlockLayout
from .batched import UPDATE_BOUND
from .plan import Bucket
from .saved_state import STATS_KEY

__all__ = ["EngineReports", "STATS_FIELDS"]

logger = logging.getLogger("precond")

# The one layout of a factor's counters (``stats{i}``, int64): its dim, then how often its root or basis was
# recomputed, kept by the adaptive criterion, QR-iterated, failed (kept the last good one), and fell back from
# CholeskyQR to Householder QR. precond.kronecker allocates them, precond.refresh counts, this module reports.
STATS_FIELDS = ("dim", "refreshes", "skipped", "qr_iterations", "failures", "fallbacks", "cholesky_failures")


class EngineReports:
    """The engine's warnings, ``strict`` errors and counters (see the module docstring)."""

    # What the warning about skipped steps advises (Shampoo adds its own remedies).
    _skip_advice = "lower lr"

    def _raise_if_any(self, bucket: Bucket, bad: Tensor, what: str) -> None:
        """``strict=True``: raise naming the first parameter and block of ``bad`` (reads ``bad`` on the host)."""
        if not bool(bad.any()):
            return
        member = bucket.members[int(bad.nonzero()[0, 0])]  # masks follow the members (exchanged buckets too)
        where = f"{self._name_of(member.param)} (shape {tuple(member.param.shape)}), block {member.block}"
        raise FloatingPointError(f"{type(self).__name__} (strict=True): {where}: {what}; nothing was updated "
                                 f"for it: {self._skip_advice}")

    def _note_guard(self, param: Tensor, layout: BlockLayout, precondition_1d: bool) -> BlockLayout:
        """Notes once per parameter what the memory guard changed in its layout; :meth:`_say_guard_notes` says
        it, once for all the parameters a plan noted."""
        if id(param) not in self._guard_noted:
            self._guard_noted.add(id(param))
            note = layout.guard_note(precondition_1d)
            if note is not None:
                self._guard_pending.append((self._name_of(param), tuple(param.shape), note, layout.max_factor_ratio))
        return layout

    def _say_guard_notes(self) -> None:
        if not self._guard_pending:
            return
        notes, self._guard_pending = self._guard_pending, []
        examples = "; ".join(f"{name} {shape}: {note}" for name, shape, note, _ in notes[:3])
        more = f"; and {len(notes) - 3} more" if len(notes) > 3 else ""
        logger.warning("%s: the memory guard max_factor_ratio=%g changed the layout of %d parameter(s) (%s%s). It "
                       "keeps each Kronecker factor within that many times its block's elements; Distributed Shampoo "
                       "has none (max_factor_ratio=float('inf') for its layout)",
                       type(self).__name__, notes[0][3], len(notes), examples, more)

    def _name_of(self, param: Tensor) -> str:
        """``param``'s name in its group's ``param_names``, else ``"parameter {i} of group {g}"``."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p is param:
                    names = group.get("param_names")
                    return repr(names[pi]) if names else f"parameter {pi} of group {gi}"
        return "a parameter"

    def _warn_new_nonfinite(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._warned:
                    continue
                count = sum(int(v) for k, v in self.state.get(p, {}).items() if k.endswith("nonfinite"))
                if count:
                    self._warned.add(id(p))
                    logger.warning("%s: %s (shape %s): a step was skipped for some of its blocks, whose gradient "
                                   "or update was not finite (or the update's RMS passed %g× the weights'); their "
                                   "weights were left as they were. If it repeats, %s. Said once per parameter; "
                                   "preconditioner_stats() counts every skip (strict=True raises instead)",
                                   type(self).__name__, self._name_of(p), tuple(p.shape), UPDATE_BOUND,
                                   self._skip_advice)

    # -------------------------------------------------------------------------- statistics
    def time_communication(self, enabled: bool = True) -> None:
        """Start (or stop) counting the time of this optimizer's collectives in :attr:`communication_seconds`.

        Each collective is then bracketed by device syncs, which costs a little: a diagnostic, off by default.
        """
        self._topology.timed = enabled
        self._topology.comm_seconds = 0.0

    @property
    def communication_seconds(self) -> float:
        """Seconds spent in this optimizer's collectives (exchanging directions, gathering whole matrices)
        since :meth:`time_communication` was called."""
        return self._topology.comm_seconds

    def preconditioner_stats(self) -> dict[str, Any]:
        """Per-factor counters and guard counts, for people to read and benchmarks to report.

        Returns ``{"factors": [...], "nonfinite_skipped_blocks": int}`` (block steps skipped for a non-finite
        gradient, or an update that was not finite or passed :data:`UPDATE_BOUND`); each factor record holds
        ``group, param, block, factor, dim`` and the counters ``refreshes`` (recomputed), ``skipped``
        (kept by the adaptive criterion), ``qr_iterations``, ``failures`` (kept the last good result) and
        ``fallbacks`` (power-QR refreshes whose CholeskyQR failed, in float64 too where that is tried, and
        took Householder QR) and ``cholesky_failures`` (power-QR refreshes whose first CholeskyQR, in the
        factor's precision, failed: a factor with many goes straight to the retry, see
        :func:`~precond.refresh.counted_power_qr_`).
        Reading them waits for the device.
        """
        factors: list[dict[str, Any]] = []
        skipped = 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                for key, value in sorted(state.items(), key=lambda kv: _natural(kv[0])):
                    if key.endswith("nonfinite"):
                        skipped += int(value)
                    match = STATS_KEY.match(key)
                    if match:
                        block, factor = int(match.group(1) or 0), int(match.group(2))
                        record = dict(zip(STATS_FIELDS, (int(v) for v in value.tolist())))
                        factors.append({"group": gi, "param": pi, "block": block, "factor": factor, **record})
        self._skips.check(wait=True)
        return {"factors": factors, "nonfinite_skipped_blocks": skipped}


def _natural(key: str) -> list[Any]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]
