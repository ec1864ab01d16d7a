"""Hyper-parameter transfer multipliers (precond.scaling) against the formulas, on known shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import precond
from precond_bench.model import GPT, GPTConfig
from precond.scaling import lr_multiplier, residual_multiplier, rule_of, scaled_param_groups


@pytest.mark.parametrize("role, rule, fans, expected", [
    ("hidden", "entrywise", (512, 1536, 128, 384), 128 / 512),             # 1/d_in
    ("hidden", "spectral", (512, 1536, 128, 384), 1.0),                    # √(r_out/r_in), both ×4
    ("hidden", "spectral", (512, 256, 128, 256), math.sqrt(1 / 4)),        # head-like: d_out fixed
    ("hidden", "entrywise", (512, 256, 128, 256), 1 / 4),
    ("embedding", "entrywise", (256, 512, 256, 128), 1.0),
    ("vector", "spectral", (1, 512, 1, 128), 1.0),
])
def test_lr_multiplier_formulas(role, rule, fans, expected):
    assert lr_multiplier(role, rule, *fans) == pytest.approx(expected)


def test_rules_follow_the_update_norm():
    assert rule_of("SOAP") == rule_of("AdamW") == "entrywise"
    assert rule_of("Muon") == rule_of("Shampoo") == "spectral"
    assert rule_of("Shampoo", grafting="adam") == "entrywise"
    with pytest.raises(ValueError, match="Invalid optimizer"):
        rule_of("Adagrad")
    assert residual_multiplier(12, 4) == pytest.approx(1 / 3)


def gpt(width):
    torch.manual_seed(0)
    return GPT(GPTConfig(width=width, depth=2, heads=4, context=16))


@pytest.mark.parametrize("optimizer", ["AdamW", "SOAP", "Shampoo", "Muon"])
def test_a_model_twice_as_wide_gets_the_expected_groups(optimizer):
    base, model = gpt(64), gpt(128)
    groups = scaled_param_groups(model, base, optimizer, lr=1e-2, weight_decay=0.1, adamw_lr=1e-3)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    hidden = by_name["blocks.0.mlp.up.weight"]
    head = by_name["lm_head.weight"]
    if optimizer in ("AdamW", "SOAP"):
        assert hidden["lr"] == pytest.approx(1e-2 / 2) and head["lr"] == pytest.approx(1e-2 / 2)
    else:  # spectral: both fans of a hidden matrix double; the head's output (the vocabulary) does not
        assert hidden["lr"] == pytest.approx(1e-2)
        head_lr = 1e-3 / 2 if optimizer == "Muon" else 1e-2 * math.sqrt(1 / 2)
        assert head["lr"] == pytest.approx(head_lr)
    assert by_name["embed.weight"]["lr_multiplier"] == 1.0 and by_name["norm.weight"]["lr_multiplier"] == 1.0
    # independent weight decay ∝ 1/width: lr·wd halves whatever the rate multiplier
    for g in groups:
        base_lr = 1e-3 if (optimizer == "Muon" and not g["matrix"]) else 1e-2
        assert g["lr"] * g["weight_decay"] == pytest.approx(base_lr * 0.1 / 2)
    opt = getattr(precond, optimizer)(groups, lr=1e-2)
    assert len(opt.param_groups) == len(groups)  # Muon keeps routed groups one to one
    x = torch.randint(0, 256, (2, 16))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()


def test_same_width_is_the_identity_and_mismatches_are_named():
    base = gpt(64)
    groups = scaled_param_groups(gpt(64), base, "SOAP", lr=3e-3, weight_decay=0.01)
    assert all(g["lr"] == 3e-3 and g["weight_decay"] == pytest.approx(0.01) for g in groups)
    with pytest.raises(ValueError, match="namesake"):
        scaled_param_groups(nn.Linear(4, 4), nn.Linear(4, 4, bias=False), "AdamW", lr=1e-3, head=None)


def test_normalized_rule_and_groups():
    assert rule_of("SOAP", spectral_normalize=True) == rule_of("Shampoo", "adam", True) == "normalized"
    with pytest.raises(ValueError, match="spectral_normalize"):
        rule_of("Muon", spectral_normalize=True)
    assert lr_multiplier("hidden", "normalized", 512, 1536, 128, 384) == 1.0
    assert lr_multiplier("embedding", "normalized", 512, 256, 128, 256) == 4.0  # [vocab, width]: width/base
    base, model = gpt(64), gpt(128)
    groups = scaled_param_groups(model, base, "SOAP", lr=1e-2, weight_decay=0.1, spectral_normalize=True)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert all(g["spectral_normalize"] for g in groups)
    assert by_name["blocks.0.mlp.up.weight"]["lr"] == by_name["lm_head.weight"]["lr"] == 1e-2
    assert by_name["embed.weight"]["lr"] == pytest.approx(2e-2)


def _deltas(make, shape, steps=4, seed=0):
    """The parameter's change at each step under ``make``, fed the same gradients (independent of W)."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    w = w0.clone().requires_grad_(True)
    opt = make([w])
    out, before = [], w0.clone()
    for g in grads:
        w.grad = g.clone()
        opt.step()
        out.append(w.detach() - before)
        before = w.detach().clone()
    return out


@pytest.mark.parametrize("name, kwargs", [
    ("SOAP", dict(precondition_frequency=2, max_precond_dim=6, large_dim_policy="split")),
    ("Shampoo", dict(grafting="adam", precondition_frequency=2, max_preconditioner_dim=6)),
    ("EShampoo", dict(precondition_frequency=2, max_preconditioner_dim=6)),
])
@pytest.mark.parametrize("shape", [(5, 9), (4, 3, 5), (7,)])
def test_spectral_normalize_rescales_each_block_to_the_spectral_condition(name, kwargs, shape):
    lr = 0.05
    cls = getattr(precond, name)
    plain = _deltas(lambda p: cls(p, lr=lr, weight_decay=0.0, **kwargs), shape)
    normed = _deltas(lambda p: cls(p, lr=lr, weight_decay=0.0, spectral_normalize=True, **kwargs), shape)
    probe = cls([torch.zeros(shape, requires_grad=True)], **kwargs)
    layout = probe._layout(torch.zeros(shape), probe.param_groups[0])
    for step, (d_plain, d_norm) in enumerate(zip(plain, normed)):
        if len(shape) == 1:  # vectors are left alone
            torch.testing.assert_close(d_norm, d_plain, rtol=0, atol=0)
            continue
        if name == "SOAP" and step == 0:  # SOAP's first step only builds its basis
            assert d_plain.abs().sum() == d_norm.abs().sum() == 0
            continue
        for b_plain, b_norm in zip(layout.blocks(d_plain.contiguous()), layout.blocks(d_norm.contiguous())):
            m = b_plain.reshape(b_plain.shape[0], -1)
            expected = lr * math.sqrt(m.shape[0] / m.shape[1]) * b_plain / torch.linalg.matrix_norm(m, ord=2)
            torch.testing.assert_close(b_norm, expected, rtol=1e-2, atol=1e-12)  # the norm is estimated
