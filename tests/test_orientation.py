"""Matrices stored ``(fan_in, fan_out)``, as Hugging Face's ``Conv1D`` keeps GPT-2's weights: every rule that
reads a matrix's orientation (Muon's shape factor, ASGO's side, spectral normalisation, the scaling rules)
must treat such a weight as the transpose of the ``nn.Linear`` weight it computes the same layer as."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import precond
from precond.linalg import spectral_normalize
from precond.newton_schulz import newton_schulz
from precond.scaling import scaled_param_groups

transformers = pytest.importorskip("transformers")


def gpt2(width: int, inner: int) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=width, n_inner=inner, n_head=2, vocab_size=17, n_positions=8)
    return transformers.GPT2LMHeadModel(config)


def test_param_groups_marks_conv1d_weights_transposed_and_only_them():
    model = gpt2(16, 48)
    groups = precond.param_groups(model)
    transposed = [g for g in groups if g.get("transposed")]
    assert len(transposed) == 1 and transposed[0]["matrix"] is True
    conv1d = {f"{name}.weight" for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert set(transposed[0]["param_names"]) == conv1d and len(conv1d) == 4
    # biases of those modules, the tied head and the norms are in the AdamW group, unmarked
    others = [g for g in groups if not g.get("transposed")]
    assert all(not g["matrix"] for g in others)


def muon_update(weight: torch.Tensor, grad: torch.Tensor, transposed: bool, **options) -> torch.Tensor:
    p = nn.Parameter(weight.clone())
    opt = precond.Muon([{"params": [p], "matrix": True, "transposed": transposed}], lr=0.1, weight_decay=0.0,
                       ns_dtype="float64", **options)
    p.grad = grad.clone()
    opt.step()
    return (p - weight).detach()


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_update_of_a_transposed_weight_is_the_transpose_of_the_linear_one(adjust_lr_fn):
    g = torch.Generator().manual_seed(1)
    w, grad = (torch.randn(256, 64, dtype=torch.float64, generator=g) for _ in range(2))  # stored (in, out)
    stored = muon_update(w, grad, True, adjust_lr_fn=adjust_lr_fn)
    linear = muon_update(w.T.contiguous(), grad.T.contiguous(), False, adjust_lr_fn=adjust_lr_fn)
    torch.testing.assert_close(stored, linear.T, rtol=1e-9, atol=1e-12)
    # against -lr·r·NS(Gᵀ)ᵀ with r the shape factor of a (fan_out=64, fan_in=256) matrix: 1 or 0.2·√256
    # (read off the stored shape it would be 2 or the same 0.2·√256)
    factor = 1.0 if adjust_lr_fn is None else 0.2 * math.sqrt(256)
    orthogonal = newton_schulz(grad.T.unsqueeze(0), 5, (3.4445, -4.7750, 2.0315), 1e-7, torch.float64)[0]
    torch.testing.assert_close(stored, -0.1 * factor * orthogonal.T, rtol=1e-9, atol=1e-12)


def test_issue_repro_two_orientations_get_the_same_update_rms():
    """``(1024, 256)`` fed ``G`` and ``(256, 1024)`` fed ``Gᵀ``, the first marked as stored (in, out): one layer
    in two layouts, so one update RMS (it differed by 2× when the factor was read off the raw shape)."""
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(1024, 256, generator=g)
    a = muon_update(torch.zeros(1024, 256), grad, True)
    b = muon_update(torch.zeros(256, 1024), grad.T.contiguous(), False)
    assert float(a.pow(2).mean().sqrt()) == pytest.approx(float(b.pow(2).mean().sqrt()), rel=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_asgo_side_names_the_output_side_for_transposed_weights(side):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, dtype=torch.float64, generator=g)  # stored (in=24, out=40)
    grads = [torch.randn(24, 40, dtype=torch.float64, generator=g) for _ in range(3)]

    def run(weight, transposed, gs):
        p = nn.Parameter(weight.clone())
        opt = precond.ASGO([{"params": [p], "matrix": True, "transposed": transposed}], lr=0.01, side=side)
        for grad in gs:
            p.grad = grad.clone()
            opt.step()
        return p.detach()

    stored = run(w, True, grads)
    linear = run(w.T.contiguous(), False, [x.T.contiguous() for x in grads])
    torch.testing.assert_close(stored, linear.T, rtol=1e-10, atol=1e-12)


def test_spectral_normalize_reads_transposed_blocks_as_in_by_out():
    g = torch.Generator().manual_seed(4)
    stack = torch.randn(3, 96, 32, dtype=torch.float64, generator=g)  # stored [d_in=96, d_out=32]
    out = spectral_normalize(stack, iterations=200, transposed=True)
    norms = torch.linalg.matrix_norm(out, ord=2)
    torch.testing.assert_close(norms, torch.full((3,), math.sqrt(32 / 96), dtype=torch.float64), rtol=1e-6, atol=0)


def test_scaling_rules_read_conv1d_fans_from_the_module():
    """Only the MLP's input width grows (32 → 64; its inner width stays 128): ``c_fc``, stored (in, out), has
    r_in = 2, r_out = 1, so Muon's spectral rule gives √(1/2) and the entrywise rule (SOAP) 1/2; ``mlp.c_proj``
    (in 128, out 64) has r_in = 1, r_out = 2: √2 and 1. Read off the raw shapes they would swap."""
    base, model = gpt2(32, 128), gpt2(64, 128)
    for optimizer, c_fc, c_proj in (("Muon", math.sqrt(0.5), math.sqrt(2.0)), ("SOAP", 0.5, 1.0)):
        groups = scaled_param_groups(model, base, optimizer, lr=1.0)
        multiplier = {name: g["lr_multiplier"] for g in groups for name in g["param_names"]}
        assert multiplier["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(c_fc)
        assert multiplier["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(c_proj)
        assert all(g.get("transposed") for g in groups if "transformer.h.0.mlp.c_fc.weight" in g["param_names"])
