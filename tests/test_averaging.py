"""Iterate averaging (GPA, Schedule-Free) against float64 references written out here; equality with
Distributed Shampoo's ``iterate_averaging_config`` is measured by ``scripts/compare_references.py``."""

import io

import pytest
import torch

import precond
from precond.averaging import PrimalAveraging, ScheduleFree

SHAPES = [(7,), (6, 5), (3, 4, 5), (4, 3, 2, 2)]
STEPS = 6


def _quadratic_grads(params, targets):
    """Gradients of 0.5·‖p − target‖² at the current parameters, so the trajectory feeds back."""
    for p, t in zip(params, targets):
        p.grad = (p.detach() - t).clone()


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    targets = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    return init, targets


def _reference_adamw_gpa(init, targets, lr, wd, betas, eps, mu_x_of, mu_y, steps):
    """Distributed Shampoo's recursion on (y, z) with AdamW's step d = −lr·m̂/(√v̂ + ε) taken at y: the
    decay shrinks z, then y ← μx·y + (1−μx)·z + (1−μx·μy)·d, z ← z + d; x = (y − (1−μy)·z)/μy.
    Returns (y, x) after ``steps`` steps."""
    out_y, out_x = [], []
    for w0, t in zip(init, targets):
        z, y = w0.clone(), w0.clone()
        m, v = torch.zeros_like(w0), torch.zeros_like(w0)
        for k in range(1, steps + 1):
            g = y - t
            m = betas[0] * m + (1 - betas[0]) * g
            v = betas[1] * v + (1 - betas[1]) * g * g
            d = -lr * (m / (1 - betas[0] ** k)) / ((v / (1 - betas[1] ** k)).sqrt() + eps)
            z = z * (1 - lr * wd)
            mu_x = mu_x_of(k)
            y = mu_x * y + (1 - mu_x) * z + (1 - mu_x * mu_y) * d
            z = z + d
        out_y.append(y)
        out_x.append((y - (1 - mu_y) * z) / mu_y)
    return out_y, out_x


def _assert_same_trajectory(opt_a, a, opt_b, b, targets, steps, rtol, atol):
    """Two optimizers on two copies of the parameters, each step's gradients taken where each copy is, end equal."""
    for _ in range(steps):
        _quadratic_grads(a, targets)
        _quadratic_grads(b, targets)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


def _train(opt, params, targets, steps=STEPS):
    for _ in range(steps):
        _quadratic_grads(params, targets)
        opt.step()


@pytest.mark.parametrize("base", ["precond", "torch"])
@pytest.mark.parametrize("method", ["gpa", "schedule_free"])
def test_adamw_averaged_equals_reference(base, method):
    init, targets = _setup()
    params = [torch.nn.Parameter(w.clone()) for w in init]
    lr, wd, betas, eps = 0.05, 0.1, (0.9, 0.95), 1e-8
    cls = precond.AdamW if base == "precond" else torch.optim.AdamW
    inner = cls(params, lr=lr, weight_decay=wd, betas=betas, eps=eps)
    if method == "gpa":
        opt, mu_x_of, mu_y = PrimalAveraging(inner, eval_interp_coeff=0.7, train_interp_coeff=0.6), lambda k: 0.7, 0.6
    else:  # constant lr: 1 − lr²/Σ lr² = 1 − 1/k, x is the plain mean of z
        opt, mu_x_of, mu_y = ScheduleFree(inner, train_interp_coeff=0.6), lambda k: 1 - 1 / k, 0.6
    _train(opt, params, targets)
    ys, xs = _reference_adamw_gpa(init, targets, lr, wd, betas, eps, mu_x_of, mu_y, STEPS)
    for p, y in zip(params, ys):
        torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-13)
    assert all(g["weight_decay"] == wd for g in opt.param_groups)  # the decay moved to z only during the step
    opt.eval()
    for p, x in zip(params, xs):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)
    opt.train()
    for p, y in zip(params, ys):
        torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("nesterov", [False, True])
def test_gpa_around_sgd_is_momentum(nesterov):
    """Distributed Shampoo's documented equivalence: SGD(lr/(1−β)) under GPA(μx=β, μy=1 or β) is
    SGD(lr, momentum=β) (heavy-ball or Nesterov), read at y."""
    init, targets = _setup(1)
    beta, lr = 0.9, 0.01
    a = [torch.nn.Parameter(w.clone()) for w in init]
    b = [torch.nn.Parameter(w.clone()) for w in init]
    averaged = PrimalAveraging(torch.optim.SGD(a, lr=lr / (1 - beta)), beta, beta if nesterov else 1.0)
    momentum = torch.optim.SGD(b, lr=lr, momentum=beta, nesterov=nesterov)
    _assert_same_trajectory(averaged, a, momentum, b, targets, 10, rtol=1e-12, atol=1e-13)


def test_muon_decay_moves_to_z_at_each_members_rate():
    """Muon's vectors decay at the AdamW rate and decay; its matrices at its own (decoupled_decay)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    inner = precond.Muon(model.parameters(), lr=0.02, weight_decay=0.1, adamw_lr=3e-3, adamw_weight_decay=0.2)
    opt = PrimalAveraging(inner)
    model(torch.randn(16, 8)).square().mean().backward()
    opt.step()
    rates = inner.decoupled_decay()
    matrix, vector = model[0].weight, model[1].weight
    assert rates[matrix] == (0.02, 0.1)
    lr, wd = rates[vector]
    assert lr == pytest.approx(3e-3) and wd == 0.2
    assert inner.param_groups[0]["weight_decay"] == 0.1 and inner.param_groups[0]["adamw_weight_decay"] == 0.2


def test_state_dict_resumes_bit_identically():
    init, targets = _setup(2)

    def make(params):
        return ScheduleFree(precond.SOAP(params, lr=3e-3, precondition_frequency=2, weight_decay=0.01), 0.8)

    whole = [torch.nn.Parameter(w.clone()) for w in init]
    opt = make(whole)
    _train(opt, whole, targets, 6)

    first = [torch.nn.Parameter(w.clone()) for w in init]
    opt = make(first)
    _train(opt, first, targets, 3)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in first]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = [torch.nn.Parameter(w.clone()) for w in saved["params"]]
    opt = make(second)
    opt.load_state_dict(saved["opt"])
    _train(opt, second, targets, 3)
    for p, q in zip(second, whole):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("base", ["SOAP", "torch.AdamW"])
def test_distributed_checkpoint_resumes_bit_identically_in_evaluation_mode_too(base, flatten, tmp_path):
    """torch.distributed.checkpoint through get/set_optimizer_state_dict: z is one more tensor of each
    parameter's state, lr_sum and the mode are in the groups; saved in eval mode, resumed in eval mode."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    init, targets = _setup(2)

    def make():
        net = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in init])
        inner = (precond.SOAP(net.parameters(), lr=3e-3, precondition_frequency=2, weight_decay=0.01)
                 if base == "SOAP" else torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01))
        return net, ScheduleFree(inner, 0.8)

    net, opt = make()
    _train(opt, list(net), targets, 6)
    opt.eval()
    whole = [p.detach().clone() for p in net]

    net, opt = make()
    _train(opt, list(net), targets, 3)
    opt.eval()
    dcp.save({"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt, options=options)},
             checkpoint_id=tmp_path)
    net, opt = make()
    _train(opt, list(net), targets, 1)  # state to be replaced, and torch's helpers need some
    state = {"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt, options=options)}
    dcp.load(state, checkpoint_id=tmp_path)
    net.load_state_dict(state["model"])
    set_optimizer_state_dict(net, opt, state["optim"], options=options)
    assert not opt.training and opt.lr_sums[0] > 0.0
    opt.train()
    _train(opt, list(net), targets, 3)
    opt.eval()
    for p, q in zip(net, whole):
        assert torch.equal(p.detach(), q)


def test_scheduler_step_and_mode_errors():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ScheduleFree(torch.optim.AdamW([p], lr=1.0))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones(3)
    opt.step()
    scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == 0.5  # the scheduler edits the base optimizer's rate
    assert opt.lr_sums == [1.0]
    opt.eval()
    with pytest.raises(RuntimeError, match="train mode"):
        opt.step()


def test_bad_arguments_are_named():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="eval_interp_coeff"):
        PrimalAveraging(torch.optim.SGD([p], lr=0.1), eval_interp_coeff=1.0)
    with pytest.raises(ValueError, match="train_interp_coeff"):
        PrimalAveraging(torch.optim.SGD([p], lr=0.1), train_interp_coeff=0.0)
    with pytest.raises(ValueError, match="eval_coeff_lr_power"):
        ScheduleFree(torch.optim.SGD([p], lr=0.1), eval_coeff_lr_power=0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        PrimalAveraging([p])
    with pytest.raises(ValueError, match="iterate_averaging"):
        PrimalAveraging(torch.optim.SGD([p], lr=0.1)).load_state_dict(torch.optim.SGD([p], lr=0.1).state_dict())


def test_nonfinite_gradient_leaves_parameters_finite():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = PrimalAveraging(precond.Shampoo([p], lr=0.1))
    p.grad = torch.ones(4, 4)
    opt.step()
    p.grad = torch.full((4, 4), float("nan"))
    opt.step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("decoupled", [True, False])
def test_averaging_with_mu_x_0_and_mu_y_1_is_the_base_optimizer_whatever_its_decay(decoupled):
    """μ_x = 0, μ_y = 1 makes y = z: the wrapped optimizer must step exactly as the base one, decoupled decay
    (moved to z) and L2 decay (left in the base step) alike. (ε = 1e-3: at 1e-12 the early rank-deficient
    factors amplify the rounding of moving the decay, 1e-16 to 1e-2 in six steps.)"""
    init, targets = _setup(3)
    a = [torch.nn.Parameter(w.clone()) for w in init]
    b = [torch.nn.Parameter(w.clone()) for w in init]

    def make(ps):
        return precond.Shampoo(ps, lr=0.01, weight_decay=0.1, use_decoupled_weight_decay=decoupled, epsilon=1e-3,
                               precondition_frequency=2, grafting="adam")

    wrapped, plain = PrimalAveraging(make(a), eval_interp_coeff=0.0, train_interp_coeff=1.0), make(b)
    _assert_same_trajectory(wrapped, a, plain, b, targets, STEPS, rtol=1e-11, atol=1e-12)
