import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_prune.masks.selection import prune_lowest_


def reference(scores, keep, k):
    """Sort-based reference: clear the k lowest kept scores, ties to the earliest (tensor, flat index)."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    kept = torch.cat([m.reshape(-1) for m in keep])
    idx = torch.nonzero(kept).squeeze(1)
    order = torch.sort(flat[idx], stable=True).indices[:k]
    out = kept.clone()
    out[idx[order]] = False
    return out


@st.composite
def problems(draw):
    n = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))) for _ in range(n)]
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    tied = draw(st.booleans())  # few distinct values: many ties
    scores = [
        (torch.randint(-3, 4, s, generator=g) * 0.25 if tied else torch.randn(s, generator=g)).to(dtype) for s in shapes
    ]
    keep = [torch.rand(s, generator=g) > draw(st.floats(0, 0.9)) for s in shapes]
    kept = sum(int(m.sum()) for m in keep)
    k = draw(st.integers(0, kept))
    chunk = draw(st.sampled_from([5, 64, 1 << 22]))
    return scores, keep, k, chunk


@settings(max_examples=150, deadline=None)
@given(problems())
def test_matches_sort_reference_with_ties(problem):
    scores, keep, k, chunk = problem
    expected = reference(scores, keep, k)
    before = [m.clone() for m in keep]
    prune_lowest_(scores, keep, k, chunk_size=chunk)
    got = torch.cat([m.reshape(-1) for m in keep])
    assert torch.equal(got, expected)
    assert sum(int(b.sum() - m.sum()) for b, m in zip(before, keep)) == k
    assert all(not (m & ~b).any() for b, m in zip(before, keep)), "a pruned entry was revived"


def test_transform_scores_chunkwise_without_copying_the_input():
    w = torch.tensor([[-4.0, 0.5], [3.0, -0.25]])
    keep = [torch.ones_like(w, dtype=torch.bool)]
    prune_lowest_([w], keep, 2, transform=torch.Tensor.abs_)
    assert keep[0].tolist() == [[True, False], [True, False]]
    assert w.tolist() == [[-4.0, 0.5], [3.0, -0.25]]


def test_negative_zero_ties_with_zero_and_order_decides():
    scores = [torch.tensor([0.0, -0.0, 0.0, -1.0])]
    keep = [torch.ones(4, dtype=torch.bool)]
    prune_lowest_(scores, keep, 2)
    assert keep[0].tolist() == [False, True, True, False]


def test_tensor_above_two_to_the_24_elements():
    n = (1 << 24) + 12345
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)
    x[::1000] = 0.5  # a large tie group
    k = round(0.9 * n)
    keep = [torch.ones(n, dtype=torch.bool)]
    prune_lowest_([x], keep, k, transform=torch.Tensor.abs_)
    assert int((~keep[0]).sum()) == k
    kth = torch.kthvalue(x.abs(), k).values
    assert bool((x.abs()[~keep[0]] <= kth).all()) and bool((x.abs()[keep[0]] >= kth).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_raise_and_leave_masks_untouched(bad):
    scores = [torch.tensor([1.0, bad, 2.0])]
    keep = [torch.ones(3, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"'fc\.weight' contain NaN or infinite"):
        prune_lowest_(scores, keep, 1, names=["fc.weight"])
    assert keep[0].all()


def test_bad_k_and_shapes():
    s, m = [torch.ones(3)], [torch.ones(3, dtype=torch.bool)]
    with pytest.raises(ValueError, match="only 3 are still kept"):
        prune_lowest_(s, m, 4)
    with pytest.raises(ValueError, match="negative"):
        prune_lowest_(s, m, -1)
    with pytest.raises(ValueError, match="shape"):
        prune_lowest_([torch.ones(2)], m, 1)
    with pytest.raises(TypeError, match="bool"):
        prune_lowest_(s, [torch.ones(3)], 1)
    with pytest.raises(TypeError, match="floating-point"):
        prune_lowest_([torch.ones(3, dtype=torch.int64)], m, 1)
