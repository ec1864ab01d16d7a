"""Hyper-parameter transfer multipliers (precond.scaling) against the formulas, on known shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import precond
from precond.bench.model import GPT, GPTConfig
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
