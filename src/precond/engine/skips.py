"""The count of skipped block steps, kept on the device and read on the host without waiting for it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .plan import Bucket

__all__ = ["CHECK_EVERY", "SkipCount"]

# On a GPU the count of skipped blocks is copied to the host (without waiting) every this many steps, so a
# warning comes at most about as many steps late; each copy is a transfer on the step's stream.
CHECK_EVERY = 8


class SkipCount:
    """Counts the blocks whose step was skipped (each bucket's ``"nonfinite"`` counters and one running
    total) and calls ``on_new`` when the host sees the total grow.

    On a GPU the total is copied to the host without waiting every :data:`CHECK_EVERY` steps; it is read once
    the copy has landed (at a later step), and only then does ``on_new`` look at the per-block counters.
    """

    def __init__(self, on_new: Callable[[], None]) -> None:
        self.on_new = on_new
        self.reset()

    def reset(self) -> None:
        self.seen = 0
        self.total: Tensor | None = None
        self.copy: tuple[Tensor, Any] | None = None  # a host copy of the total in flight, its event
        self.unchecked_steps = 0  # steps since that copy was made

    def prepare(self, device: torch.device) -> None:
        """Make the running total on ``device`` (eagerly, when a plan is built) and mark it as living at one
        address: a compiled step writes it in place, and CUDA graphs are captured only where every tensor a
        graph writes is static."""
        if self.total is None:
            self.total = torch.zeros((), dtype=torch.int64, device=device)
            torch._dynamo.mark_static_address(self.total)

    def note(self, buckets: list[Bucket], oks: list[Tensor]) -> None:
        """Count the blocks of each bucket that its mask ``ok`` refused."""
        if not buckets:
            return
        counters = [bucket.state["nonfinite"] for bucket in buckets]
        if len(oks) == 1:
            bad = ~oks[0]
            counters[0].add_(bad)
        else:  # one mask for all buckets: five operators a step, where a bucket at a time took three each
            bad = ~torch.cat(oks)
            torch._foreach_add_(counters, list(bad.split([len(ok) for ok in oks])))
        self.total.add_(bad.sum())  # made by prepare() when the plan was built
        if not torch.compiler.is_compiling():  # a compiled step only counts; the next eager call reads them
            self.check(wait=False)

    def check(self, wait: bool) -> None:
        """Read the total (``wait``: now; else a landed copy, or start one) and call ``on_new`` if it grew."""
        total = self.total
        if total is None:
            return
        if total.device.type == "cuda" and not wait:
            pending = self.copy
            if pending is not None and pending[1].query():
                seen = int(pending[0])
                self.copy = None
            else:
                seen = self.seen
                self.unchecked_steps += 1
                if pending is None and self.unchecked_steps >= CHECK_EVERY:
                    self.unchecked_steps = 0
                    host = torch.empty((), dtype=torch.int64, pin_memory=True)
                    host.copy_(total, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    self.copy = (host, event)
        else:
            seen = int(total)
        if seen > self.seen:
            self.seen = seen
            self.on_new()
