"""Muon's orthogonalisation (``precond.newton_schulz``): the Gram iteration against the plain one written out
in float64, the FLOP counts against torch's counter, and the half-precision variants against float64."""

import pytest
import torch

from precond.newton_schulz import gram_newton_schulz, gram_newton_schulz_flops, newton_schulz, newton_schulz_flops

MUON_ABC = (3.4445, -4.7750, 2.0315)


def plain_newton_schulz(G, steps, a=MUON_ABC[0], b=MUON_ABC[1], c=MUON_ABC[2]):
    """Muon's quintic iteration written out, one matrix at a time, in G's dtype."""
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.mT
    X = X / torch.linalg.matrix_norm(X, keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT


@pytest.mark.parametrize("shape", [(12, 40), (40, 12), (3, 16, 48), (20, 20)])
@pytest.mark.parametrize("restarts", [(), (2,), (1, 3)])
@pytest.mark.parametrize("steps", [1, 3, 5, 7])
def test_gram_newton_schulz_equals_the_plain_iteration_in_float64(shape, restarts, steps):
    G = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(steps))
    expected = plain_newton_schulz(G, steps)
    got = gram_newton_schulz(G, steps, MUON_ABC, 1e-7, torch.float64, restart_iterations=restarts)
    assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) < 1e-12


@pytest.mark.parametrize("rows, cols", [(16, 64), (48, 16), (24, 24), (16, 40)])
@pytest.mark.parametrize("restarts", [(), (2,), (1, 3)])
def test_newton_schulz_flop_counts_are_the_products_each_iteration_runs(rows, cols, restarts):
    from torch.utils.flop_counter import FlopCounterMode
    G = torch.randn(2, rows, cols, dtype=torch.float64)
    for run, formula in ((lambda: newton_schulz(G, 5, MUON_ABC, 1e-7, torch.float64),
                          2 * newton_schulz_flops(rows, cols, 5)),
                         (lambda: gram_newton_schulz(G, 5, MUON_ABC, 1e-7, torch.float64,
                                                            restart_iterations=restarts),
                          2 * gram_newton_schulz_flops(rows, cols, 5, restarts))):
        with FlopCounterMode(display=False) as counter:
            run()
        assert counter.get_total_flops() == formula  # two matrices in the stack


def _test_matrices(m, n):
    """Gaussian, a spectrum decaying over six decades, and rank 8 plus noise: the kinds a momentum takes."""
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(m, n, dtype=torch.float64, generator=g)
    U, _ = torch.linalg.qr(torch.randn(m, m, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, m, dtype=torch.float64, generator=g))
    decaying = (U * torch.logspace(0, -6, m, dtype=torch.float64)) @ V.T
    low_rank = torch.randn(m, 8, dtype=torch.float64, generator=g) @ torch.randn(8, n, dtype=torch.float64, generator=g)
    low_rank += 1e-3 * torch.randn(m, n, dtype=torch.float64, generator=g)
    return {"gaussian": gauss, "decaying": decaying, "low rank": low_rank}


@pytest.mark.parametrize("kind", ["gaussian", "decaying", "low rank"])
def test_gram_newton_schulz_in_float16_is_closer_to_float64_than_the_bfloat16_default(kind):
    """The precision Muon pairs the Gram iteration with (its authors' float16, restart after the 2nd step) is
    at least twice as close to the float64 iteration as torch.optim.Muon's bfloat16 plain iteration; without
    the restart, float16 loses that on the ill-conditioned matrices."""
    G = _test_matrices(64, 256)[kind]
    exact = newton_schulz(G, 5, MUON_ABC, 1e-7, torch.float64)

    def error(out):
        return float(torch.linalg.norm(out.double() - exact) / torch.linalg.norm(exact))

    default = error(newton_schulz(G, 5, MUON_ABC, 1e-7, torch.bfloat16))
    gram = error(gram_newton_schulz(G, 5, MUON_ABC, 1e-7, torch.float16))
    assert gram < default / 2
    if kind != "gaussian":
        unrestarted = gram_newton_schulz(G, 5, MUON_ABC, 1e-7, torch.float16, restart_iterations=())
        assert error(unrestarted) > 2 * gram


@pytest.mark.parametrize("function", [newton_schulz, gram_newton_schulz])
def test_float16_iterations_normalise_before_the_cast(function):
    """A Frobenius norm past float16's 65504 (here ~2.6e6) would make the direction zero or NaN."""
    G = 1e4 * torch.randn(64, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = newton_schulz(G, 5, MUON_ABC, 1e-7, torch.float64)
    for given in (G, G.float(), G.to(torch.float16)):
        out = function(given, 5, MUON_ABC, 1e-7, torch.float16)
        assert out.dtype == given.dtype and torch.isfinite(out).all()
        assert float(torch.linalg.norm(out.double() - exact) / torch.linalg.norm(exact)) < 0.02
