"""What a new user meets first: checkpoints that must resume, groups kept as passed, messages that say what to do."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import precond


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.body(self.embed(x)))))


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (4, 6), generator=g)
    return nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten())


def train(model, opt, seeds):
    for seed in seeds:
        loss_of(model, seed).backward()
        opt.step()
        opt.zero_grad()


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_torch_adamw_checkpoint_resumes_in_precond_adamw_and_back():
    """3 steps of torch's AdamW, then 3 of ours from its state_dict, equal 6 of torch's (float64); and torch's
    AdamW loads our state_dict."""
    torch.manual_seed(0)
    start = Net().double()
    grads = [[torch.randn_like(p) for p in start.parameters()] for _ in range(6)]

    def run(model, opt, steps):
        for gs in steps:
            for p, g in zip(model.parameters(), gs):
                p.grad = g.clone()
            opt.step()

    def copy():
        model = Net().double()
        model.load_state_dict(start.state_dict())
        return model

    reference = copy()
    run(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1), grads)
    model = copy()
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    run(model, theirs, grads[:3])
    ours = precond.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ours.load_state_dict(theirs.state_dict())
    run(model, ours, grads[3:])
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    back = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    back.load_state_dict(ours.state_dict())
    assert all(torch.equal(back.state[p]["exp_avg"], ours.state[p]["exp_avg"]) for p in model.parameters())


def test_a_torch_checkpoint_with_options_we_lack_is_refused_by_name():
    model = Net()
    theirs = torch.optim.AdamW(model.parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad=True"):
        precond.AdamW(model.parameters()).load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("cls", [precond.Muon, precond.ASGO])
def test_a_checkpoint_loads_after_the_frozen_set_changes(cls):
    """param_groups lists frozen parameters too, so the groups do not change when a layer is (un)frozen."""
    torch.manual_seed(0)
    model = Net()
    model.body.requires_grad_(False)
    opt = cls(precond.param_groups(model), lr=0.01)
    train(model, opt, range(2))
    saved = opt.state_dict()
    model.body.requires_grad_(True)
    resumed = cls(precond.param_groups(model), lr=0.01)
    resumed.load_state_dict(saved)
    train(model, resumed, range(2, 4))
    assert "momentum_buffer" in resumed.state[model.body.weight] or "factor0" in resumed.state[model.body.weight]


@pytest.mark.parametrize("make", [lambda ps: precond.AdamW(ps), lambda ps: precond.SOAP(ps),
                                  lambda ps: precond.Muon(ps)], ids=["AdamW", "SOAP", "Muon"])
def test_state_dict_after_load_equals_the_saved_one(make):
    torch.manual_seed(0)
    model = Net()
    opt = make(list(model.parameters()))
    train(model, opt, range(2))
    saved = opt.state_dict()
    other = make(list(model.parameters()))
    other.load_state_dict(saved)
    again = other.state_dict()
    assert [sorted(g) for g in again["param_groups"]] == [sorted(g) for g in saved["param_groups"]]
    assert again["param_groups"] == saved["param_groups"]


# ---------------------------------------------------------------------------------------------- groups
def test_muon_keeps_a_mixed_group_as_one_and_a_scheduler_scales_both_rules():
    """One group of a matrix and vectors stays one, so OneCycleLR takes one max_lr; the vectors' AdamW rate
    follows the group's lr in proportion (adamw_lr at the constructor's lr)."""
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = precond.Muon(model.parameters(), lr=0.02, adamw_lr=0.004, adamw_weight_decay=0.0, weight_decay=0.0)
    assert len(opt.param_groups) == 1
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02], total_steps=10)
    bias = model[0].bias
    for step in range(3):
        loss = model(torch.randn(5, 6)).pow(2).sum()
        loss.backward()
        lr = opt.param_groups[0]["lr"]
        before = bias.detach().clone()
        opt.step()
        opt.zero_grad()
        scheduler.step()
        if step == 0:  # Adam's first step moves each coordinate by its rate: lr · 0.004 / 0.02
            torch.testing.assert_close((bias.detach() - before).abs(), torch.full((6,), lr * 0.2), rtol=1e-4, atol=0)


def test_add_param_group_after_named_groups_names_the_new_parameters():
    model = Net()
    opt = precond.Muon(precond.param_groups(model), lr=0.02)
    extra = nn.Linear(8, 8)
    opt.add_param_group({"params": list(extra.parameters())})
    assert opt.param_groups[-1]["param_names"] == ["group2.0", "group2.1"]
    assert len(opt.param_groups) == 3
    train(model, opt, range(1))


def test_groups_that_set_matrix_false_keep_adamw_rates():
    model = Net()
    groups = precond.param_groups(model)
    opt = precond.Muon(groups, lr=0.02, adamw_lr=1e-3, adamw_weight_decay=0.0)
    other = next(g for g in opt.param_groups if g["matrix"] is False)
    assert other["lr"] == 1e-3 and other["weight_decay"] == 0.0 and len(opt.param_groups) == len(groups)


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("make", [precond.AdamW, precond.SOAP, precond.Shampoo, precond.Muon, precond.Sophia])
def test_complex_parameters_are_refused_at_construction_by_name(make):
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"'z' of param group 0 is complex \(torch.complex64\)"):
        make([{"params": [z], "param_names": ["z"]}])


@pytest.mark.parametrize("make", [lambda ps: precond.AdamW(ps, betas=0.9), lambda ps: precond.SOAP(ps, betas=0.9),
                                  lambda ps: precond.Muon(ps, adamw_betas=0.9)], ids=["AdamW", "SOAP", "Muon"])
def test_a_single_beta_is_a_value_error_naming_the_argument(make):
    with pytest.raises(ValueError, match=r"Invalid (adamw_)?betas: 0.9 \(must be a pair"):
        make([nn.Parameter(torch.randn(3, 3))])


def test_passing_a_module_says_what_to_pass():
    with pytest.raises(TypeError, match=r"model.parameters\(\) or precond.param_groups\(model\)"):
        precond.Muon(nn.Linear(3, 3))


# --------------------------------------------------------------------------------------------- messages
def test_memory_guard_notes_come_once_per_model_with_a_count(caplog):
    model = nn.Sequential(*[nn.Linear(64, 2) for _ in range(5)])
    opt = precond.Shampoo(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with caplog.at_level(logging.WARNING, logger="precond"):
        opt.step()
        opt.step()
    guard = [r for r in caplog.records if "memory guard" in r.getMessage()]
    assert len(guard) == 1 and "of 5 parameter(s)" in guard[0].getMessage()


@pytest.mark.parametrize("make, shampoo", [(lambda ps: precond.SOAP(ps), False), (lambda ps: precond.Muon(ps), False),
                                           (lambda ps: precond.Shampoo(ps), True)], ids=["SOAP", "Muon", "Shampoo"])
def test_skip_warnings_name_the_parameter_and_advise_for_the_method(make, shampoo, caplog):
    model = Net()
    opt = make(precond.param_groups(model, head="head"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.body.weight.grad[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="precond"):
        opt.step()
        opt.preconditioner_stats()
    message = " ".join(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "'body.weight'" in message
    assert ("grafting" in message) == shampoo
