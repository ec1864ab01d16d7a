"""Merging and splitting parameters into blocks."""

import math

import pytest
import torch

from precond.blocks import BlockLayout, merge_dims


@pytest.mark.parametrize("shape, max_dim, expected", [
    ((1, 2, 5, 1), 10, (10,)),           # Distributed Shampoo's documented examples
    ((1, 2, 5, 1), 1, (2, 5)),
    ((32, 3, 64, 64), 8192, (96, 4096)),
    ((8, 16), 1024, (128,)),
    ((), 1024, (1,)),
    ((1, 1), 4, (1,)),
])
def test_trailing_merge(shape, max_dim, expected):
    assert merge_dims(shape, max_dim, "trailing") == expected


@pytest.mark.parametrize("shape, max_dim, expected", [
    ((4, 3, 3, 3), 30, (12, 9)),         # 4·3 = 12, ·3 = 36 > 30: close 12; 3·3 = 9
    ((64, 3, 5, 5), 10000, (4800,)),
    ((100, 200), 50, (100, 200)),        # each alone already exceeds: kept as they are
    ((2, 3), 6, (6,)),
])
def test_leading_merge(shape, max_dim, expected):
    assert merge_dims(shape, max_dim, "leading") == expected


def test_unknown_merge_rule_is_rejected():
    with pytest.raises(ValueError, match="merge rule"):
        merge_dims((2, 3), 4, "sideways")


def test_split_layout_covers_the_parameter_and_writes_through():
    layout = BlockLayout.build((20, 6), 8, "none", "split")
    assert layout.block_shapes == ((8, 6), (8, 6), (4, 6))
    p = torch.zeros(20, 6)
    for i, block in enumerate(layout.blocks(p)):
        block.fill_(i + 1)
    assert torch.equal(p[:8], torch.full((8, 6), 1.0))
    assert torch.equal(p[16:], torch.full((4, 6), 3.0))


def test_identity_layout_keeps_long_dims_unpreconditioned():
    layout = BlockLayout.build((20, 6), 8, "none", "identity")
    assert layout.block_shapes == ((20, 6),)
    assert layout.preconditioned_dims(0, precondition_1d=False) == (False, True)


def test_one_dimensional_parameters_get_a_factor_only_on_request():
    layout = BlockLayout.build((9,), 1024, "trailing", "split")
    assert layout.preconditioned_dims(0, precondition_1d=False) == (False,)
    assert layout.preconditioned_dims(0, precondition_1d=True) == (True,)
    merged = BlockLayout.build((3, 3), 1024, "trailing", "split")   # a matrix merged into one dim keeps its factor
    assert merged.view_shape == (9,) and merged.preconditioned_dims(0, precondition_1d=False) == (True,)


def test_infinite_max_dim_never_splits():
    layout = BlockLayout.build((5000, 3), math.inf, "none", "split")
    assert layout.block_shapes == ((5000, 3),)


# ---------------------------------------------------------------------------------- memory guard
@pytest.mark.parametrize("shape, merge, ratio, view, dims", [
    ((32, 32), "trailing", 64.0, (32, 32), (True, True)),       # merging would give one 1024² factor
    ((32, 32), "trailing", math.inf, (1024,), (True,)),          # Distributed Shampoo's layout
    ((8, 8), "trailing", 64.0, (64,), (True,)),                 # 64² = 64·64: within the ratio
    ((64, 3, 3, 3), "leading", 64.0, (192, 9), (True, True)),   # 576² > 64·1728: the merge stops at 192
    ((1, 5000), "trailing", 64.0, (5000,), (False,)),           # blocks of 1024 elements, no 1024² factor
    ((4096, 16), "trailing", 64.0, (4096, 16), (True, True)),   # 1024² = 64·(1024·16): kept
    ((4096, 8), "trailing", 64.0, (4096, 8), (False, True)),    # 1024² > 64·(1024·8): the long dim is not
])
def test_memory_guard_bounds_every_factor(shape, merge, ratio, view, dims):
    layout = BlockLayout.build(shape, 1024, merge, "split", ratio)
    assert layout.view_shape == view
    assert layout.preconditioned_dims(0, precondition_1d=False) == dims
    for b, block in enumerate(layout.block_shapes):
        for n, use in zip(block, layout.preconditioned_dims(b, False)):
            assert not use or n * n <= ratio * math.prod(block)
