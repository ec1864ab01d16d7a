"""Shampoo, EShampoo and SOAP against the plain float64 references in ``references.py``.

Several steps, on 1-D, 2-D, 3-D and 4-D tensors and on a dim longer than the block size. Shapes for the
eigenbasis methods keep every factor's repeated eigenvalues out (each factor dim ≤ the product of the
others, or one null direction), since a degenerate eigenspace has no unique basis to compare.
"""

from __future__ import annotations

import pytest
import torch

import precond
from references import adamw, eshampoo, kl_soap, shampoo, soap, split_blocks

STEPS = 12


def gradients(shape, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def run_library(opt_factory, W0, grads):
    p = torch.nn.Parameter(W0.clone())
    opt = opt_factory([p])
    out = []
    for G in grads:
        p.grad = G.clone()
        opt.step()
        out.append(p.detach().clone())
    return out, opt


def run_blocked_reference(reference, W0, grads, block, **kw):
    """Apply a one-block reference to each block of ``W0`` independently."""
    W = [W0.clone() for _ in grads]
    for sl in split_blocks(tuple(W0.shape), block):
        traj = reference(W0[sl], [G[sl] for G in grads], **kw)
        for t, w in enumerate(traj):
            W[t][sl] = w
    return W


def assert_trajectories_close(ours, ref, tol):
    for t, (a, b) in enumerate(zip(ours, ref)):
        rel = float((a - b).norm() / b.norm())
        assert rel < tol, f"step {t + 1}: relative difference {rel:.3e} >= {tol}"


SHAMPOO_SHAPES = [(7,), (6, 4), (3, 4, 5), (2, 3, 2, 2)]


@pytest.mark.parametrize("shape", SHAMPOO_SHAPES)
@pytest.mark.parametrize("grafting", [None, "sgd", "adagrad", "rmsprop", "adam"])
def test_shampoo_matches_reference(shape, grafting):
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = gradients(shape)
    hp = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3, wd=0.01, freq=2, start=3)
    beta2 = 0.99 if grafting == "rmsprop" else 0.999
    ours, _ = run_library(lambda ps: precond.Shampoo(
        ps, lr=hp["lr"], betas=hp["betas"], epsilon=hp["eps"], weight_decay=hp["wd"], precondition_frequency=2,
        start_preconditioning_step=3, grafting=grafting, precondition_1d=True, merge_dims=False), W0, grads)
    ref = shampoo(W0, grads, grafting=grafting, graft_beta2=beta2, **hp)
    assert_trajectories_close(ours, ref, 1e-9)


def test_shampoo_blocks_a_dim_longer_than_max_preconditioner_dim():
    shape = (20, 6)  # 20 > 8: blocks of rows 0-7, 8-15, 16-19
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = gradients(shape)
    ours, opt = run_library(lambda ps: precond.Shampoo(
        ps, lr=0.05, betas=(0.9, 1.0), epsilon=1e-3, max_preconditioner_dim=8, grafting="adam"), W0, grads)
    ref = run_blocked_reference(shampoo, W0, grads, 8, lr=0.05, betas=(0.9, 1.0), eps=1e-3, wd=0.0,
                                grafting="adam")
    assert_trajectories_close(ours, ref, 1e-9)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert {key.split(".")[0] for key in state} == {"block0", "block1", "block2"}


@pytest.mark.parametrize("shape", SHAMPOO_SHAPES)
@pytest.mark.parametrize("grafting", [None, "adam"])
def test_kl_shampoo_matches_reference(shape, grafting):
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = gradients(shape)
    hp = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3, wd=0.01, freq=2, start=3)
    ours, _ = run_library(lambda ps: precond.KLShampoo(
        ps, lr=hp["lr"], betas=hp["betas"], epsilon=hp["eps"], weight_decay=hp["wd"], precondition_frequency=2,
        start_preconditioning_step=3, grafting=grafting, precondition_1d=True, merge_dims=False), W0, grads)
    ref = shampoo(W0, grads, grafting=grafting, kl=True, **hp)
    assert_trajectories_close(ours, ref, 1e-9)
    if len(shape) > 1:  # the statistic differs from Shampoo's once the roots are not the identity
        plain = shampoo(W0, grads, grafting=grafting, **hp)
        assert float((ref[-1] - plain[-1]).norm() / plain[-1].norm()) > 1e-3


def test_kl_shampoo_blocks_a_dim_longer_than_max_preconditioner_dim():
    shape = (20, 6)
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = gradients(shape)
    ours, _ = run_library(lambda ps: precond.KLShampoo(
        ps, lr=0.05, betas=(0.9, 1.0), epsilon=1e-3, max_preconditioner_dim=8, grafting="adam"), W0, grads)
    ref = run_blocked_reference(shampoo, W0, grads, 8, lr=0.05, betas=(0.9, 1.0), eps=1e-3, wd=0.0,
                                grafting="adam", kl=True)
    assert_trajectories_close(ours, ref, 1e-9)


def test_kl_shampoo_refuses_microbatch_bias_correction():
    with pytest.raises(ValueError, match="bias_correction"):
        precond.KLShampoo([torch.nn.Parameter(torch.ones(3, 3))], bias_correction="cross_fit")


def test_shampoo_l2_weight_decay_and_no_bias_correction():
    shape = (5, 3)
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = gradients(shape)
    ours, _ = run_library(lambda ps: precond.Shampoo(
        ps, lr=0.02, betas=(0.5, 0.9), epsilon=1e-3, weight_decay=0.1, use_decoupled_weight_decay=False,
        use_bias_correction=False, merge_dims=False), W0, grads)
    ref = shampoo(W0, grads, lr=0.02, betas=(0.5, 0.9), eps=1e-3, wd=0.1, decoupled=False, bias_correction=False)
    assert_trajectories_close(ours, ref, 1e-9)


def test_shampoo_inverse_exponent_override_and_newton_root():
    shape = (4, 6)
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = gradients(shape)
    ref = shampoo(W0, grads, lr=0.05, betas=(0.9, 0.999), eps=1e-2, wd=0.0, exponent=0.5)
    ours, _ = run_library(lambda ps: precond.Shampoo(
        ps, lr=0.05, betas=(0.9, 0.999), epsilon=1e-2, inverse_exponent_override=0.5, merge_dims=False),
        W0, grads)
    assert_trajectories_close(ours, ref, 1e-9)
    newton, _ = run_library(lambda ps: precond.Shampoo(
        ps, lr=0.05, betas=(0.9, 0.999), epsilon=1e-2, inverse_exponent_override={2: 0.5}, root_method="newton",
        merge_dims=False), W0, grads)
    assert_trajectories_close(newton, ref, 1e-5)  # Newton stops at a 1e-6 residual


# (shape, first refresh): factors of full rank by then, so that numpy's first basis is the library's up to signs
REFINED_ROOT_CASES = [((7,), 8), ((5, 6), 2), ((3, 4, 5), 2), ((2, 3, 2, 2), 2), ((20, 6), 2)]


@pytest.mark.parametrize("shape, start", REFINED_ROOT_CASES)
def test_shampoo_roots_from_a_refined_eigenbasis_match_the_reference(shape, start):
    """``root_method="refine"``: the reference takes numpy's eigenbasis at the first refresh and then
    refines the last one (by :func:`precond.linalg.refine_eigenbasis`, tested on its own); blocks of 8."""
    from precond.linalg import refine_eigenbasis
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = gradients(shape)
    kw = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-6, wd=0.01, freq=2, start=start, grafting="adam")
    ref = run_blocked_reference(shampoo, W0, grads, 8, **kw,
                                refine=lambda M, Q: refine_eigenbasis(M[None], Q[None])[0][0])
    ours, opt = run_library(lambda ps: precond.Shampoo(
        ps, lr=0.05, betas=(0.9, 0.999), epsilon=1e-6, weight_decay=0.01, precondition_frequency=2,
        start_preconditioning_step=start, grafting="adam", root_method="refine", max_preconditioner_dim=8,
        merge_dims=False, precondition_1d=True), W0, grads)
    assert_trajectories_close(ours, ref, 1e-9)
    # the roots are not eigh's after the first refresh: a refined basis lags the factor it refines
    exact = run_blocked_reference(shampoo, W0, grads, 8, **kw)
    assert float((ours[-1] - exact[-1]).norm() / exact[-1].norm()) > 1e-9
    refreshes = 1 + (STEPS - start) // 2
    stats = opt.preconditioner_stats()["factors"]
    assert stats and all(f["failures"] == 0 and f["refreshes"] == refreshes for f in stats)
    assert all(f["qr_iterations"] == refreshes - 1 for f in stats)  # every refresh but the first (eigh)


def test_shampoo_one_dimensional_parameters_default_to_the_diagonal_method():
    W0 = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = gradients((9,))
    ours, opt = run_library(lambda ps: precond.Shampoo(ps, lr=0.01, betas=(0.9, 0.999), weight_decay=0.1), W0, grads)
    ref = adamw(W0, grads, lr=0.01, betas=(0.9, 0.999), eps=1e-10, wd=0.1)
    assert_trajectories_close(ours, ref, 1e-12)
    assert opt.preconditioner_stats()["factors"] == []


ESHAMPOO_SHAPES = [(7,), (5, 6), (3, 4, 5), (2, 3, 2, 2)]


@pytest.mark.parametrize("shape", ESHAMPOO_SHAPES)
@pytest.mark.parametrize("grafting", [None, "adam"])
def test_eshampoo_matches_reference(shape, grafting):
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    grads = gradients(shape)
    ours, _ = run_library(lambda ps: precond.EShampoo(
        ps, lr=0.01, betas=(0.9, 0.95), epsilon=1e-8, weight_decay=0.01, precondition_frequency=3,
        grafting=grafting, merge_dims=False), W0, grads)
    ref = eshampoo(W0, grads, lr=0.01, betas=(0.9, 0.95), eps=1e-8, wd=0.01, freq=3, grafting=grafting)
    assert_trajectories_close(ours, ref, 1e-9)


def test_eshampoo_blocks_a_dim_longer_than_max_preconditioner_dim():
    shape = (16, 8)
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = gradients(shape)
    ours, _ = run_library(lambda ps: precond.EShampoo(
        ps, lr=0.01, betas=(0.9, 0.95), epsilon=1e-8, precondition_frequency=2, max_preconditioner_dim=8), W0, grads)
    ref = run_blocked_reference(eshampoo, W0, grads, 8, lr=0.01, betas=(0.9, 0.95), eps=1e-8, wd=0.0, freq=2)
    assert_trajectories_close(ours, ref, 1e-9)


SOAP_SHAPES = [(7,), (5, 6), (3, 4, 5), (2, 3, 2, 2)]


@pytest.mark.parametrize("shape", SOAP_SHAPES)
def test_soap_matches_reference(shape):
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = gradients(shape, steps=15)
    ours, _ = run_library(lambda ps: precond.SOAP(ps, lr=0.01, precondition_frequency=4), W0, grads)
    ref = soap(W0, grads, lr=0.01, betas=(0.95, 0.95), eps=1e-8, wd=0.01, freq=4)
    assert_trajectories_close(ours, ref, 1e-9)


def test_soap_options_match_reference():
    shape = (6, 5)
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = gradients(shape, steps=15)
    kw = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.0, precondition_frequency=3, shampoo_beta=0.8,
              normalize_grads=True, correct_bias=True)
    ours, _ = run_library(lambda ps: precond.SOAP(ps, **kw), W0, grads)
    ref = soap(W0, grads, lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=0.0, freq=3, shampoo_beta=0.8, normalize=True)
    assert_trajectories_close(ours, ref, 1e-9)


def test_soap_leaves_a_dim_longer_than_max_precond_dim_unpreconditioned():
    shape = (20, 6)  # dim 0 (20 > 8) gets no factor, dim 1 does
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    grads = gradients(shape, steps=15)
    ours, opt = run_library(lambda ps: precond.SOAP(ps, lr=0.01, precondition_frequency=4, max_precond_dim=8),
                            W0, grads)
    ref = soap(W0, grads, lr=0.01, betas=(0.95, 0.95), eps=1e-8, wd=0.01, freq=4, max_dim=8)
    assert_trajectories_close(ours, ref, 1e-9)
    assert [f["dim"] for f in opt.preconditioner_stats()["factors"]] == [6]


def test_soap_split_policy_blocks_long_dims():
    shape = (16, 8)
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    grads = gradients(shape, steps=15)
    ours, _ = run_library(lambda ps: precond.SOAP(ps, lr=0.01, precondition_frequency=4, max_precond_dim=8,
                                                  large_dim_policy="split"), W0, grads)
    ref = run_blocked_reference(soap, W0, grads, 8, lr=0.01, betas=(0.95, 0.95), eps=1e-8, wd=0.01, freq=4)
    assert_trajectories_close(ours, ref, 1e-9)


@pytest.mark.parametrize("shape", [(2,), (7,), (5, 6), (3, 4, 5), (2, 3, 2, 2)])
def test_kl_soap_matches_reference(shape):
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    grads = gradients(shape, steps=15)
    one_d = len(shape) == 1 and shape[0] == 2  # a 1-D factor of rank 1: unique bases only for n ≤ 2
    ours, opt = run_library(lambda ps: precond.KLSOAP(ps, lr=0.01, precondition_frequency=4,
                                                      precondition_1d=one_d), W0, grads)
    ref = kl_soap(W0, grads, lr=0.01, betas=(0.95, 0.95), eps=1e-8, wd=0.01, freq=4, precondition_1d=one_d)
    assert_trajectories_close(ours, ref, 1e-9)
    if len(shape) > 1:  # the KL statistic is not SOAP's (with SOAP's bias correction off, as KL-SOAP's)
        plain, _ = run_library(lambda ps: precond.SOAP(ps, lr=0.01, precondition_frequency=4, correct_bias=False),
                               W0, grads)
        assert float((plain[-1] - ref[-1]).norm() / ref[-1].norm()) > 1e-3
        # the first bases, then one refresh each 4 updates (14 updates): 4 per factor, none failed
        assert [(f["refreshes"], f["failures"]) for f in opt.preconditioner_stats()["factors"]] == [(4, 0)] * len(shape)


def test_kl_soap_options_and_clamp_match_reference():
    shape = (6, 5)
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    scale = torch.tensor([1.0, 1.0, 1.0, 1e-3, 1e-4], dtype=torch.float64)  # two directions' d_i → 0: 1/√d clamps
    grads = [g * scale for g in gradients(shape, steps=15)]
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=0.0, freq=3, shampoo_beta=0.5, normalize=True, init=0.5)
    for clamp in (3, None):  # 3: at max(10, min(n_i, 3)) = 10
        ours, opt = run_library(lambda ps: precond.KLSOAP(
            ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.0, precondition_frequency=3, shampoo_beta=0.5,
            normalize_grads=True, init_factor=0.5, max_clamp_value=clamp), W0, grads)
        assert_trajectories_close(ours, kl_soap(W0, grads, max_clamp=clamp, **hp), 1e-9)
        scales = opt.state[opt.param_groups[0]["params"][0]]["inv_sqrt_eigenvalues1"]
        assert (float(scales.max()) == 10.0) == (clamp is not None)
    clamped, free = kl_soap(W0, grads, max_clamp=3, **hp), kl_soap(W0, grads, max_clamp=None, **hp)
    assert float((clamped[-1] - free[-1]).norm() / free[-1].norm()) > 1e-6  # the clamp is exercised


def test_kl_soap_blocks_and_leaves_long_dims():
    for shape, kw in [((16, 8), dict(large_dim_policy="split")), ((20, 6), dict())]:
        W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
        grads = gradients(shape, steps=15)
        ours, _ = run_library(lambda ps: precond.KLSOAP(ps, lr=0.01, precondition_frequency=4, max_precond_dim=8,
                                                        **kw), W0, grads)
        hp = dict(lr=0.01, betas=(0.95, 0.95), eps=1e-8, wd=0.01, freq=4)
        ref = (run_blocked_reference(kl_soap, W0, grads, 8, **hp) if kw else kl_soap(W0, grads, max_dim=8, **hp))
        assert_trajectories_close(ours, ref, 1e-9)


def test_kl_soap_refuses_other_refreshes_and_bad_arguments():
    p = [torch.nn.Parameter(torch.ones(3, 3))]
    for kw, name in [(dict(refresh_method="eigh"), "refresh_method"), (dict(refresh_tolerance=0.1), "refresh_tolerance"),
                     (dict(init_factor=0.0), "init_factor"), (dict(max_clamp_value=-1.0), "max_clamp_value")]:
        with pytest.raises(ValueError, match=name):
            precond.KLSOAP(p, **kw)


@pytest.mark.parametrize("make", [
    lambda ps, **kw: precond.Shampoo(ps, grafting="adam", **kw),
    lambda ps, **kw: precond.EShampoo(ps, **kw),
    lambda ps, **kw: precond.SOAP(ps, merge_dims=True, **kw),
], ids=["Shampoo", "EShampoo", "SOAP"])
def test_memory_guard_keeps_vector_like_and_merged_state_small_and_says_so_once(make, caplog):
    wide = torch.nn.Parameter(torch.randn(1, 5000))
    square = torch.nn.Parameter(torch.randn(32, 32))
    opt = make([wide, square])
    with caplog.at_level("WARNING", logger="precond"):
        for _ in range(3):
            wide.grad, square.grad = torch.randn_like(wide), torch.randn_like(square)
            opt.step()
    messages = [r.getMessage() for r in caplog.records if "memory guard" in r.getMessage()]
    # one message for the model, with the count and each parameter's shape
    assert len(messages) == 1 and "of 2 parameter(s)" in messages[0]
    assert "(1, 5000)" in messages[0] and "(32, 32)" in messages[0]
    ratio = {id(p): sum(v.numel() for v in opt.state[p].values()) / p.numel() for p in (wide, square)}
    assert ratio[id(wide)] < 5 and ratio[id(square)] < 8   # without the guard: > 1024 (1024² factors)
    assert torch.isfinite(wide).all() and torch.isfinite(square).all()
    unguarded = make([torch.nn.Parameter(torch.randn(32, 32))], max_factor_ratio=float("inf"))
    p = unguarded.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    unguarded.step()
    assert sum(v.numel() for v in unguarded.state[p].values()) > 1024 * 1024


@pytest.mark.parametrize("cls", [precond.Shampoo, precond.EShampoo, precond.SOAP])
def test_invalid_max_factor_ratio_is_named(cls):
    with pytest.raises(ValueError, match="Invalid max_factor_ratio"):
        cls([torch.nn.Parameter(torch.randn(3, 3))], max_factor_ratio=0)
