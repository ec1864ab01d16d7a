"""Refreshes run over chunks of a bucket's factor stack (``kronecker.REFRESH_CHUNK_BYTES``), so that their
temporaries do not grow with the bucket. With one matrix a chunk every result equals the whole-stack refresh's
to rounding: batched matmul and eigh round differently by batch size (2e-15 in float64 here). Where a refresh
stops on a threshold, the difference is the threshold's: Newton's roots iterate until every matrix of the batch
has converged (to 1e-6), and the drift criterion decides per matrix which to recompute."""

from __future__ import annotations

import pytest
import torch

import precond
import precond.kronecker as kronecker
from precond.kronecker import matrix_chunks
from test_bias_correction import microbatch_grads, train

# three (12, 9) and two (4, 5, 6) parameters share buckets; (40, 6) is cut into blocks of one bucket
SHAPES = [(12, 9)] * 3 + [(4, 5, 6)] * 2 + [(7,), (40, 6)]
CASES = {
    "SOAP": dict(cls=precond.SOAP, precondition_frequency=2, max_precond_dim=16, precondition_1d=True),
    "SOAP eigh, criterion": dict(cls=precond.SOAP, refresh_method="eigh", refresh_tolerance=0.05,
                                 precondition_frequency=2, max_precond_dim=16),
    "SOAP refine, every step": dict(cls=precond.SOAP, refresh_method="refine", precondition_frequency=1),
    "SOAP packed, bf16 bases": dict(cls=precond.SOAP, packed_factors=True, preconditioner_dtype=torch.bfloat16,
                                    precondition_frequency=2),
    "KLSOAP": dict(cls=precond.KLSOAP, precondition_frequency=2),
    "EShampoo": dict(cls=precond.EShampoo, precondition_frequency=2, max_preconditioner_dim=16),
    "EShampoo qr, criterion": dict(cls=precond.EShampoo, refresh_method="qr", refresh_tolerance=0.05,
                                   precondition_frequency=2),
    "Shampoo": dict(cls=precond.Shampoo, grafting="adam", precondition_frequency=2, max_preconditioner_dim=16),
    "Shampoo newton, packed": dict(cls=precond.Shampoo, root_method="newton", packed_factors=True, epsilon=1e-4),
    "Shampoo refine, packed, blocked": dict(cls=precond.Shampoo, root_method="refine", packed_factors=True,
                                            precondition_frequency=2, max_preconditioner_dim=16, epsilon=1e-4),
    "KLShampoo": dict(cls=precond.KLShampoo, grafting="adam", precondition_frequency=2),
}


# the cases that stop on a threshold (see the module's docstring) and how far they may then part, relatively
THRESHOLDED = {"EShampoo qr, criterion": 1e-4, "Shampoo newton, packed": 1e-5}


def run(case: dict) -> list[torch.Tensor]:
    """Parameters and every state tensor after 9 steps in float64."""
    options = dict(case)
    cls = options.pop("cls")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    opt = cls(params, lr=1e-2, **options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(9):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    state = [v for _, s in sorted(opt.state_dict()["state"].items()) for _, v in sorted(s.items())
             if torch.is_tensor(v)]
    return [p.detach() for p in params] + state


@pytest.mark.filterwarnings("ignore:.*memory guard")
@pytest.mark.parametrize("name", list(CASES))
def test_one_matrix_a_chunk_equals_the_whole_stack_to_rounding(name, monkeypatch):
    whole = run(CASES[name])
    monkeypatch.setattr(kronecker, "REFRESH_CHUNK_BYTES", 1)
    chunked = run(CASES[name])
    assert len(whole) == len(chunked)
    for a, b in zip(whole, chunked):
        assert a.dtype == b.dtype
        if a.dtype.is_floating_point:
            a, b = a.double(), b.double()
            assert (a - b).norm() <= THRESHOLDED.get(name, 1e-12) * a.norm()
        else:  # the refresh counters
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["variance_corrected", "full"])
def test_variance_corrected_roots_are_chunked_with_their_microbatch_statistics(mode, monkeypatch):
    """Shampoo's variance-corrected inversion reads each block's microbatch gradients: a chunk reads its own
    (a chunk given another's would part by far more than rounding)."""
    def make(params):
        return precond.Shampoo(params, lr=0.05, betas=(0.9, 0.95), epsilon=1e-3, precondition_frequency=1,
                               max_preconditioner_dim=8, merge_dims=False, bias_correction=mode)

    w0 = torch.randn(24, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # 3 blocks of 8 × 6
    steps = microbatch_grads((24, 6), steps=5, n=4)
    whole, _ = train(make, w0, steps)
    monkeypatch.setattr(kronecker, "REFRESH_CHUNK_BYTES", 1)
    chunked, _ = train(make, w0, steps)
    assert (whole - chunked).norm() <= 1e-12 * whole.norm()


def test_chunks_hold_at_most_the_budget_and_at_least_one_matrix():
    f32 = torch.float32
    assert matrix_chunks(24, 3072, f32) == [slice(i, i + 1) for i in range(24)]  # 36 MiB each: one a chunk
    assert matrix_chunks(24, 2048, f32) == [slice(i, i + 2) for i in range(0, 24, 2)]  # 16 MiB: two
    assert matrix_chunks(24, 768, f32) == [slice(0, 14), slice(14, 24)]  # 2.25 MiB: 14 in 31.5 MiB
    assert matrix_chunks(5, 768, torch.float64) == [slice(0, 5)]
    assert matrix_chunks(0, 768, f32) == []
