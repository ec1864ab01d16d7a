"""Property-based checks of the block layouts and of the Kronecker projections."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from precond.blocks import BlockLayout, merge_dims
from precond.kronecker import mode_product

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, max_dim=st.integers(1, 40), rule=st.sampled_from(["none", "leading", "trailing", "matrix"]),
       large=st.sampled_from(["split", "identity"]))
def test_blocks_partition_the_parameter(shape, max_dim, rule, large):
    merged = merge_dims(shape, max_dim, rule)
    assert math.prod(merged) == math.prod(shape)
    if rule in ("leading", "trailing"):
        # merging never creates a dim beyond max_dim out of dims that fit
        assert all(n <= max_dim or n in shape for n in merged)
    layout = BlockLayout.build(shape, max_dim, rule, large)
    p = torch.zeros(shape)
    for i, block in enumerate(layout.blocks(p)):
        block += i + 1                   # every element belongs to exactly one block
        if large == "split":
            assert max(block.shape) <= max_dim or len(shape) == 0
    assert bool((p > 0).all())
    assert sum(math.prod(s) for s in layout.block_shapes) == p.numel()


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), seed=st.integers(0, 10_000),
       mask=st.lists(st.booleans(), min_size=4, max_size=4))
def test_projection_round_trip_is_identity(shape, seed, mask):
    """On a bucket of 3 blocks, each with its own bases."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn((3, *shape), generator=g, dtype=torch.float64)
    bases = [torch.linalg.qr(torch.randn(3, n, n, generator=g, dtype=torch.float64))[0] if use else None
             for n, use in zip(shape, mask)]
    Y = mode_product(X, bases)
    assert Y.shape == X.shape
    torch.testing.assert_close(mode_product(Y, bases, transpose=True), X, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Y.norm(), X.norm(), rtol=1e-12, atol=0)  # orthogonal: norms kept
