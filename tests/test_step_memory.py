"""A step's temporaries do not grow with the number of buckets: where nothing is exchanged between processes,
each bucket's gradients are stacked when its turn comes and its direction is applied at once, so one bucket's
stack, direction and temporaries are alive at a time. Measured with torch's ``MemTracker`` on the CPU (bytes
held, not time)."""

from __future__ import annotations

import pytest
import torch

import precond

MemTracker = pytest.importorskip("torch.distributed._tools.mem_tracker").MemTracker
CPU = torch.device("cpu")


def step_transient(cls, buckets: int, **options) -> int:
    """The most bytes a step (past its first refresh) held beyond what existed when it began, for ``buckets``
    param groups of one ``SHAPE`` matrix each (a bucket each)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(SHAPE)) for _ in range(buckets)]
    opt = cls([{"params": [p]} for p in params], lr=1e-3, **options)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    tracker = MemTracker()
    tracker.track_external(*params, opt)
    with tracker:
        for p in params:  # made under the tracker, the gradients count in the step's starting bytes
            p.grad = torch.randn_like(p)
        start = tracker.get_tracker_snapshot("current")[CPU]["Total"]
        opt.step()
        return tracker.get_tracker_snapshot("peak")[CPU]["Total"] - start


SHAPE = (96, 128)
MATRIX = 4 * 96 * 128  # bytes of one gradient
CASES = {
    "SOAP": (precond.SOAP, dict(precondition_frequency=100)),
    "SOAP packed": (precond.SOAP, dict(precondition_frequency=100, packed_factors=True)),
    "EShampoo": (precond.EShampoo, dict(precondition_frequency=100)),
    "Shampoo": (precond.Shampoo, dict(precondition_frequency=100, grafting="adam")),
    "Muon": (precond.Muon, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_steps_temporaries_do_not_grow_with_the_number_of_buckets(name):
    cls, options = CASES[name]
    one, eight = step_transient(cls, 1, **options), step_transient(cls, 8, **options)
    assert one >= MATRIX  # the tracker sees the step's work at all
    # held at once before: every bucket's gradient stack and direction, 16 matrices for eight buckets
    assert eight <= one + 2 * MATRIX, (one / MATRIX, eight / MATRIX)


def test_strict_mode_vets_every_gradient_first_and_still_applies_each_direction_at_once():
    cls, options = CASES["SOAP"]
    lazy, strict = step_transient(cls, 8, **options), step_transient(cls, 8, strict=True, **options)
    assert strict - lazy >= 6 * MATRIX  # every stack gathered before the first update
    assert strict <= lazy + 8 * MATRIX  # but no bucket's direction outlives its turn
