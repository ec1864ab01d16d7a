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
