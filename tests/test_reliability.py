"""Reliability: a step never writes NaN/Inf into a parameter, degenerate statistics are survived, and bad
checkpoints fail cleanly; fault injection and property-based fuzzing over every public optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import precond
from precond.engine.core import UPDATE_BOUND
from precond.linalg import pseudo_inverse_roots

FACTORIES = {
    "Shampoo": lambda ps, **kw: precond.Shampoo(ps, **{"lr": 0.01, "max_preconditioner_dim": 4, **kw}),
    "Shampoo+pinv": lambda ps, **kw: precond.Shampoo(ps, **{"lr": 0.01, "max_preconditioner_dim": 4,
                                                            "pseudo_inverse": True, "epsilon": 0.0, **kw}),
    "KLShampoo": lambda ps, **kw: precond.KLShampoo(ps, **{"lr": 0.01, "max_preconditioner_dim": 4, **kw}),
    "EShampoo": lambda ps, **kw: precond.EShampoo(ps, **{"lr": 0.01, "max_preconditioner_dim": 4, **kw}),
    "SOAP": lambda ps, **kw: precond.SOAP(ps, **{"lr": 0.01, "precondition_frequency": 2, "max_precond_dim": 4,
                                                 "large_dim_policy": "split", **kw}),
    "KLSOAP": lambda ps, **kw: precond.KLSOAP(ps, **{"lr": 0.01, "precondition_frequency": 2, "max_precond_dim": 4,
                                                     "large_dim_policy": "split", **kw}),
    "Muon": lambda ps, **kw: precond.Muon(ps, **{"lr": 0.02, "adamw_lr": 0.01, **kw}),
    "ASGO": lambda ps, **kw: precond.ASGO(ps, **{"lr": 0.01, "adamw_lr": 0.01, **kw}),
    "Sophia": lambda ps, **kw: precond.Sophia(ps, **{"lr": 0.01, **kw}),
    "AdamW": lambda ps, **kw: precond.AdamW(ps, **{"lr": 0.01, **kw}),
}
NAMES = list(FACTORIES)


def grad_of(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the update guard
@pytest.mark.parametrize("name", NAMES)
def test_an_exploding_update_is_not_applied_counted_and_said_once(name, caplog):
    w, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6))  # b: AdamW's fused kernel
    opt = FACTORIES[name]([w, b])
    for group in opt.param_groups:
        group["lr"] = 1e9  # every step's RMS is ~1e9 × the weights'
    before = [w.detach().clone(), b.detach().clone()]
    with caplog.at_level("WARNING", logger="precond"):
        for seed in range(4):
            w.grad, b.grad = grad_of((6, 4), seed), grad_of((6,), seed)
            opt.step()
    assert torch.equal(w.detach(), before[0]) and torch.equal(b.detach(), before[1])
    assert opt.preconditioner_stats()["nonfinite_skipped_blocks"] >= 4
    assert len([r for r in caplog.records if "a step was skipped" in r.getMessage()]) <= 2  # once per parameter
    for group in opt.param_groups:  # an ordinary rate moves the weights again
        group["lr"] = 1e-3
    for seed in (8, 9):  # SOAP's first step only sets up its bases
        w.grad, b.grad = grad_of((6, 4), seed), grad_of((6,), seed)
        opt.step()
    assert not torch.equal(w.detach(), before[0]) and torch.isfinite(w).all()


def test_the_bound_is_relative_to_the_weights_and_one():
    w = torch.nn.Parameter(torch.full((4, 4), 100.0))
    opt = precond.Sophia([w], lr=0.5 * UPDATE_BOUND * 100.0, weight_decay=0.0)  # RMS of a step: lr (clipped ±1)
    w.grad = torch.ones(4, 4)
    opt.step()
    assert opt.preconditioner_stats()["nonfinite_skipped_blocks"] == 0  # within 1e4 × RMS(W) = 1e6


def test_the_soundness_test_per_block():
    """RMS(lr·s·P) ≤ B·max(RMS(W), 1), finite: each side of the bound, the weights' RMS against 1, non-finite
    updates and weights, and a tensor rate."""
    from precond.engine.core import _sound_update

    direction = torch.ones(6, 4, 4)  # RMS 1
    direction[3, 0, 0], direction[4, 0, 0] = float("nan"), float("inf")
    weights = torch.full((6, 4, 4), 0.5)
    weights[1], weights[5] = 3.0, float("nan")
    norms = torch.linalg.vector_norm(weights, dim=(1, 2))
    lr = 0.999 * UPDATE_BOUND  # block 0: RMS(W) 0.5 < 1, so the bound is B·1: just within
    sound = _sound_update(direction, norms, lr, 1.0)
    assert sound.tolist() == [True, True, True, False, False, False]
    assert not _sound_update(direction, norms, 1.001 * UPDATE_BOUND, 1.0)[0]  # just past B·1
    assert bool(_sound_update(direction, norms, 2.99 * UPDATE_BOUND, 1.0)[1])  # block 1: within B·RMS(W) = 3B
    assert not _sound_update(direction, norms, 3.01 * UPDATE_BOUND, 1.0)[1]
    huge = torch.full((1, 4, 4), float("inf"))  # infinite weights still bound a finite update
    assert bool(_sound_update(torch.ones(1, 4, 4), torch.linalg.vector_norm(huge, dim=(1, 2)), 1.0, 1.0)[0])
    tensor_lr = _sound_update(direction, norms, torch.tensor(lr), -1.0)  # the sign of the scale does not matter
    assert torch.equal(tensor_lr, sound)


@pytest.mark.parametrize("name", NAMES)
def test_strict_raises_naming_the_parameter_and_block(name):
    a, b = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(8, 4))
    opt = FACTORIES[name]([a, b], strict=True)
    a.grad, b.grad = grad_of((3, 3), 0), grad_of((8, 4), 1)
    b.grad[5, 1] = float("nan")
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(FloatingPointError, match=r"parameter 1 of group 0 \(shape \(8, 4\)\).*not finite"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])  # nothing moved
    for group in opt.param_groups:
        group["lr"] = 1e9
    with pytest.raises(FloatingPointError, match="update"):
        for seed in (2, 3):  # SOAP's first step only sets up its bases
            a.grad, b.grad = grad_of((3, 3), seed), grad_of((8, 4), seed)
            opt.step()


def test_strict_must_be_a_flag():
    with pytest.raises(ValueError, match="Invalid strict"):
        precond.SOAP([torch.nn.Parameter(torch.randn(2, 2))], strict="yes")


# ------------------------------------------------------------------------------ degenerate factors
def test_pseudo_inverse_roots_match_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    A = torch.stack([u @ u.T, torch.zeros(6, 6, dtype=torch.float64), torch.eye(6, dtype=torch.float64) * 3])
    roots, ok = pseudo_inverse_roots(A, 0.25)
    assert bool(ok.all())
    lam, q = torch.linalg.eigh(A[0])
    keep = lam > 6 * torch.finfo(torch.float64).eps * lam.max()
    want = q[:, keep] @ torch.diag(lam[keep] ** -0.25) @ q[:, keep].T
    torch.testing.assert_close(roots[0], want, rtol=1e-10, atol=1e-10)
    assert torch.equal(roots[1], torch.zeros(6, 6, dtype=torch.float64))  # an all-zero factor: a zero root
    torch.testing.assert_close(roots[2], torch.eye(6, dtype=torch.float64) * 3 ** -0.25)


def test_pseudo_inverse_converges_on_a_rank_one_least_squares_where_the_default_does_not():
    """The problem a new user tried: the gradient (Wx - y)xᵀ has rank 1, the right factor rank 1 forever."""
    gen = torch.Generator().manual_seed(0)
    w0, x, y = torch.randn(5, 10, generator=gen), torch.randn(10, generator=gen), torch.randn(5, generator=gen)
    final = {}
    for label, kw in (("default", {}), ("pseudo_inverse", dict(pseudo_inverse=True, epsilon=0.0))):
        for lr in (1e-3, 1e-2, 1e-1):
            w = w0.clone().requires_grad_(True)
            opt = precond.Shampoo([w], lr=lr, **kw)
            for _ in range(300):
                loss = (w @ x - y).square().sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                assert torch.isfinite(w).all()
            final[label, lr] = float(loss)
    assert final["pseudo_inverse", 1e-1] < 1e-3 * final["default", 1e-1]


def test_pseudo_inverse_arguments_are_checked():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(ValueError, match="Invalid epsilon"):
        precond.Shampoo(p, pseudo_inverse=True)  # the default epsilon 1e-12 is not 0
    with pytest.raises(ValueError, match="Invalid rank_rtol"):
        precond.Shampoo(p, pseudo_inverse=True, epsilon=0.0, rank_rtol=-1.0)
    with pytest.raises(ValueError, match="Invalid pseudo_inverse"):
        precond.Shampoo(p, pseudo_inverse=True, epsilon=0.0, root_method="newton")


def degenerate_gradients(shape):
    """Rank-1 for 200 steps, all-zero for 200, then scaled 1e-20 … 1e20 (10 steps each)."""
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(shape[0], 1, generator=gen), torch.randn(1, shape[1], generator=gen)
    for step in range(200):
        yield (u * (1 + 0.1 * math.sin(step))) @ v
    for _ in range(200):
        yield torch.zeros(shape)
    for exponent in range(-20, 21, 5):
        for _ in range(10):
            yield torch.randn(shape, generator=gen) * 10.0 ** exponent


@pytest.mark.parametrize("name", NAMES)
def test_degenerate_gradients_never_corrupt_the_weights_or_the_state(name):
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = FACTORIES[name]([w], lr=1e-3)
    for grad in degenerate_gradients((6, 4)):
        w.grad = grad
        opt.step()
        assert torch.isfinite(w).all()
    for key, value in opt.state[w].items():  # a 1e20 gradient's square (1e40) must not stay in a statistic
        if torch.is_floating_point(value):
            assert torch.isfinite(value).all(), key
    before = w.detach().clone()
    for seed in range(3):  # and ordinary gradients train on
        w.grad = grad_of((6, 4), seed)
        opt.step()
    assert not torch.equal(w.detach(), before) and torch.isfinite(w).all()


# ------------------------------------------------------------------------------ fault injection
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradients_at_random_steps_leave_those_blocks_alone(name):
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = FACTORIES[name]([w])
    gen = torch.Generator().manual_seed(1)
    injected = 0
    for step in range(30):
        w.grad = grad_of((8, 4), step)
        if torch.rand((), generator=gen) < 0.3:
            w.grad[int(torch.randint(8, (), generator=gen)), 0] = float("nan") if step % 2 else float("inf")
            injected += 1
        opt.step()
        assert torch.isfinite(w).all()
        assert all(torch.isfinite(v).all() for v in opt.state[w].values() if torch.is_floating_point(v))
    assert injected > 0 and opt.preconditioner_stats()["nonfinite_skipped_blocks"] >= injected


@pytest.mark.parametrize("name", NAMES)
def test_a_partial_state_dict_raises_and_leaves_the_optimizer_as_it_was(name):
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))

    def stepped(seeds):
        opt = FACTORIES[name](net.parameters())
        for seed in seeds:
            for p in net.parameters():
                p.grad = grad_of(p.shape, seed)
            opt.step()
        return opt

    broken = copy.deepcopy(stepped(range(3)).state_dict())
    last = max(broken["state"])
    dropped = sorted(k for k in broken["state"][last] if torch.is_floating_point(broken["state"][last][k]))[-1]
    del broken["state"][last][dropped]  # one tensor of the last parameter's state is missing
    fresh = stepped([7, 8])
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="missing|key|state"):
        fresh.load_state_dict(broken)
    after = fresh.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert set(after["state"]) == set(before["state"])
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value), (index, key)


@pytest.mark.parametrize("name", NAMES)
def test_resume_with_frozen_parameters_and_parameters_that_had_no_gradient(name):
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), torch.nn.Linear(3, 2))
    net[0].requires_grad_(False)  # frozen throughout
    opt = FACTORIES[name](net.parameters())
    x = torch.randn(8, 4)
    for _ in range(3):  # the last layer gets no gradient before the checkpoint
        opt.zero_grad()
        net[:2](x).square().mean().backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    resumed = FACTORIES[name](net.parameters())
    resumed.load_state_dict(saved)
    for _ in range(3):  # now every trainable layer has one
        resumed.zero_grad()
        net(x).square().mean().backward()
        resumed.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert len(resumed.state_dict()["state"]) >= 4


# ------------------------------------------------------------------------------ property-based fuzzing
def shapes():
    dims = st.one_of(st.integers(1, 6), st.sampled_from([0, 1, 9]))  # 9 is past every factory's block size
    return st.lists(dims, min_size=0, max_size=5).map(tuple)


def run(name, params, grads, kw, steps, groups=lambda ps: ps):
    """``steps`` steps; odd ones through a closure that sets the gradients (its return value is checked)."""
    opt = FACTORIES[name](groups(params), **kw)
    for step in range(steps):
        def closure(step=step):
            for p, g in zip(params, grads[step]):
                p.grad = g.clone()
            return float(step)
        if step % 2:
            assert opt.step(closure) == float(step)
        else:
            closure()
            opt.step()
    return opt


@pytest.mark.parametrize("name", NAMES)
@given(shape_list=st.lists(shapes(), min_size=1, max_size=3),
       dtype=st.sampled_from(["float32", "float64", "bfloat16", "float16"]), lr=st.floats(1e-4, 0.1), weight_decay=st.floats(0.0, 0.2), seed=st.integers(0, 1000))
def test_fuzzed_shapes_dtypes_and_rates_stay_finite_deterministic_and_resumable(name, shape_list, dtype, lr,
                                                                                weight_decay, seed):
    dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    inits = [torch.randn(s, generator=gen).to(dtype) for s in shape_list]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shape_list] for _ in range(4)]
    kw = dict(lr=lr, weight_decay=weight_decay)
    if name in ("Muon", "ASGO"):
        kw = dict(lr=lr, adamw_lr=lr, weight_decay=weight_decay)

    def fresh():
        return [torch.nn.Parameter(x.clone()) for x in inits]

    def groups(params):  # the first parameter in a group of its own, at a tenth of the rate
        return [{"params": params[:1], "lr": lr / 10}, {"params": params[1:]}] if len(params) > 1 else params

    straight = fresh()
    run(name, straight, grads, kw, 4, groups)
    assert all(torch.isfinite(p).all() for p in straight)
    again = fresh()
    run(name, again, grads, kw, 4, groups)
    assert all(torch.equal(a, b) for a, b in zip(straight, again))  # deterministic
    first = fresh()
    opt = run(name, first, grads, kw, 2, groups)
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = FACTORIES[name](groups(resumed_params), **kw)
    resumed.load_state_dict(saved)
    for step in (2, 3):
        for p, g in zip(resumed_params, grads[step]):
            p.grad = g.clone()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed_params))  # bit-identical continuation


INVALID_VALUES = {"lr": [-1.0, float("nan"), float("inf")], "weight_decay": [-0.5, float("inf"), float("nan")]}


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8)
@given(argument=st.sampled_from(sorted(INVALID_VALUES)), data=st.data())
def test_fuzzed_invalid_hyper_parameters_raise_naming_the_argument(name, argument, data):
    value = data.draw(st.sampled_from(INVALID_VALUES[argument]))
    with pytest.raises(ValueError, match=f"Invalid {argument}"):
        FACTORIES[name]([torch.nn.Parameter(torch.randn(3, 3))], **{argument: value})


@pytest.mark.parametrize("name", NAMES)
def test_a_one_by_hundred_thousand_matrix(name):
    w = torch.nn.Parameter(torch.zeros(1, 100_000))
    opt = FACTORIES[name]([w])
    for seed in range(2):
        w.grad = grad_of((1, 100_000), seed)
        opt.step()
    assert torch.isfinite(w).all() and w.abs().max() > 0


def test_the_soak_quick_profile_passes():
    """benchmarks/soak.py's quick profile: faults every ~100 steps, no state growth, warnings once per parameter."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    assert soak.main(["--steps", "300", "--nan-every", "97", "--spike-every", "199"]) == 0
