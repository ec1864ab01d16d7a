"""Bias-corrected Sophia-G (precond.bias_correction) against a float64 reference written from the formulas."""

from __future__ import annotations

import pytest
import torch

import precond

BETAS, RHO, EPS, LR, WD, PERIOD, LABELS = (0.9, 0.95), 0.05, 1e-12, 0.01, 0.1, 2, 64


def passes(shape, steps, n, seed=0, spread=1.0):
    """Per step: the ``n`` microbatch gradients of the step's pass and of the sampled-label pass."""
    gen = torch.Generator().manual_seed(seed)

    def draw():
        mean = torch.randn(shape, generator=gen, dtype=torch.float64)
        return [mean + spread * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]

    return [(draw(), draw()) for _ in range(steps)]


def reference(mode, w, steps, fraction=0.5):
    """Sophia-G with Nayak et al.'s corrections, plainly: curvature from the sampled pass every PERIOD steps."""
    w, m, h, var = w.clone(), torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)
    beta1, beta2 = BETAS
    cross, corrected = mode in ("cross_fit", "full"), mode in ("variance_corrected", "full")
    for t, (grads, sampled) in enumerate(steps, start=1):
        n = len(grads)
        n_a = max(1, int(fraction * n)) if cross else 0
        numerator = torch.stack(grads[:n_a]).mean(0) if cross else torch.stack(grads).mean(0)
        w = w * (1 - LR * WD)
        m = beta1 * m + (1 - beta1) * numerator
        d = (RHO * h).clamp(min=EPS)
        inverse = (1 / d - var / d ** 3).clamp(min=0) if corrected else 1 / d
        w = w - LR * (m * inverse).clamp(-1, 1)
        if t % PERIOD == 0:
            b = LABELS / n
            r = [b * g * g for g in sampled[n_a:]]  # each microbatch's own GNB estimate
            estimate = torch.stack(r).mean(0) if cross else LABELS * torch.stack(sampled).mean(0) ** 2
            if corrected:
                p = torch.stack([RHO * (beta2 * h + (1 - beta2) * r_j) for r_j in r])
                var = p.var(0, unbiased=True) / p.shape[0]
            h = beta2 * h + (1 - beta2) * estimate
    return w


def backward_pass(w, opt, grads, accumulate=True):
    n = len(grads)
    for g in grads:  # what backward of loss_j / n adds to .grad
        w.grad = g / n if w.grad is None else w.grad + g / n
        if accumulate:
            opt.accumulate(n)


def train(opt_factory, w0, steps, resume_from=None, accumulate=True):
    w = w0.clone().requires_grad_(True)
    opt = opt_factory([w])
    if resume_from is not None:
        opt.load_state_dict(resume_from)
    for grads, sampled in steps:
        backward_pass(w, opt, grads, accumulate)
        opt.step()
        opt.zero_grad()
        if opt.hessian_update_due():
            backward_pass(w, opt, sampled, accumulate)
            opt.update_hessian(batch_size=LABELS)
            opt.zero_grad()
    return w.detach(), opt


def make(mode, **kw):
    return lambda params: precond.Sophia(params, lr=LR, betas=BETAS, rho=RHO, weight_decay=WD, eps=EPS,
                                         update_period=PERIOD, bias_correction=mode, **kw)


@pytest.mark.parametrize("mode", ["std", "cross_fit", "variance_corrected", "full"])
@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 5), (2, 3, 2, 2)])
def test_each_mode_matches_the_float64_reference(mode, shape):
    steps = passes(shape, 7, 4, spread=2.0)
    w0 = torch.randn(shape, dtype=torch.float64)
    got, _ = train(make(mode), w0, steps)
    want = reference(mode, w0, steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if mode != "std":
        assert (want - reference("std", w0, steps)).abs().max() > 1e-4  # the correction changes the step


def test_std_equals_the_plain_loop_without_accumulate():
    steps = passes((4, 6), 6, 3)
    w0 = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(train(make("std"), w0, steps, accumulate=False)[0], train(make("std"), w0, steps)[0])


def test_hessian_update_needs_the_microbatches_and_gnb():
    w = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    opt = make("full")([w])
    w.grad = torch.ones_like(w)
    with pytest.raises(RuntimeError, match="accumulate"):
        opt.update_hessian(batch_size=LABELS)
    with pytest.raises(ValueError, match="bias_correction"):
        precond.Sophia([w], estimator="hutchinson", bias_correction="variance_corrected")


def test_state_dict_round_trip_keeps_the_variance():
    steps = passes((4, 5), 8, 4)
    w0 = torch.randn(4, 5, dtype=torch.float64)
    straight, _ = train(make("full"), w0, steps)
    first, opt = train(make("full"), w0, steps[:5])
    assert opt.state_dict()["state"][0]["hessian_variance"].abs().max() > 0
    resumed, _ = train(make("full"), first, steps[5:], resume_from=opt.state_dict())
    assert torch.equal(resumed, straight)
