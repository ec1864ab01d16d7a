"""Bias-corrected AdamW (precond.bias_correction) against a float64 reference written from the formulas."""

from __future__ import annotations

import pytest
import torch

import precond

BETAS, EPS, LR, WD = (0.9, 0.95), 1e-8, 0.05, 0.1


def microbatch_grads(shape, steps, n, seed=0, spread=1.0):
    """``steps`` lists of ``n`` per-microbatch gradients (on the step's scale): a shared mean plus noise."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        mean = torch.randn(shape, generator=gen, dtype=torch.float64)
        out.append([mean + spread * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)])
    return out


def reference(mode, w, steps, fraction=0.5):
    """The update of Nayak et al. for AdamW, plainly: returns the weights and how many entries were clamped."""
    w, m, v, clamped = w.clone(), torch.zeros_like(w), torch.zeros_like(w), 0
    beta1, beta2 = BETAS
    cross, corrected = mode in ("cross_fit", "full"), mode in ("variance_corrected", "full")
    for t, grads in enumerate(steps, start=1):
        n = len(grads)
        n_a = max(1, int(fraction * n)) if cross else 0
        full = torch.stack(grads).mean(0)
        numerator = torch.stack(grads[:n_a]).mean(0) if cross else full
        square = torch.stack([g * g for g in grads[n_a:]]).mean(0) if cross else full * full
        variance = None
        if corrected:
            p = torch.stack([((beta2 * v + (1 - beta2) * g * g) / (1 - beta2 ** t)).sqrt() for g in grads[n_a:]])
            variance = p.var(0, unbiased=True) / p.shape[0]
        w = w * (1 - LR * WD)
        m = beta1 * m + (1 - beta1) * numerator
        v = beta2 * v + (1 - beta2) * square
        d = (v / (1 - beta2 ** t)).sqrt() + EPS
        inverse = 1 / d
        if variance is not None:
            inverse = inverse - variance / d ** 3
            clamped += int((inverse < 0).sum())
            inverse = inverse.clamp(min=0)
        w = w - LR * (m / (1 - beta1 ** t)) * inverse
    return w, clamped


def train(opt_factory, w0, steps, accumulate=True, resume_from=None):
    """Runs ``steps`` of microbatches through an accumulation loop; ``resume_from``: a state_dict to load."""
    w = w0.clone().requires_grad_(True)
    opt = opt_factory([w])
    if resume_from is not None:
        opt.load_state_dict(resume_from)
    for grads in steps:
        n = len(grads)
        for g in grads:  # what backward of loss_j / n adds to .grad
            w.grad = g / n if w.grad is None else w.grad + g / n
            if accumulate:
                opt.accumulate(n)
        opt.step()
        opt.zero_grad()
    return w.detach(), opt


def make(mode, **kw):
    return lambda params: precond.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, bias_correction=mode,
                                        **kw)


@pytest.mark.parametrize("mode", ["cross_fit", "variance_corrected", "full"])
@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 5), (2, 3, 2, 2)])
@pytest.mark.parametrize("n", [4, 5])
def test_each_mode_matches_the_float64_reference(mode, shape, n):
    steps = microbatch_grads(shape, 5, n)
    w0 = torch.randn(shape, dtype=torch.float64)
    got, _ = train(make(mode), w0, steps)
    want, _ = reference(mode, w0, steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain, _ = reference("std", w0, steps)
    assert (want - plain).abs().max() > 1e-3  # the correction changes the step: the comparison has teeth


def loo_reference(jensen, w, steps):
    """The leave-one-out step (LOO, LOO+Jensen), fold by fold, from the formulas."""
    w, m, v = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
    beta1, beta2 = BETAS
    for t, grads in enumerate(steps, start=1):
        mean = torch.stack(grads).mean(0)
        steps_r, cubes_r, denominators = [], [], []
        for r, g_r in enumerate(grads):
            others = torch.stack([g for j, g in enumerate(grads) if j != r]).mean(0)
            d = ((beta2 * v + (1 - beta2) * others ** 2) / (1 - beta2 ** t)).clamp(min=0).sqrt() + EPS
            m_hat = (beta1 * m + (1 - beta1) * g_r) / (1 - beta1 ** t)
            steps_r.append(m_hat / d)
            cubes_r.append(m_hat / d ** 3)
            denominators.append(d)
        u = torch.stack(steps_r).mean(0)
        if jensen:
            corrected = u - torch.stack(denominators).var(0, unbiased=True) * torch.stack(cubes_r).mean(0)
            u = torch.where(corrected * u >= 0, corrected, torch.zeros_like(u))
        w = w * (1 - LR * WD) - LR * u
        m = beta1 * m + (1 - beta1) * mean
        v = beta2 * v + (1 - beta2) * mean ** 2
    return w


@pytest.mark.parametrize("mode", ["loo", "loo_jensen"])
@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 5), (2, 3, 2, 2)])
@pytest.mark.parametrize("n", [2, 5])
def test_leave_one_out_matches_the_float64_reference(mode, shape, n):
    steps = microbatch_grads(shape, 5, n, spread=3.0)
    w0 = torch.randn(shape, dtype=torch.float64)
    got, opt = train(make(mode), w0, steps)
    want = loo_reference(mode == "loo_jensen", w0, steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    plain, _ = reference("std", w0, steps)
    assert (want - plain).abs().max() > 1e-3  # the estimator changes the step: the comparison has teeth
    if mode == "loo_jensen":
        assert (want - loo_reference(False, w0, steps)).abs().max() > 1e-6
    assert not opt._buckets[0].micro  # the kept microbatch gradients are released after the step


def test_leave_one_out_is_adamw_only_and_needs_two_microbatches():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="bias_correction"):
        precond.Sophia([w], bias_correction="loo")
    opt = make("loo")([w])
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match="microbatches"):
        opt.accumulate(1)


def test_cross_fit_fraction_moves_the_split():
    steps = microbatch_grads((4, 6), 4, 6)
    w0 = torch.randn(4, 6, dtype=torch.float64)
    got, _ = train(make("full", cross_fit_fraction=0.34), w0, steps)
    torch.testing.assert_close(got, reference("full", w0, steps, fraction=0.34)[0], rtol=1e-12, atol=1e-12)


def test_a_large_variance_clamps_the_inverse_at_zero():
    steps = microbatch_grads((6, 6), 3, 4, spread=30.0)
    w0 = torch.randn(6, 6, dtype=torch.float64)
    want, clamped = reference("variance_corrected", w0, steps)
    assert clamped > 0
    got, _ = train(make("variance_corrected"), w0, steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_std_is_the_plain_optimizer_and_the_gradient_sum_is_given_back():
    steps = microbatch_grads((5, 3), 4, 3)
    w0 = torch.randn(5, 3, dtype=torch.float64)
    plain, _ = train(make("std"), w0, steps, accumulate=False)
    with_calls, _ = train(make("std"), w0, steps)
    assert torch.equal(plain, with_calls)
    # a corrected group leaves .grad as an ordinary accumulation loop would: the same sum, bit for bit
    w = w0.clone().requires_grad_(True)
    opt = make("full")([w])
    expected = None
    for g in steps[0]:
        w.grad = g / 3 if w.grad is None else w.grad + g / 3
        expected = g / 3 if expected is None else expected + g / 3
        opt.accumulate(3)
    assert torch.equal(w.grad, expected)


def test_zero_variance_gives_the_plain_step():
    same = [[g[0]] * 4 for g in microbatch_grads((4, 4), 4, 1)]
    w0 = torch.randn(4, 4, dtype=torch.float64)
    got, _ = train(make("variance_corrected"), w0, same)
    plain, _ = train(make("std"), w0, same, accumulate=False)
    torch.testing.assert_close(got, plain, rtol=1e-14, atol=1e-14)


def test_groups_choose_their_own_mode():
    steps_a, steps_b = microbatch_grads((3, 5), 3, 4, seed=1), microbatch_grads((6,), 3, 4, seed=2)
    a0, b0 = torch.randn(3, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = precond.AdamW([{"params": [a], "bias_correction": "full"}, {"params": [b]}], lr=LR, betas=BETAS, eps=EPS,
                        weight_decay=WD)
    for ga, gb in zip(steps_a, steps_b):
        for j in range(4):
            a.grad = ga[j] / 4 if a.grad is None else a.grad + ga[j] / 4
            b.grad = gb[j] / 4 if b.grad is None else b.grad + gb[j] / 4
            opt.accumulate(4)
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(a.detach(), reference("full", a0, steps_a)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), reference("std", b0, steps_b)[0], rtol=1e-12, atol=1e-12)


def test_bad_input_is_named():
    w = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="bias_correction"):
        precond.AdamW([w], bias_correction="both")
    with pytest.raises(ValueError, match="cross_fit_fraction"):
        precond.AdamW([w], bias_correction="cross_fit", cross_fit_fraction=1.0)
    for mode, n in (("variance_corrected", 1), ("cross_fit", 1), ("full", 2)):
        opt = precond.AdamW([w], bias_correction=mode)
        w.grad = torch.ones_like(w)
        with pytest.raises(ValueError, match="microbatches"):
            opt.accumulate(n)
    opt = precond.AdamW([w], bias_correction="full")
    with pytest.raises(RuntimeError, match="accumulate"):
        opt.step()  # no microbatch was recorded
    opt.accumulate(4)
    with pytest.raises(ValueError, match="microbatches"):
        opt.accumulate(5)
    with pytest.raises(RuntimeError, match="accumulate"):
        opt.step()  # one of four


def check_round_trip(factory, shape=(4, 5), steps=6, split=3):
    """Stopping after ``split`` steps and resuming from the state_dict continues bit-identically."""
    grads = microbatch_grads(shape, steps, 4)
    w0 = torch.randn(shape, dtype=torch.float64)
    straight, _ = train(factory, w0, grads)
    first, opt = train(factory, w0, grads[:split])
    resumed, _ = train(factory, first, grads[split:], resume_from=opt.state_dict())
    assert torch.equal(resumed, straight)


def test_state_dict_round_trip_continues_identically():
    check_round_trip(make("full"))


def test_a_checkpoint_saved_before_the_option_existed_loads_with_its_default():
    w = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    opt = precond.AdamW([w])
    w.grad = torch.ones_like(w)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["bias_correction"], group["cross_fit_fraction"]
    resumed = precond.AdamW([w])
    resumed.load_state_dict(saved)
    resumed.step()
    assert resumed.param_groups[0]["bias_correction"] == "std"


def clipped_run(opt_factory, w0, steps, factor):
    """An accumulation loop that rescales ``p.grad`` by ``factor`` between the last accumulate() and step(),
    as ``clip_grad_norm_`` does."""
    w = w0.clone().requires_grad_(True)
    opt = opt_factory([w])
    for grads in steps:
        n = len(grads)
        for g in grads:
            w.grad = g / n if w.grad is None else w.grad + g / n
            opt.accumulate(n)
        w.grad.mul_(factor)
        opt.step()
        opt.zero_grad()
    return w.detach()


SHAMPOO = dict(betas=(0.9, 0.95), epsilon=1e-3, precondition_frequency=2, start_preconditioning_step=2,
               merge_dims=False, max_factor_ratio=float("inf"))


def adamw_scale_aware(mode):
    """AdamW with ε comparable to √v, so that rescaling the gradients changes its step."""
    return lambda ps: precond.AdamW(ps, lr=LR, betas=BETAS, eps=0.5, weight_decay=WD, bias_correction=mode)


@pytest.mark.parametrize("name, factory", [
    ("AdamW cross_fit", adamw_scale_aware("cross_fit")), ("AdamW loo", adamw_scale_aware("loo")),
    ("AdamW loo_jensen", adamw_scale_aware("loo_jensen")),
    ("Shampoo cross_fit", lambda ps: precond.Shampoo(ps, lr=LR, bias_correction="cross_fit", **SHAMPOO)),
    ("Shampoo full", lambda ps: precond.Shampoo(ps, lr=LR, bias_correction="full", **SHAMPOO)),
    ("Shampoo variance_corrected",
     lambda ps: precond.Shampoo(ps, lr=LR, bias_correction="variance_corrected", **SHAMPOO))])
def test_a_clip_of_the_step_gradient_rescales_every_microbatch_statistic(name, factory):
    """Halving p.grad before step() is halving every microbatch gradient, in every mode whose statistics
    scale (all but AdamW's variance modes), and it changes the step (the clip is not ignored; AdamW with an ε
    that does not vanish beside √v, since Adam's step is otherwise nearly blind to a rescaling)."""
    steps = microbatch_grads((5, 6), 5, 4, spread=2.0)
    w0 = torch.randn(5, 6, dtype=torch.float64)
    clipped = clipped_run(factory, w0, steps, 0.5)
    halved, _ = train(factory, w0, [[g * 0.5 for g in grads] for grads in steps])
    torch.testing.assert_close(clipped, halved, rtol=1e-12, atol=1e-12)
    unclipped, _ = train(factory, w0, steps)
    assert (clipped - unclipped).abs().max() > 1e-6
