"""The torch.optim.Optimizer contract and the reliability rules, for every precond optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

import precond

FACTORIES = {
    "Shampoo": lambda ps, **kw: precond.Shampoo(ps, **{"lr": 0.01, "grafting": "adam",
                                                       "max_preconditioner_dim": 8, **kw}),
    "KLShampoo": lambda ps, **kw: precond.KLShampoo(ps, **{"lr": 0.01, "grafting": "adam",
                                                           "max_preconditioner_dim": 8, **kw}),
    "EShampoo": lambda ps, **kw: precond.EShampoo(ps, **{"lr": 0.01, "precondition_frequency": 2,
                                                         "max_preconditioner_dim": 8, **kw}),
    "SOAP": lambda ps, **kw: precond.SOAP(ps, **{"lr": 0.01, "precondition_frequency": 2, **kw}),
    "KLSOAP": lambda ps, **kw: precond.KLSOAP(ps, **{"lr": 0.01, "precondition_frequency": 2, **kw}),
    "Muon": lambda ps, **kw: precond.Muon(ps, **{"lr": 0.02, "adamw_lr": 0.01, **kw}),
    "ASGO": lambda ps, **kw: precond.ASGO(ps, **{"lr": 0.01, "adamw_lr": 0.01, **kw}),
    "Sophia": lambda ps, **kw: precond.Sophia(ps, **{"lr": 0.01, **kw}),
    "AdamW": lambda ps, **kw: precond.AdamW(ps, **{"lr": 0.01, **kw}),
}
NAMES = list(FACTORIES)


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(dtype)


TEACHER = torch.randn(6, 3, generator=torch.Generator().manual_seed(123))


def batch(seed=0, dtype=torch.float32):
    """Inputs and the targets of a fixed teacher, so that the loss can go down."""
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype), torch.tanh(x @ TEACHER).to(dtype)


def train(net, opt, steps, seed=0, scheduler=None):
    losses = []
    for i in range(steps):
        x, y = batch(seed + i, next(net.parameters()).dtype)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", NAMES)
def test_training_lowers_the_loss(name):
    net = model()
    losses = train(net, FACTORIES[name](net.parameters()), 40)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_evaluated_and_its_loss_returned(name):
    net = model()
    opt = FACTORIES[name](net.parameters())
    x, y = batch()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
    assert len(calls) == 3 and isinstance(loss, torch.Tensor) and loss.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_that_sets_lr_to_zero_freezes_the_parameters(name):
    net = model()
    opt = FACTORIES[name](net.parameters(), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 4 else 0.0)
    train(net, opt, 4, scheduler=sched)
    assert opt.param_groups[0]["lr"] == 0.0
    frozen = params_of(net)
    train(net, opt, 3, seed=10, scheduler=sched)
    for a, b in zip(frozen, params_of(net)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_lr_is_read_at_every_step(name):
    """Halving lr through a scheduler gives the same trajectory as editing param_groups by hand."""
    net_a, net_b = model(), model()
    opt_a, opt_b = FACTORIES[name](net_a.parameters()), FACTORIES[name](net_b.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    initial = [g["lr"] for g in opt_a.param_groups]
    for i in range(5):
        for net, opt in ((net_a, opt_a), (net_b, opt_b)):
            x, y = batch(i)
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        sched.step()
        for group in opt_b.param_groups:
            group["lr"] *= 0.5
    for a, b in zip(params_of(net_a), params_of(net_b)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [g["lr"] for g in opt_a.param_groups] == pytest.approx([lr * 0.5**5 for lr in initial])


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_set_to_none_skips_and_zeros_step(name):
    net = model()
    opt = FACTORIES[name](net.parameters())
    train(net, opt, 3)
    before = params_of(net)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in net.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(net)))
    x, y = batch(7)
    torch.nn.functional.mse_loss(net(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in net.parameters())
    opt.step()  # a zero gradient is a valid gradient: the step runs
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_keep_their_own_hyper_parameters(name):
    net, reference = model(), model()
    first, second = list(net[0].parameters()), list(net[2].parameters())
    opt = FACTORIES[name]([{"params": first}, {"params": second, "lr": 0.0}])
    for group in opt.param_groups:  # Muon and ASGO split each group into a matrix and an AdamW half
        if any(p is q for p in group["params"] for q in second):
            assert group["lr"] == 0.0
        else:
            assert group["lr"] > 0.0
    ref_opt = FACTORIES[name](list(reference[0].parameters()))
    frozen = [p.detach().clone() for p in second]
    for i in range(4):
        x, y = batch(i)
        for n, o in ((net, opt), (reference, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(n(x), y).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, second))
    for a, b in zip(first, reference[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_without_grad_are_skipped(name):
    net = model()
    net[2].weight.requires_grad_(False)
    opt = FACTORIES[name](net.parameters())
    before = net[2].weight.detach().clone()
    train(net, opt, 3)
    assert torch.equal(before, net[2].weight) and len(opt.state[net[2].weight]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_with_no_elements_trains_beside_the_others(name):
    empty, w = torch.nn.Parameter(torch.empty(0, 5)), torch.nn.Parameter(torch.randn(4, 5))
    alone = torch.nn.Parameter(w.detach().clone())  # the same weight trained without the empty one
    opt, reference = FACTORIES[name]([empty, w]), FACTORIES[name]([alone])
    before = w.detach().clone()
    for _ in range(3):
        (w.square().sum() + empty.sum()).backward()
        alone.square().sum().backward()
        for o in (opt, reference):
            o.step()
            o.zero_grad()
    assert not torch.equal(before, w)
    torch.testing.assert_close(w, alone, rtol=0, atol=0)  # the empty parameter changes nothing
    assert all(v.numel() == 0 for v in opt.state[empty].values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_raise(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FACTORIES[name](emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("name", ["Shampoo", "EShampoo", "SOAP"])
def test_a_block_with_non_finite_gradient_is_skipped_and_counted(name):
    p = torch.nn.Parameter(torch.randn(16, 5))
    blocking = {"max_precond_dim": 8, "large_dim_policy": "split"} if name == "SOAP" else {"max_preconditioner_dim": 8}
    opt = FACTORIES[name]([p], **blocking)
    for seed in range(3):
        p.grad = torch.randn(16, 5, generator=torch.Generator().manual_seed(seed))
        opt.step()
    state_before = copy.deepcopy(opt.state[p])
    before = p.detach().clone()
    p.grad = torch.randn(16, 5)
    p.grad[2, 3] = float("nan")     # block 0 (rows 0-7)
    p.grad[12, 0] = float("inf")    # block 1 (rows 8-15)
    opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.preconditioner_stats()["nonfinite_skipped_blocks"] == 2
    now = opt.state[p]
    assert set(now) == set(state_before)
    for key, value in state_before.items():  # every block's state, its step count included, is unchanged
        if not key.endswith("nonfinite"):
            assert torch.equal(value, now[key]), key
    assert now["block0.nonfinite"] == 1 and now["block1.nonfinite"] == 1
    p.grad = torch.randn(16, 5)
    p.grad[12, 0] = float("nan")    # only block 1: block 0 moves on
    opt.step()
    assert not torch.equal(p.detach()[:8], before[:8]) and torch.equal(p.detach()[8:], before[8:])
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("name", ["Shampoo", "EShampoo", "SOAP", "ASGO"])
def test_failed_decompositions_are_counted_and_training_goes_on(name, monkeypatch):
    net = model()
    opt = FACTORIES[name](net.parameters())
    train(net, opt, 3)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated LAPACK failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    monkeypatch.setattr(torch.linalg, "qr", broken)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", broken)  # power-QR's CholeskyQR, before Householder
    losses = train(net, opt, 6, seed=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    stats = opt.preconditioner_stats()["factors"]
    assert stats and sum(f["failures"] for f in stats) > 0


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_parameters_keep_float32_state(name):
    net = model(dtype=torch.bfloat16)
    opt = FACTORIES[name](net.parameters())
    losses = train(net, opt, 30)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    tensors = [v for s in opt.state.values() for v in _tensors(s) if v.is_floating_point()]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)
    assert losses[-1] < losses[0]
    # and they stay float32 across a state_dict round trip
    opt2 = FACTORIES[name](net.parameters())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(t.dtype == torch.float32 for s in opt2.state.values() for t in _tensors(s) if t.is_floating_point())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_bit_identically(name):
    net = model()
    opt = FACTORIES[name](net.parameters())
    train(net, opt, 5)
    saved_model, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    train(net, opt, 5, seed=100)
    resumed = model(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = FACTORIES[name](resumed.parameters())
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 5, seed=100)
    for a, b in zip(params_of(net), params_of(resumed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_loading_a_state_of_other_shapes_raises(name):
    net = model()
    opt = FACTORIES[name](net.parameters())
    train(net, opt, 3)
    other = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    other_opt = FACTORIES[name](other.parameters())
    with pytest.raises(ValueError, match="shape|length"):
        other_opt.load_state_dict(opt.state_dict())


INVALID = [
    (precond.Shampoo, dict(lr=-1.0), "lr"),
    (precond.Shampoo, dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (precond.Shampoo, dict(betas=(0.9, 1.5)), r"betas\[1\]"),
    (precond.Shampoo, dict(epsilon=0.0), "epsilon"),
    (precond.Shampoo, dict(weight_decay=-0.1), "weight_decay"),
    (precond.Shampoo, dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
    (precond.Shampoo, dict(precondition_frequency=0), "precondition_frequency"),
    (precond.Shampoo, dict(start_preconditioning_step=0), "start_preconditioning_step"),
    (precond.Shampoo, dict(grafting="adamw"), "grafting"),
    (precond.Shampoo, dict(grafting_epsilon=0.0), "grafting_epsilon"),
    (precond.Shampoo, dict(root_method="cholesky"), "root_method"),
    (precond.Shampoo, dict(inverse_exponent_override=-0.5), "inverse_exponent_override"),
    (precond.Shampoo, dict(large_dim_policy="drop"), "large_dim_policy"),
    (precond.Shampoo, dict(root_method="newton", inverse_exponent_override=0.3), "inverse_exponent_override"),
    (precond.EShampoo, dict(refresh_method="svd"), "refresh_method"),
    (precond.EShampoo, dict(refresh_tolerance=1.5), "refresh_tolerance"),
    (precond.EShampoo, dict(max_qr_iterations=0), "max_qr_iterations"),
    (precond.SOAP, dict(betas=(0.9,)), "betas"),
    (precond.SOAP, dict(eps=-1e-8), "eps"),
    (precond.SOAP, dict(shampoo_beta=1.0), "shampoo_beta"),
    (precond.SOAP, dict(precondition_frequency=2.5), "precondition_frequency"),
    (precond.SOAP, dict(max_precond_dim=-3), "max_precond_dim"),
]


@pytest.mark.parametrize("cls, kwargs, argument", INVALID, ids=[f"{c.__name__}-{a}" for c, _, a in INVALID])
def test_invalid_hyper_parameters_name_the_argument(cls, kwargs, argument):
    with pytest.raises(ValueError, match=f"Invalid {argument}"):
        cls([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


# a hyper-parameter of each method's own, set to a bad value in a group
OWN_BAD_VALUE = {"Muon": ("momentum", 1.0)}


@pytest.mark.parametrize("name", NAMES)
def test_group_values_are_checked_like_the_constructors(name):
    p, q = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"Invalid lr: -1.0 \(must be >= 0\) in param group 0"):
        FACTORIES[name]([{"params": [p], "lr": -1.0}])
    opt = FACTORIES[name]([p])
    groups = len(opt.param_groups)
    key, bad = OWN_BAD_VALUE.get(name, ("betas", (0.9, 1.5)))
    for group in ({"params": [q], "weight_decay": -0.5}, {"params": [q], key: bad}):
        with pytest.raises(ValueError, match=rf"Invalid {next(k for k in group if k != 'params')}.* in param group"):
            opt.add_param_group(group)
        assert len(opt.param_groups) == groups  # a group that fails is not added
    opt.add_param_group({"params": [q], "lr": 0.5})  # a valid group still joins and steps
    (p.sum() + q.sum()).backward()
    opt.step()


@pytest.mark.parametrize("cls", [precond.Muon, precond.ASGO])
def test_groups_of_one_kind_stay_one_to_one_for_per_group_schedulers(cls):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    groups = precond.param_groups(net)
    opt = cls(groups, lr=0.02, adamw_lr=1e-3)
    assert [g["matrix"] for g in opt.param_groups] == [g["matrix"] for g in groups]
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 1e-3], total_steps=10)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    scheduler.step()
    first, second = (g["lr"] for g in opt.param_groups)
    assert first == pytest.approx(20 * second)  # each group follows its own max_lr


@pytest.mark.parametrize("name", NAMES)
def test_explain_names_each_parameters_rule_and_predicts_its_state(name):
    net = model()
    opt = FACTORIES[name](net.parameters())
    before = precond.explain(opt)
    train(net, opt, 1)
    assert precond.explain(opt) == before  # the same before and after the state exists
    rows = [line.split(" | ") for line in before.splitlines()[2:-1]]
    assert len(rows) == len(list(net.parameters()))
    counters = {"step", "nonfinite"}
    for group in opt.param_groups:
        for p in group["params"]:
            state = sum(v.numel() * v.element_size() for k, v in opt.state[p].items()
                        if torch.is_tensor(v) and k.rsplit(".", 1)[-1] not in counters)
            row = next(r for r in rows if r[2] == str(tuple(p.shape)) and int(r[5].replace(",", "")) == state)
            assert row[3]  # a rule is named
    if name in ("Shampoo", "EShampoo", "SOAP"):
        assert "Kronecker" in before
    if name in ("Muon", "ASGO"):
        assert "diagonal (fused AdamW)" in before  # the 1-D parameters went to AdamW
    with pytest.raises(TypeError, match="precond optimizer"):
        precond.explain(torch.optim.SGD(net.parameters(), lr=0.1))


def test_the_adamw_half_of_a_matrix_optimizer_checks_its_own_keys():
    bias = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"Invalid adamw_betas\[0\].* in param group 0"):
        precond.Muon([{"params": [bias], "adamw_betas": (1.5, 0.9)}], lr=0.02)
    with pytest.raises(ValueError, match="Invalid adamw_eps"):
        precond.ASGO([bias], adamw_eps=0.0)


def test_gradient_mask_flags_nan_infinities_and_norms_past_the_bound():
    from precond.engine import gradient_mask
    from precond.engine.batched import gradient_bound, gradient_rows
    bound = gradient_bound(torch.float32)
    assert 1e17 < bound < 1e18  # 1% of √(3.4e38)
    tensors = [torch.randn(3, 4), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), 0.0]),
               torch.tensor([-float("inf"), 2.0]), torch.full((4,), 0.49 * bound), torch.full((4,), 0.51 * bound)]
    f32, f64 = torch.float32, torch.float64
    assert gradient_mask(tensors, f32).tolist() == [True, False, False, False, True, False]  # 0.98, 1.02 × bound
    assert gradient_rows(torch.stack([t.reshape(-1)[:2] for t in tensors]), f32).tolist() == [
        True, False, False, False, True, True]  # two entries of 0.51 × bound: norm 0.72 × bound
    big = torch.full((2, 2), 1e30, dtype=f64)  # far inside float64's bound
    assert gradient_mask([big], f64).tolist() == [True] and gradient_rows(big[None], f64).tolist() == [True]
    # float16 gradients feed float32 statistics: measured in float32, past float16's own range (norm 1.2e5)
    half = [torch.full((4,), 6e4, dtype=torch.float16), torch.tensor([1.0, float("inf")], dtype=torch.float16)]
    assert gradient_mask(half, f32).tolist() == [True, False]
    assert gradient_rows(torch.stack([h[:2] for h in half]), f32).tolist() == [True, False]


@pytest.mark.parametrize("name", ["Shampoo", "EShampoo", "SOAP"])
def test_tf32_flag_applies_to_the_optimizer_steps_only(name, monkeypatch):
    """The flag switches float32 matmuls to TF32 while the optimizer computes, then restores the setting."""
    from precond import linalg
    seen = []
    real = linalg.tf32_matmuls

    def spy(enabled):
        seen.append(enabled)
        return real(enabled)

    monkeypatch.setattr("precond.engine.core.tf32_matmuls", spy)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    net = model()
    opt = FACTORIES[name](net.parameters(), tf32=True)
    train(net, opt, 2)
    assert seen and all(seen) and matmul.fp32_precision == before
    with real(True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(ValueError, match="Invalid tf32"):
        FACTORIES[name](net.parameters(), tf32="yes")


def test_tf32_is_set_per_group_when_the_groups_differ(monkeypatch):
    """Groups that share a TF32 mode have it set once around the step; groups that differ have each its own
    while its directions are computed, spectral normalisation included, and the setting is restored."""
    matmul = torch.backends.cuda.matmul
    before, seen = matmul.fp32_precision, []
    real_directions, real_normalize = precond.SOAP._directions, precond.engine.core.spectral_normalize

    def directions(self, bucket, grads, ok, group):
        seen.append((group["tf32"], "directions", matmul.fp32_precision))
        return real_directions(self, bucket, grads, ok, group)

    def normalize(direction, transposed=False):
        seen.append((None, "normalize", matmul.fp32_precision))
        return real_normalize(direction, transposed=transposed)

    monkeypatch.setattr(precond.SOAP, "_directions", directions)
    monkeypatch.setattr("precond.engine.core.spectral_normalize", normalize)
    a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5, 3))
    opt = precond.SOAP([{"params": [a], "tf32": True, "spectral_normalize": True}, {"params": [b]}], lr=1e-2)
    for _ in range(2):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    assert matmul.fp32_precision == before
    assert {(mode, where, flag) for mode, where, flag in seen if where == "directions"} == {
        (True, "directions", "tf32"), (False, "directions", before)}
    assert {flag for _, where, flag in seen if where == "normalize"} == {"tf32"}  # inside group a's block
    seen.clear()
    opt.param_groups[1]["tf32"] = True  # now uniform: set once by step()
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    opt.step()
    assert {flag for _, _, flag in seen} == {"tf32"} and matmul.fp32_precision == before


@pytest.mark.parametrize("name", ["SOAP", "Muon", "AdamW"])
def test_non_finite_gradients_warn_once_per_parameter_then_count(name, caplog):
    net = model()
    opt = FACTORIES[name](net.parameters())
    train(net, opt, 2)
    weight = net[0].weight
    for _ in range(3):
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        weight.grad[0, 0] = float("nan")
        with caplog.at_level("WARNING", logger="precond"):
            opt.step()
    stats = opt.preconditioner_stats()
    assert stats["nonfinite_skipped_blocks"] == 3
    assert len([r for r in caplog.records if "a step was skipped" in r.getMessage()]) == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_fused_adamw_skips_the_group_step_on_a_non_finite_gradient():
    """torch's fused kernel takes one skip flag per call: the whole group keeps its state that step."""
    net = model()
    opt = precond.AdamW(net.parameters(), lr=0.01)
    train(net, opt, 2)
    before = [p.detach().clone() for p in net.parameters()]
    state_before = copy.deepcopy(opt.state_dict()["state"])
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    net[2].bias.grad[0] = float("inf")
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    for index, entry in opt.state_dict()["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(entry[key], state_before[index][key]), key
    assert opt.preconditioner_stats()["nonfinite_skipped_blocks"] == 1


def test_ema_is_the_committed_formula_in_place_and_leaves_refused_blocks_exactly():
    from precond.engine import ema_
    gen = torch.Generator().manual_seed(0)
    ok = torch.tensor([True, False, True])
    for dtype in (torch.float32, torch.float64):
        target = torch.randn(3, 4, 5, generator=gen, dtype=dtype)
        increment = torch.randn(3, 4, 5, generator=gen, dtype=dtype)
        increment[1] = 0.0  # the engine zeroes a refused block's gradient, so its statistics are zero
        for beta, weight in ((0.95, 0.05), (1.0, 1.0), (0.9, 0.3)):
            want = torch.where(ok[:, None, None], torch.add(target * beta, increment, alpha=weight), target)
            got = target.clone()
            ema_(got, increment, beta, weight, ok)
            assert torch.equal(got, want) and torch.equal(got[1], target[1])


IN_PLACE_CASES = {
    "SOAP": lambda ps: precond.SOAP(ps, lr=1e-2, weight_decay=0.1, precondition_frequency=2),  # decay after
    "Shampoo": lambda ps: precond.Shampoo(ps, lr=1e-2, weight_decay=0.1, max_preconditioner_dim=8),  # before
    "Muon": lambda ps: precond.Muon(ps, lr=torch.tensor(0.02), weight_decay=0.1),  # bf16 directions, tensor lr
    "Sophia": lambda ps: precond.Sophia(ps, lr=1e-3, weight_decay=0.2),
}


@pytest.mark.parametrize("name", list(IN_PLACE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_and_stacked_parameter_updates_agree(name, dtype, monkeypatch):
    """Large buckets are written where their blocks are, small ones through a stack: in float32 the same bits,
    a refused block (a NaN gradient at step 3) and a diverged one (lr × 1e12 at step 5) included."""
    from precond.engine import core
    shapes = [(12, 8), (12, 8), (16, 24), (5,)]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(7)]
    grads[3][1][0, 0] = float("nan")
    runs = []
    for threshold in (1 << 40, 0):  # everything stacked, everything in place
        monkeypatch.setattr(core, "IN_PLACE_ELEMENTS", threshold)
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = IN_PLACE_CASES[name](params)
        for step, gs in enumerate(grads):
            for group in opt.param_groups:
                if step == 5:
                    group["lr"] = group["lr"] * 1e12
                elif step == 6:
                    group["lr"] = group["lr"] / 1e12
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append([p.detach().clone() for p in params])
        runs.append(opt.preconditioner_stats()["nonfinite_skipped_blocks"])
    stacked, skipped_stacked, in_place, skipped_in_place = runs
    assert skipped_stacked == skipped_in_place >= 2  # the NaN block and at least one diverged block
    for a, b in zip(stacked, in_place):
        if dtype == torch.float32:
            assert torch.equal(a, b)
        else:  # the CPU's bf16 add rounds a strided block (Shampoo's 8×8 blocks of the 16×24 weight) in a
            # scalar loop, not the vectorised one: a bf16 step apart in places, then carried by the trajectory
            assert float((a.float() - b.float()).norm() / b.float().norm()) <= 2.0 ** -8
    assert not torch.equal(in_place[0], init[0])


def test_every_registered_optimizer_is_exported_and_covered_by_each_suite():
    """The registry lists each public optimizer once; every suite that runs all optimizers covers all of them
    (test_compile once left ASGO out without a sign)."""
    import distributed_cases
    import test_compile
    from precond.registry import OPTIMIZERS
    assert all(getattr(precond, name) is entry.cls for name, entry in OPTIMIZERS.items())
    for suite in (FACTORIES, distributed_cases.FACTORIES, test_compile.FACTORIES):
        assert set(suite) == set(OPTIMIZERS)
