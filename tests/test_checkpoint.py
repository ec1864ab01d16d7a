"""Flat optimizer state: torch.save with weights_only, and torch.distributed.checkpoint, plain and flattened.

Each optimizer trains a few steps, is checkpointed, trains on; a fresh model and optimizer restored from the
checkpoint must then follow the same trajectory bit for bit.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

import precond
from test_optimizer_contract import FACTORIES, NAMES, batch


def model(seed=0):
    """A small model with a conv weight, a matrix longer than the block size (blocks), biases and a norm."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(12, 12),
                               torch.nn.LayerNorm(12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def train(net, opt, steps, seed):
    for i in range(steps):
        x, y = batch(seed + i)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x.view(32, 2, 3)), y)
        loss.backward()
        opt.step()
        if isinstance(opt, precond.Sophia) and opt.hessian_update_due():
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x.view(32, 2, 3)), y).backward()
            opt.update_hessian(batch_size=32)
    opt.zero_grad()


def make(name, params):
    kw = {"update_period": 2} if name == "Sophia" else {}
    return FACTORIES[name](params, **kw)


def trajectory_after_resume(make_optimizer, save, load):
    """Trains, saves, trains on; then restores a fresh pair and trains on. Returns both parameter lists.
    ``make_optimizer(params)`` builds the optimizer."""
    net = model()
    opt = make_optimizer(net.parameters())
    train(net, opt, 6, seed=0)
    saved = save(net, opt)
    train(net, opt, 5, seed=50)
    fresh = model(seed=1)
    fresh_opt = make_optimizer(fresh.parameters())
    load(fresh, fresh_opt, saved)
    train(fresh, fresh_opt, 5, seed=50)
    return list(net.parameters()), list(fresh.parameters())


def torch_save(net, opt):
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optim": opt.state_dict()}, buffer)
    return buffer.getvalue()


def torch_load(net, opt, saved):
    checkpoint = torch.load(io.BytesIO(saved), weights_only=True)
    net.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optim"])


def dcp_pair(tmp_path, flatten):
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    def save(net, opt):
        state = {"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt, options=options)}
        dcp.save(state, checkpoint_id=tmp_path)
        return tmp_path

    def load(net, opt, path):
        state = {"model": net.state_dict(), "optim": get_optimizer_state_dict(net, opt, options=options)}
        dcp.load(state, checkpoint_id=path)
        net.load_state_dict(state["model"])
        set_optimizer_state_dict(net, opt, state["optim"], options=options)

    return save, load


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("how", ["torch.save", "dcp", "dcp-flattened"])
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_resumes_bit_identically(name, how, tmp_path):
    if how == "torch.save":
        save, load = torch_save, torch_load
    else:
        save, load = dcp_pair(tmp_path, flatten=how == "dcp-flattened")
    ours, resumed = trajectory_after_resume(lambda params: make(name, params), save, load)
    for a, b in zip(ours, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_flat_tensors_per_parameter(name):
    """The layout torch.optim tools expect: per parameter, a dict of tensors (no lists, no nesting)."""
    net = model()
    opt = make(name, net.parameters())
    train(net, opt, 3, seed=0)
    state = opt.state_dict()["state"]
    assert len(state) == len(list(net.parameters()))
    for entry in state.values():
        assert entry and all(isinstance(v, torch.Tensor) for v in entry.values())


def test_adamw_state_uses_torch_names():
    net = model()
    opt = precond.AdamW(net.parameters())
    train(net, opt, 2, seed=0)
    ours = opt.state_dict()["state"][0]
    reference = torch.optim.AdamW(net.parameters())
    train(net, reference, 1, seed=0)
    assert set(reference.state_dict()["state"][0]) <= set(ours)
    assert ours["step"].dtype == torch.float32 and float(ours["step"]) == 2.0


def test_a_checkpoint_saved_before_the_fallbacks_counter_loads_with_it_at_zero():
    """Factor counters saved five wide (before ``fallbacks``) load and end in a zero; the rest is unchanged."""
    net = model()
    opt = precond.SOAP(net.parameters(), lr=0.01, precondition_frequency=2)
    train(net, opt, 4, seed=0)
    saved = opt.state_dict()
    old = {k: {n: (v[:5] if n.rsplit(".", 1)[-1].startswith("stats") else v) for n, v in s.items()}
           for k, s in saved["state"].items()}
    assert any(n.endswith("stats0") and v.shape == (5,) for s in old.values() for n, v in s.items())
    fresh = precond.SOAP(model().parameters(), lr=0.01, precondition_frequency=2)
    fresh.load_state_dict({"state": old, "param_groups": saved["param_groups"]})
    for want, got in zip(opt.preconditioner_stats()["factors"], fresh.preconditioner_stats()["factors"], strict=True):
        assert got == {**want, "fallbacks": 0, "cholesky_failures": 0}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("how", ["torch.save", "dcp"])
def test_shampoo_with_refined_roots_resumes_its_bases_bit_identically(how, tmp_path):
    """``root_method="refine"`` keeps an eigenbasis per factor beside its root: saved at step 6 (after the
    first, eigh, refresh at step 2 and refined ones at 4 and 6), resumed, refined on from it."""
    save, load = (torch_save, torch_load) if how == "torch.save" else dcp_pair(tmp_path, flatten=False)
    ours, resumed = trajectory_after_resume(
        lambda params: FACTORIES["Shampoo"](params, root_method="refine", precondition_frequency=2), save, load)
    for a, b in zip(ours, resumed):
        assert torch.equal(a, b)


def test_power_qr_skipping_resumes_with_the_counters_that_choose_it():
    """SOAP refreshing every step on gradients whose rows and columns span four decades (factors past
    float32's CholeskyQR): each factor fails at its first power-QR refresh, takes the retry without trying
    on the next two, then passes again; saved after 4 steps (mid-way) and resumed, the next 5 steps equal
    the uninterrupted run's bit for bit, counters included."""
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.logspace(0, -4, 12), torch.logspace(0, -4, 10)
    grads = [rows[:, None] * torch.randn(12, 10, generator=g) * cols for _ in range(9)]

    def run(opt, weight, steps):
        for G in steps:
            weight.grad = G.clone()
            opt.step()

    whole_w = torch.nn.Parameter(torch.zeros(12, 10))
    whole = precond.SOAP([whole_w], lr=0.01, precondition_frequency=1)
    run(whole, whole_w, grads)
    counts = whole.preconditioner_stats()["factors"]
    assert [(f["refreshes"], f["cholesky_failures"], f["fallbacks"]) for f in counts] == [(9, 1, 3)] * 2

    first_w = torch.nn.Parameter(torch.zeros(12, 10))
    first = precond.SOAP([first_w], lr=0.01, precondition_frequency=1)
    run(first, first_w, grads[:4])
    saved = copy.deepcopy(first.state_dict())
    resumed_w = torch.nn.Parameter(first_w.detach().clone())
    resumed = precond.SOAP([resumed_w], lr=0.01, precondition_frequency=1)
    resumed.load_state_dict(saved)
    run(resumed, resumed_w, grads[4:])
    assert torch.equal(resumed_w, whole_w)
    assert resumed.preconditioner_stats()["factors"] == counts
