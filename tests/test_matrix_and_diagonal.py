"""Muon, ASGO, Sophia and AdamW: against torch's optimizers and plain references; routing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import precond
from references import adamw as adamw_reference
from references import numpy_power


def fixed_gradients(shapes, steps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def run(make, init, grads):
    params = [nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def max_rel(a, b):
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------- Muon
MUON_SHAPES = [(8, 16), (32, 12), (24, 24)]


@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-3), (torch.float64, 1e-12)])
def test_muon_follows_torch_muon(adjust_lr_fn, dtype, tol):
    init = [torch.randn(s, dtype=dtype, generator=torch.Generator().manual_seed(0)) for s in MUON_SHAPES]
    grads = fixed_gradients(MUON_SHAPES, 20, dtype)
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    ours, _ = run(lambda ps: precond.Muon(ps, **kw), init, grads)
    ref, _ = run(lambda ps: torch.optim.Muon(ps, **kw), init, grads)
    assert max_rel(ours, ref) <= tol


def newton_schulz_reference(G, steps=5, a=3.4445, b=-4.7750, c=2.0315, eps=1e-7):
    X = G.clone()
    if X.shape[0] > X.shape[1]:
        X = X.T
    X = X / max(float(X.norm()), eps)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize("shape", [(6, 10), (4, 3, 3, 3), (20, 6), (7, 7)])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("ns_algorithm", ["standard_newton_schulz", "gram_newton_schulz"])
def test_muon_float32_matches_a_plain_reference_including_conv_weights(shape, nesterov, ns_algorithm):
    """Either iteration (the Gram one on all but the square shape) against the plain iteration written out."""
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = [g[0] for g in fixed_gradients([shape], 8, torch.float64)]
    ours, _ = run(lambda ps: precond.Muon(ps, lr=0.02, weight_decay=0.05, momentum=0.9, nesterov=nesterov,
                                          ns_dtype="float64", ns_algorithm=ns_algorithm), [W0], [[g] for g in grads])
    W, B = W0.reshape(shape[0], -1).clone(), torch.zeros(shape[0], math.prod(shape[1:]), dtype=torch.float64)
    for G in grads:
        G = G.reshape(shape[0], -1)
        B = 0.9 * B + 0.1 * G
        U = 0.1 * G + 0.9 * B if nesterov else B
        W = W * (1 - 0.02 * 0.05) - 0.02 * math.sqrt(max(1, W.shape[0] / W.shape[1])) * newton_schulz_reference(U)
    torch.testing.assert_close(ours[0].reshape(shape[0], -1), W, rtol=1e-12, atol=1e-12)


def test_muon_takes_the_gram_iteration_only_where_it_saves_flops_and_validates_its_arguments():
    from precond.preconditioners.orthogonal import uses_gram
    group = dict(ns_algorithm="gram_newton_schulz", ns_steps=5, gram_newton_schulz_restart_iterations=(2,))
    # GPT-2 small's body: qkv (768×2304), MLP (768×3072, 3072×768) yes; the square projection no
    assert [uses_gram(r, c, group) for r, c in [(2304, 768), (3072, 768), (768, 3072), (768, 768)]] == \
        [True, True, True, False]
    assert not uses_gram(768, 1024, group)  # 4/3 wide: 38.7 m³ against 36.7 m³ of the plain iteration
    assert not uses_gram(768, 3072, dict(group, ns_algorithm="standard_newton_schulz"))
    W = [nn.Parameter(torch.randn(4, 8))]
    with pytest.raises(ValueError, match="ns_algorithm"):
        precond.Muon(W, ns_algorithm="gram")
    for resets in [(0,), (5,), (2.0,)]:
        with pytest.raises(ValueError, match="gram_newton_schulz_restart_iterations"):
            precond.Muon(W, gram_newton_schulz_restart_iterations=resets)
    with pytest.raises(ValueError, match="ns_dtype"):
        precond.Muon(W, ns_dtype="float8")
    opt = precond.Muon(W, ns_algorithm="gram_newton_schulz", ns_dtype="float16")
    with pytest.raises(ValueError, match="ns_algorithm.*param group 1"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 8))], "ns_algorithm": "svd"})
    assert opt.param_groups[0]["gram_newton_schulz_restart_iterations"] == (2,)


def test_muon_routes_non_matrix_parameters_to_adamw():
    W0, b0 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    grads = fixed_gradients([(6, 4), (6,)], 10, torch.float64)
    (W, b), opt = run(lambda ps: precond.Muon(ps, lr=0.02, adamw_lr=3e-3, adamw_betas=(0.9, 0.95),
                                              adamw_weight_decay=0.01), [W0, b0], grads)
    # one group, as passed: the vector steps at lr · adamw_lr_ratio, the ratio set from adamw_lr
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["adamw_lr_ratio"] == pytest.approx(3e-3 / 0.02)
    ref = adamw_reference(b0, [g[1] for g in grads], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, wd=0.01)
    torch.testing.assert_close(b, ref[-1], rtol=1e-12, atol=1e-12)


def test_explicit_adamw_group_keeps_its_own_hyper_parameters():
    emb = nn.Parameter(torch.randn(10, 4))
    opt = precond.Muon([{"params": [emb], "matrix": False, "lr": 5e-3}, {"params": [nn.Parameter(torch.randn(4, 4))]}],
                       lr=0.02, adamw_lr=1e-3)
    assert [(g["matrix"], g["lr"]) for g in opt.param_groups] == [(False, 5e-3), (None, 0.02)]  # None: by dims


# ----------------------------------------------------------------------------------------- ASGO
def asgo_reference(W0, grads, *, lr, betas, eps, wd, left):
    W = W0.clone()
    n = W.shape[0] if left else W.shape[1]
    V, M = torch.zeros(n, n, dtype=W.dtype), torch.zeros_like(W)
    for G in grads:
        V = betas[1] * V + (1 - betas[1]) * (G @ G.T if left else G.T @ G)
        M = betas[0] * M + (1 - betas[0]) * G
        R = numpy_power(V + eps * torch.eye(n, dtype=W.dtype), -0.5)
        W = W - lr * ((R @ M if left else M @ R) + wd * W)
    return W


@pytest.mark.parametrize("shape, side, left", [((5, 8), "auto", True), ((8, 5), "auto", False), ((5, 8), "right", False)])
def test_asgo_matches_reference(shape, side, left):
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = fixed_gradients([shape], 10, torch.float64)
    (W,), _ = run(lambda ps: precond.ASGO(ps, lr=0.01, betas=(0.9, 0.95), epsilon=1e-4, weight_decay=0.1, side=side),
                  [W0], grads)
    ref = asgo_reference(W0, [g[0] for g in grads], lr=0.01, betas=(0.9, 0.95), eps=1e-4, wd=0.1, left=left)
    torch.testing.assert_close(W, ref, rtol=1e-10, atol=1e-12)


def test_asgo_newton_schulz_root_agrees_with_eigh():
    W0 = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = fixed_gradients([(6, 9)], 8, torch.float64)
    kw = dict(lr=0.01, betas=(0.9, 0.95), epsilon=1e-2, weight_decay=0.0)
    (eigh,), _ = run(lambda ps: precond.ASGO(ps, **kw), [W0], grads)
    (ns,), _ = run(lambda ps: precond.ASGO(ps, root_method="newton_schulz", ns_steps=60, **kw), [W0], grads)
    assert float((ns - eigh).norm() / (eigh - W0).norm()) < 1e-6


def test_asgo_without_momentum_is_the_polar_step_muon_approximates():
    W0 = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    G = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    (W,), _ = run(lambda ps: precond.ASGO(ps, lr=0.1, betas=(0.0, 0.0), epsilon=1e-14, weight_decay=0.0), [W0], [[G]])
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(W, W0 - 0.1 * U @ Vh, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------- Sophia
def test_sophia_gnb_estimate_and_clipped_step_match_the_formula():
    W0 = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    p = nn.Parameter(W0.clone())
    opt = precond.Sophia([p], lr=0.1, betas=(0.9, 0.8), rho=0.5, weight_decay=0.01, update_period=2)
    g1, g2, gs = (torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (8, 9, 10))
    # reference state
    M, H, W = torch.zeros_like(W0), torch.zeros_like(W0), W0.clone()
    for step, g in enumerate((g1, g2), start=1):
        p.grad = g.clone()
        opt.step()
        M = 0.9 * M + 0.1 * g
        W = W - 0.1 * 0.01 * W
        W = W - 0.1 * torch.clamp(M / torch.clamp(0.5 * H, min=1e-15), -1, 1)
        assert opt.hessian_update_due() == (step == 2)
    p.grad = gs.clone()
    opt.update_hessian(batch_size=16)
    H = 0.8 * H + 0.2 * 16 * gs * gs
    p.grad = g1.clone()
    opt.step()
    M = 0.9 * M + 0.1 * g1
    W = W - 0.1 * 0.01 * W
    W = W - 0.1 * torch.clamp(M / torch.clamp(0.5 * H, min=1e-15), -1, 1)
    torch.testing.assert_close(p.detach(), W, rtol=1e-12, atol=1e-12)


def test_sophia_hutchinson_estimates_a_diagonal_hessian_exactly():
    diag = torch.tensor([1.0, 4.0, 9.0, 0.5], dtype=torch.float64)
    p = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = precond.Sophia([p], estimator="hutchinson", betas=(0.9, 0.5))
    loss = 0.5 * (diag * p * p).sum()
    loss.backward(create_graph=True)
    opt.update_hessian()
    # u ⊙ (A u) = diag(A) for any Rademacher u when A is diagonal
    torch.testing.assert_close(opt.state[p]["hessian"], 0.5 * diag, rtol=1e-12, atol=0)


def test_sophia_gnb_needs_the_batch_size_and_hutchinson_a_graph():
    p = nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="batch_size"):
        precond.Sophia([p]).update_hessian()
    with pytest.raises(RuntimeError, match="create_graph"):
        precond.Sophia([p], estimator="hutchinson").update_hessian()


def test_sophia_lowers_a_language_model_loss_with_sampled_label_curvature():
    torch.manual_seed(0)
    vocab, dim = 12, 16
    model = nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, vocab))
    opt = precond.Sophia(model.parameters(), lr=3e-3, rho=0.05, update_period=2)
    data = torch.randint(0, vocab, (64,))
    targets = (data * 5 + 3) % vocab
    losses = []
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(data), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if opt.hessian_update_due():
            logits = model(data)
            sampled = torch.distributions.Categorical(logits=logits).sample()
            nn.functional.cross_entropy(logits, sampled).backward()
            opt.update_hessian(batch_size=data.shape[0])
            opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------- AdamW
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
def test_adamw_is_torch_adamw(dtype, tol):
    shapes = [(7,), (5, 6), (3, 4, 5)]
    init = [torch.randn(s, dtype=dtype, generator=torch.Generator().manual_seed(11)) for s in shapes]
    grads = fixed_gradients(shapes, 30, dtype)
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    ours, _ = run(lambda ps: precond.AdamW(ps, **kw), init, grads)
    ref, _ = run(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), init, grads)
    assert max_rel(ours, ref) <= tol
    plain = [adamw_reference(x, [g[i] for g in grads], lr=1e-2, betas=(0.8, 0.99), eps=1e-8, wd=0.1)[-1]
             for i, x in enumerate(init)]
    assert max_rel(ours, plain) <= tol


# -------------------------------------------------------------------------------------- routing
class TinyLM(nn.Module):
    def __init__(self, vocab=50, dim=16, tie=False):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([nn.ModuleDict({
            "ln": nn.LayerNorm(dim), "attn": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim, bias=False),
            "conv": nn.Conv1d(dim, dim, 3)}) for _ in range(2)])
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight


def test_param_groups_route_a_transformer():
    groups = precond.param_groups(TinyLM(), matrix_options={"lr": 0.02})
    by_kind = {g["matrix"]: set(g["param_names"]) for g in groups}
    assert by_kind[True] == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn", "proj", "conv")}
    assert {"wte.weight", "lm_head.weight", "norm.weight", "blocks.0.ln.weight", "blocks.0.ln.bias",
            "blocks.1.attn.bias", "blocks.1.conv.bias"} <= by_kind[False]
    assert groups[0]["lr"] == 0.02


def test_param_groups_tied_head_and_overrides():
    groups = precond.param_groups(TinyLM(tie=True), head=None, matrix_patterns=[r"^wte\."],
                                  other_patterns=[r"blocks\.1\.proj"])
    by_kind = {g["matrix"]: g["param_names"] for g in groups}
    assert "wte.weight" in by_kind[True] and "lm_head.weight" not in by_kind[True] + by_kind[False]
    assert "blocks.1.proj.weight" in by_kind[False]
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(TinyLM(tie=True).parameters()))


def test_muon_trains_a_routed_transformer_and_checkpoints():
    torch.manual_seed(0)
    model = TinyLM()
    opt = precond.Muon(precond.param_groups(model), lr=0.02, adamw_lr=3e-3)
    assert sorted(g["matrix"] for g in opt.param_groups) == [False, True]
    x = torch.randint(0, 50, (8, 6))
    for _ in range(3):
        h = model.wte(x)
        for blk in model.blocks:
            h = h + blk["proj"](blk["attn"](blk["ln"](h))[..., :16])
            h = h + blk["conv"](h.transpose(1, 2)).transpose(1, 2).mean(1, keepdim=True)
        loss = nn.functional.cross_entropy(model.lm_head(model.norm(h)).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    opt2 = precond.Muon(precond.param_groups(model), lr=0.02, adamw_lr=3e-3)
    opt2.load_state_dict(state)
    conv = model.blocks[0]["conv"].weight
    assert opt2.state[conv]["momentum_buffer"].shape == (16, 48)


@pytest.mark.parametrize("make, argument", [
    (lambda ps: precond.Muon(ps, momentum=1.0), "momentum"),
    (lambda ps: precond.Muon(ps, ns_steps=0), "ns_steps"),
    (lambda ps: precond.Muon(ps, ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
    (lambda ps: precond.Muon(ps, adjust_lr_fn="sqrt"), "adjust_lr_fn"),
    (lambda ps: precond.Muon(ps, adamw_betas=(0.9, 1.0)), r"adamw_betas\[1\]"),
    (lambda ps: precond.ASGO(ps, side="top"), "side"),
    (lambda ps: precond.ASGO(ps, epsilon=0), "epsilon"),
    (lambda ps: precond.Sophia(ps, rho=0), "rho"),
    (lambda ps: precond.Sophia(ps, estimator="fisher"), "estimator"),
    (lambda ps: precond.AdamW(ps, eps=0), "eps"),
    (lambda ps: precond.AdamW(ps, lr=float("nan")), "lr"),
])
def test_invalid_arguments_name_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"Invalid {argument}"):
        make([nn.Parameter(torch.randn(3, 3))])


@pytest.mark.parametrize("cls", [precond.Muon, precond.ASGO])
def test_add_param_group_routes_the_new_parameters(cls):
    first = nn.Linear(6, 5)
    opt = cls([first.weight], lr=0.02, adamw_lr=0.01, adamw_weight_decay=0.0)
    second = nn.Linear(5, 4)
    opt.add_param_group({"params": list(second.parameters())})
    # routed inside the group, which stays one: its vector steps at lr · adamw_lr_ratio = adamw_lr
    assert [g["matrix"] for g in opt.param_groups] == [None, None]
    assert opt.param_groups[1]["adamw_lr_ratio"] == pytest.approx(0.5)
    for p in [first.weight, *second.parameters()]:
        p.grad = torch.randn_like(p)
    before = second.bias.detach().clone()
    opt.step()
    assert "exp_avg" in opt.state[second.bias] and "exp_avg" not in opt.state[second.weight]
    # AdamW's first step moves every coordinate by lr (up to eps): the bias took the AdamW rule at adamw_lr
    torch.testing.assert_close((before - second.bias.detach()).abs(), torch.full((4,), 0.01), rtol=1e-4, atol=0)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's layer: a raw ``[in, out]`` weight on a module that is not an ``nn.Linear``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))


class TinyViT(nn.Module):
    """The head registered first, raw position table and tokens, a custom raw matrix."""

    def __init__(self, dim=16, classes=10, patches=9):
        super().__init__()
        self.head = nn.Linear(dim, classes)
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.w_mix = nn.Parameter(torch.randn(dim, dim))
        self.attn = Conv1D(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


def test_param_groups_route_raw_tables_tokens_and_a_head_registered_first():
    by_kind = {g["matrix"]: set(g["param_names"]) for g in precond.param_groups(TinyViT())}
    assert by_kind[True] == {"patch.weight", "w_mix", "attn.weight", "mlp.0.weight", "mlp.2.weight"}
    assert {"head.weight", "head.bias", "pos_embed", "cls_token", "attn.bias"} <= by_kind[False]


class Unnamed(nn.Module):
    def __init__(self, outputs=(10,)):
        super().__init__()
        self.final = nn.ModuleList(nn.Linear(32, n) for n in outputs)  # registered before the body
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32))


def test_find_head_by_output_width_and_error_when_ambiguous():
    from precond.routing import find_head
    assert find_head(Unnamed()) == {"final.0"}
    assert find_head(TinyLM(tie=False)) == {"lm_head"}
    with pytest.raises(ValueError, match=r"several candidates.*final\.0.*final\.1.*head="):
        precond.param_groups(Unnamed(outputs=(10, 12)))
    with pytest.raises(ValueError, match="no candidate"):
        precond.param_groups(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    groups = precond.param_groups(Unnamed(outputs=(10, 12)), head=r"final\.\d")
    assert {n for g in groups if not g["matrix"] for n in g["param_names"]} >= {"final.0.weight", "final.1.weight"}


def test_tied_head_is_the_head_even_when_not_named_so():
    from precond.routing import find_head

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = nn.Linear(16, 50, bias=False)
            self.tokens = nn.Embedding(50, 16)
            self.decoder.weight = self.tokens.weight
            self.proj = nn.Linear(16, 16)

    assert find_head(Tied()) == {"decoder"}


def test_muon_adamw_lr_default_is_adamw_sized():
    w, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    opt = precond.Muon([w, b], lr=0.02)
    assert [(g["lr"], g["lr"] * g["adamw_lr_ratio"]) for g in opt.param_groups] == [(0.02, pytest.approx(3e-4))]
    shared = precond.Muon([w, b], lr=1e-3, adjust_lr_fn="match_rms_adamw")
    assert [(g["lr"], g["adamw_lr_ratio"]) for g in shared.param_groups] == [(1e-3, 1.0)]


def test_muon_takes_one_coefficient_triple_per_step_in_either_iteration():
    """Per-step coefficients (Polar Express's, Amsel et al. 2025) against the plain iteration written out."""
    polar_express = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
                     (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
                     (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
                     (3.3184196573706015, -2.488488024314874, 0.51004894012372),
                     (2.300652019954817, -1.6689039845747493, 0.4188073119525673)]
    shape = (6, 20)
    W0 = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = [g[0] for g in fixed_gradients([shape], 6, torch.float64)]
    W, B = W0.clone(), torch.zeros(shape, dtype=torch.float64)
    for G in grads:
        B = 0.95 * B + 0.05 * G
        X = 0.05 * G + 0.95 * B
        X = X / X.norm()
        for a, b, c in polar_express:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        W = W * (1 - 0.02 * 0.1) - 0.02 * X
    for algorithm in ("standard_newton_schulz", "gram_newton_schulz"):
        (ours,), opt = run(lambda ps: precond.Muon(ps, lr=0.02, ns_coefficients=polar_express, ns_dtype="float64",
                                                   ns_algorithm=algorithm), [W0], [[g] for g in grads])
        torch.testing.assert_close(ours, W, rtol=1e-12, atol=1e-12)
        assert opt.param_groups[0]["ns_coefficients"] == tuple(polar_express)
    for bad in [(1.0, 2.0), polar_express[:4], [(1.0, 2.0, 3.0)] * 4 + [(1.0, 2.0)]]:
        with pytest.raises(ValueError, match="ns_coefficients"):
            precond.Muon([nn.Parameter(torch.randn(4, 8))], ns_coefficients=bad)
