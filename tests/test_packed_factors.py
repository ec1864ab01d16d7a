"""``packed_factors=True``: Kronecker factors (and Shampoo's inverse roots) kept as their upper triangles.

Packing is exact for a symmetric matrix, so a packed run equals, bit for bit, an unpacked run whose factors and
roots are made exactly symmetric when computed; against the unpacked default it differs only by the rounding that
leaves ``G Gᵀ`` a hair asymmetric. It also matches the float64 references, holds ``n(n+1)/2`` numbers a
factor, and resumes from a checkpoint bit-identically.
"""

from __future__ import annotations

import pytest
import torch

import precond
import precond.kronecker as kronecker
from precond.preconditioners import InverseRoots
from references import eshampoo, kl_soap, shampoo, soap
from test_checkpoint import dcp_pair, torch_load, torch_save, trajectory_after_resume
from test_kronecker_rules import assert_trajectories_close, gradients, run_library

SHAPES = [(7,), (12, 9), (40, 6), (4, 5, 6)]
MAKERS = {
    "SOAP": lambda ps, **kw: precond.SOAP(ps, precondition_frequency=2, max_precond_dim=16, **kw),
    "KLSOAP": lambda ps, **kw: precond.KLSOAP(ps, precondition_frequency=2, **kw),
    "EShampoo": lambda ps, **kw: precond.EShampoo(ps, precondition_frequency=2, max_preconditioner_dim=16, **kw),
    "Shampoo": lambda ps, **kw: precond.Shampoo(ps, precondition_frequency=2, grafting="adam",
                                                max_preconditioner_dim=16, **kw),
    "KLShampoo": lambda ps, **kw: precond.KLShampoo(ps, precondition_frequency=2, grafting="adam", **kw),
    "Shampoo, no grafting": lambda ps, **kw: precond.Shampoo(ps, precondition_frequency=2, **kw),
}


def run(make, packed, dtype=torch.float64):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]
    opt = make(params, packed_factors=packed)
    g = torch.Generator().manual_seed(1)
    for _ in range(9):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        opt.step()
    return [p.detach() for p in params], opt


@pytest.mark.filterwarnings("ignore:.*memory guard")
@pytest.mark.parametrize("name", list(MAKERS))
def test_packed_equals_unpacked_with_symmetric_factors_bit_for_bit(name, monkeypatch):
    packed, opt = run(MAKERS[name], True)
    plain = kronecker._update_factor_

    def symmetric(factor, *args):
        plain(factor, *args)
        factor.copy_(kronecker.full_factor(kronecker.pack(factor)))  # the upper triangle, mirrored

    def symmetric_root(self, *args):
        root, good = plain_root(self, *args)
        return kronecker.full_factor(kronecker.pack(root)), good

    plain_root = InverseRoots._root
    monkeypatch.setattr(kronecker, "_update_factor_", symmetric)
    monkeypatch.setattr(InverseRoots, "_root", symmetric_root)
    unpacked, reference_opt = run(MAKERS[name], False)
    for a, b in zip(packed, unpacked):
        assert torch.equal(a, b)
    # and the state holds n(n+1)/2 numbers a factor (and root) where the unpacked one holds n²
    for p, q in zip(opt.param_groups[0]["params"], reference_opt.param_groups[0]["params"]):
        for key, value in reference_opt.state[q].items():
            if key.split(".")[-1].startswith(("factor", "root")):
                n = value.shape[-1]
                assert opt.state[p][key].shape == (n * (n + 1) // 2,)


def test_pack_round_trip_and_full_factor_of_an_unpacked_stack():
    A = torch.randn(3, 5, 5, dtype=torch.float64)
    A = A + A.mT
    assert torch.equal(kronecker.full_factor(kronecker.pack(A)), A)
    assert kronecker.full_factor(A) is A


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 5)])
def test_packed_factors_match_the_float64_references(shape):
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = gradients(shape, steps=15)
    ours, _ = run_library(lambda ps: precond.SOAP(ps, lr=0.01, precondition_frequency=4, packed_factors=True),
                          W0, grads)
    assert_trajectories_close(ours, soap(W0, grads, lr=0.01, betas=(0.95, 0.95), eps=1e-8, wd=0.01, freq=4), 1e-9)
    ours, _ = run_library(lambda ps: precond.KLSOAP(ps, lr=0.01, precondition_frequency=4, packed_factors=True),
                          W0, grads)
    assert_trajectories_close(ours, kl_soap(W0, grads, lr=0.01, betas=(0.95, 0.95), eps=1e-8, wd=0.01, freq=4),
                              1e-9)
    ours, _ = run_library(lambda ps: precond.EShampoo(
        ps, lr=0.01, betas=(0.9, 0.95), epsilon=1e-8, weight_decay=0.01, precondition_frequency=3,
        merge_dims=False, packed_factors=True), W0, grads)
    assert_trajectories_close(ours, eshampoo(W0, grads, lr=0.01, betas=(0.9, 0.95), eps=1e-8, wd=0.01, freq=3),
                              1e-9)
    ours, _ = run_library(lambda ps: precond.Shampoo(
        ps, lr=0.05, betas=(0.9, 0.99), epsilon=1e-3, weight_decay=0.01, precondition_frequency=2,
        start_preconditioning_step=3, grafting="adam", merge_dims=False, packed_factors=True), W0, grads)
    assert_trajectories_close(ours, shampoo(W0, grads, lr=0.05, betas=(0.9, 0.99), eps=1e-3, wd=0.01, freq=2,
                                            start=3, grafting="adam"), 1e-9)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("how", ["torch.save", "dcp"])
@pytest.mark.parametrize("name", ["SOAP", "Shampoo"])
def test_packed_state_resumes_bit_identically(name, how, tmp_path):
    make = {"SOAP": lambda ps: precond.SOAP(ps, lr=0.01, precondition_frequency=2, packed_factors=True),
            "Shampoo": lambda ps: precond.Shampoo(ps, lr=0.01, grafting="adam", packed_factors=True)}[name]
    save, load = (torch_save, torch_load) if how == "torch.save" else dcp_pair(tmp_path, flatten=False)
    for a, b in zip(*trajectory_after_resume(make, save, load)):
        assert torch.equal(a, b)


def test_packed_factors_is_checked():
    with pytest.raises(ValueError, match="packed_factors"):
        precond.SOAP([torch.nn.Parameter(torch.ones(3, 3))], packed_factors="yes")
