"""Float32 matmul precision modes: the TF32 split is exact, and three emulated TF32 passes reach float32
accuracy where one pass stays at TF32's (the tensor cores are emulated: each input is cut to TF32's 10
mantissa bits and the product taken in float64)."""

import pytest
import torch

import precond
from precond import precision


def tf32_product(a, b):
    """One TF32 tensor-core product: inputs cut to 10 mantissa bits, exact products, float32 result."""
    cut = lambda x: precision.split_tf32(x)[0].double()  # noqa: E731
    return (cut(a) @ cut(b)).float()


def relative_error(got, exact):
    return float(torch.linalg.vector_norm(got.double() - exact) / torch.linalg.vector_norm(exact))


def test_split_is_exact_and_its_high_part_fits_tf32():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-20, 20, 4096)
    hi, lo = precision.split_tf32(x)
    assert torch.equal(hi + lo, x)
    assert torch.all(hi.view(torch.int32) & ((1 << 13) - 1) == 0)  # the 13 mantissa bits TF32 drops are zero
    assert torch.all(lo.abs() <= 2.0**-10 * x.abs())
    assert torch.all(torch.sign(hi) == torch.sign(x))


@pytest.mark.parametrize("shape", [(96, 80, 64), (3, 128, 128, 128)])
def test_three_tf32_passes_reach_float32_accuracy(shape):
    g = torch.Generator().manual_seed(1)
    *batch, m, k, n = shape
    a = torch.randn(*batch, m, k, generator=g) * torch.logspace(0, -3, k)  # columns of decaying scale
    b = torch.randn(*batch, k, n, generator=g)
    exact = a.double() @ b.double()
    one_pass = relative_error(tf32_product(a, b), exact)
    three_pass = relative_error(precision.three_pass_matmul(a, b, tf32_product), exact)
    ieee = relative_error(a @ b, exact)
    assert one_pass > 1e-4  # TF32 alone: ~2⁻¹¹
    assert three_pass < 4 * ieee + 1e-6  # float32's own rounding, within a few roundings
    assert three_pass < one_pass / 100


def test_modes_restore_what_they_change_and_a_cpu_product_is_plain():
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    before = torch.backends.cuda.matmul.fp32_precision
    for mode in precision.TF32_MODES:
        with precision.tf32_matmuls(mode):
            assert torch.equal(precision.matmul(a, b), a @ b)  # no TF32 off CUDA: every mode is the product
        assert torch.backends.cuda.matmul.fp32_precision == before
    with pytest.raises(KeyError), precision.tf32_matmuls("3x"):
        raise KeyError("leaves the block")
    assert not precision._three_pass


@pytest.mark.parametrize("make", [precond.SOAP, precond.EShampoo, precond.Shampoo])
def test_the_tf32_option_names_itself_when_wrong(make):
    p = torch.nn.Parameter(torch.randn(4, 4))
    make([p], tf32="3x")
    with pytest.raises(ValueError, match="tf32"):
        make([p], tf32="2x")


@pytest.mark.parametrize("shape", [(6, 9, 5), (3, 6, 9, 5), (2, 2, 6, 9, 5)])
def test_matmul_add_sums_in_place_like_add_of_the_product(shape):
    g = torch.Generator().manual_seed(2)
    *batch, m, k, n = shape
    a = torch.randn(*batch, m, k, generator=g, dtype=torch.float64)
    b = torch.randn(*batch, n, k, generator=g, dtype=torch.float64).mT  # strided, as the factor update's Gᵀ
    out = torch.randn(*batch, m, n, generator=g, dtype=torch.float64)
    expected = out + 0.25 * (a @ b)
    storage = out.data_ptr()
    assert precision.matmul_add_(out, a, b, alpha=0.25) is out and out.data_ptr() == storage
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)


def test_matmul_add_in_three_passes_adds_every_pass(monkeypatch):
    """The "3x" branch on the CPU (plain products stand in for the tensor cores): the three partial
    products, each scaled by alpha, add up to alpha·ab but for the dropped a_lo·b_lo (< 2⁻²⁰ relative)."""
    g = torch.Generator().manual_seed(3)
    a, b, out = torch.randn(4, 32, 48, generator=g), torch.randn(4, 48, 16, generator=g), torch.randn(4, 32, 16)
    expected = out.double() + 0.5 * (a.double() @ b.double())
    monkeypatch.setattr(precision, "_three_pass_wanted", lambda x, y: True)
    precision.matmul_add_(out, a, b, alpha=0.5)
    assert relative_error(out, expected) < 1e-6
    monkeypatch.setattr(precision, "split_tf32", lambda x: (x, torch.zeros_like(x)))  # all in "hi": one pass
    single = torch.zeros(4, 32, 16)
    precision.matmul_add_(single, a, b, alpha=0.5)
    torch.testing.assert_close(single, 0.5 * (a @ b))


def test_matmul_epsilon_follows_the_tf32_mode():
    """TF32's spacing only for a CUDA float32 product while TF32 is on; the flag is read through either API."""
    assert not precision._tf32_on()
    for mode, on in ((True, True), ("3x", False), (False, False)):
        with precision.tf32_matmuls(mode):
            assert precision._tf32_on() is on
            assert precision.matmul_epsilon(torch.ones(2)) == torch.finfo(torch.float32).eps  # CPU: float32
            assert precision.matmul_epsilon(torch.ones(2, dtype=torch.float64)) == torch.finfo(torch.float64).eps
    assert not precision._tf32_on()


def test_cholesky_qr_under_tf32_judges_orthonormality_at_tf32s_rounding(monkeypatch):
    """Under TF32 products a CholeskyQR basis is orthonormal to TF32's rounding, not float32's: judged by
    float32's tolerance every matrix failed (and fell back to Householder QR); judged by TF32's, the
    well-conditioned one passes and the one past float32's reach (condition 1e8) still fails."""
    from precond import linalg
    from test_linalg import power_step_and_random

    X = power_step_and_random(torch.float32)
    monkeypatch.setattr(linalg, "matmul", tf32_product)
    assert linalg.cholesky_qr(X)[1].tolist() == [False, False]  # float32's test of a TF32 result
    monkeypatch.setattr(linalg, "matmul_epsilon", lambda x: 2.0**-10)
    Q, ok = linalg.cholesky_qr(X)
    assert ok.tolist() == [False, True]
    n = X.shape[-1]
    Qd = Q[1].double()
    residual = float(torch.linalg.matrix_norm(Qd.T @ Qd - torch.eye(n, dtype=torch.float64)))
    assert 64 * n**0.5 * torch.finfo(torch.float32).eps < residual < 2 * n**0.5 * 2.0**-10  # TF32's, not float32's
