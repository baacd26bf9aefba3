"""One-shot methods on single layers: Wanda against the paper's formula, SparseGPT against a plain dense OBS
reference and against magnitude and Wanda on reconstruction error, exact counts and N:M validity, OWL."""

from __future__ import annotations

import pytest
import torch
from _oneshot_models import correlated_inputs

from lightning_prune.oneshot import OWL, InputCovariance, Magnitude, SparseGPT, Wanda, build_method
from lightning_prune.oneshot.base import check_layer_target
from lightning_prune.oneshot.owl import exact_targets
from lightning_prune.oneshot.statistics import ColumnSquares
from lightning_prune.structures import Unstructured
from lightning_prune.structures.nm import NMStructure

NM = {"2:4": NMStructure(2, 4), "4:8": NMStructure(4, 8)}


def statistic_for(method, x: torch.Tensor, batches: int = 4):
    stat = method.statistic(x.shape[1], x.device)
    if stat is not None:
        for chunk in x.chunk(batches):
            stat.add_(chunk)
    return stat


def prune(method, w: torch.Tensor, x: torch.Tensor, structure, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    pruned = w.clone()
    keep = method.prune_("layer", pruned, statistic_for(method, x), structure, sparsity)
    return pruned, keep


def layer(rows: int, cols: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------ Wanda
def wanda_reference(w: torch.Tensor, x: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None):
    """The paper's formula, directly: S = |W| * ||X_j||_2, the lowest of each row (or of each group of m) go."""
    score = w.abs() * torch.linalg.vector_norm(x, dim=0)
    keep = torch.ones_like(w, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        groups = score.reshape(w.shape[0], -1, m)
        idx = torch.argsort(groups, dim=-1, stable=True)[..., :n]
        keep.view(w.shape[0], -1, m).scatter_(-1, idx, False)
        return keep
    k = round(sparsity * w.numel())
    for r in range(w.shape[0]):
        k_row = k // w.shape[0] + (1 if r < k % w.shape[0] else 0)
        keep[r, torch.argsort(score[r], stable=True)[:k_row]] = False
    return keep


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7, 0.33])
def test_wanda_masks_equal_the_papers_formula(sparsity):
    x = correlated_inputs(256, 48, seed=1)
    w = layer(24, 48, seed=2)
    pruned, keep = prune(Wanda(), w, x, Unstructured(), sparsity)
    assert torch.equal(keep, wanda_reference(w, x, sparsity, None))
    assert torch.equal(pruned, w * keep)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_wanda_nm_masks_equal_the_papers_formula(pattern):
    x = correlated_inputs(128, 64, seed=3)
    w = layer(16, 64, seed=4)
    structure = NM[pattern]
    _, keep = prune(Wanda(), w, x, structure, structure.n / structure.m)
    assert torch.equal(keep, wanda_reference(w, x, None, (structure.n, structure.m)))


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_ties_go_to_the_earlier_column_as_a_stable_sort(pattern):
    g = torch.Generator().manual_seed(19)
    w = torch.randint(-2, 3, (9, 32), generator=g).double()  # many equal scores, zeros among them
    x = torch.ones(4, 32, dtype=torch.float64)
    structure = NM[pattern] if pattern else Unstructured()
    nm = (structure.n, structure.m) if pattern else None
    for sparsity in [0.5] if pattern else [0.3, 0.5, 0.71]:
        _, keep = prune(Wanda(), w, x, structure, sparsity)
        assert torch.equal(keep, wanda_reference(w, x, sparsity, nm)), sparsity


def test_wanda_differs_from_magnitude_where_inputs_are_large():
    x = correlated_inputs(256, 32, seed=5)
    w = layer(16, 32, seed=6)
    _, wanda = prune(Wanda(), w, x, Unstructured(), 0.5)
    _, magnitude = prune(Magnitude(), w, x, Unstructured(), 0.5)
    assert not torch.equal(wanda, magnitude)
    assert wanda[:, :2].float().mean() > magnitude[:, :2].float().mean()  # the large (outlier) inputs are kept


# ------------------------------------------------------------------------------------------------ SparseGPT
def obs_reference(w, x, sparsity, nm, blocksize, damping=0.01):
    """SparseGPT without lazy batching or Cholesky: the exact sequential OBS update, column by column, with the
    inverse Hessian of the remaining columns computed directly, and the mask chosen every `blocksize` columns (or
    every m columns for N:M) from the saliency w^2 / [H_F^-1]_00."""
    w = w.clone().double()
    h = x.double().t() @ x.double()
    h.diagonal()[h.diagonal() == 0] = 1.0
    h += damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)

    def inv00(j):
        return torch.linalg.inv(h[j:, j:])[0, 0]

    for i in range(cols):
        if nm is None and i % blocksize == 0:
            j2 = min(i + blocksize, cols)
            d = torch.stack([inv00(j) for j in range(i, j2)])
            scores = (w[:, i:j2] ** 2 / d).flatten()
            k = round(sparsity * rows * j2) - round(sparsity * rows * i)
            block = keep[:, i:j2].clone().flatten()
            block[torch.argsort(scores, stable=True)[:k]] = False
            keep[:, i:j2] = block.view(rows, j2 - i)
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            d = torch.stack([inv00(j) for j in range(i, i + m)])
            scores = w[:, i : i + m] ** 2 / d
            idx = torch.argsort(scores, dim=1, stable=True)[:, :n]
            keep[:, i : i + m].scatter_(1, idx, False)
        hinv = torch.linalg.inv(h[i:, i:])
        q = w[:, i] * keep[:, i]
        err = (w[:, i] - q) / hinv[0, 0]
        w[:, i:] -= err[:, None] * hinv[0][None, :]
        w[:, i] = q
    return w, keep


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("blocksize", [8, 12, 64])
def test_sparsegpt_lazy_batches_match_the_dense_obs_reference(pattern, blocksize):
    x = correlated_inputs(200, 40, seed=7)
    w = layer(12, 40, seed=8)
    structure = Unstructured() if pattern == "unstructured" else NM[pattern]
    nm = None if pattern == "unstructured" else (2, 4)
    method = SparseGPT(blocksize=blocksize, dtype=torch.float64)
    pruned, keep = prune(method, w, x, structure, 0.5)
    ref_w, ref_keep = obs_reference(w, x, 0.5, nm, blocksize)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(pruned, ref_w, rtol=1e-9, atol=1e-9)


def test_sparsegpt_float32_is_close_to_float64():
    x = correlated_inputs(256, 64, seed=9).float()
    w = layer(16, 64, seed=10).float()
    p32, k32 = prune(SparseGPT(blocksize=16), w, x, Unstructured(), 0.5)
    p64, k64 = prune(SparseGPT(blocksize=16, dtype=torch.float64), w.double(), x.double(), Unstructured(), 0.5)
    assert (k32 != k64).float().mean() < 0.01
    torch.testing.assert_close(p32.double()[k32 & k64], p64[k32 & k64], rtol=1e-3, atol=1e-3)


def reconstruction_error(w, pruned, x):
    return float(torch.linalg.matrix_norm(x @ (w - pruned).t()) / torch.linalg.matrix_norm(x @ w.t()))


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7, "2:4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(target, seed):
    x = correlated_inputs(512, 64, seed=seed)
    w = layer(48, 64, seed=seed + 10)
    structure = NM["2:4"] if target == "2:4" else Unstructured()
    sparsity = 0.5 if target == "2:4" else target
    errors = {
        name: reconstruction_error(w, prune(build_method(name), w, x, structure, sparsity)[0], x)
        for name in ("magnitude", "wanda")
    }
    sgpt = SparseGPT(blocksize=16, dtype=torch.float64)
    errors["sparsegpt"] = reconstruction_error(w, prune(sgpt, w, x, structure, sparsity)[0], x)
    assert errors["sparsegpt"] < errors["wanda"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors


# ------------------------------------------------------------------------------------------------ counts, N:M
@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.37, 0.5, 0.9])
def test_exact_sparsity_counts(name, sparsity):
    x = correlated_inputs(96, 24, seed=11)
    w = layer(7, 24, seed=12)
    method = SparseGPT(blocksize=5) if name == "sparsegpt" else build_method(name)
    pruned, keep = prune(method, w, x, Unstructured(), sparsity)
    assert int((~keep).sum()) == round(sparsity * w.numel())
    assert torch.equal(pruned == 0, ~keep)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_every_nm_group_has_exactly_n_zeros(name, pattern):
    structure = NM[pattern]
    x = correlated_inputs(96, 32, seed=13)
    w = layer(10, 32, seed=14)
    method = SparseGPT(blocksize=16) if name == "sparsegpt" else build_method(name)
    pruned, keep = prune(method, w, x, structure, structure.n / structure.m)
    zeros = (~keep).view(10, -1, structure.m).sum(-1)
    assert bool((zeros == structure.n).all())
    assert torch.equal(pruned == 0, ~keep)


def test_statistics_split_over_batches_equal_one_batch():
    x = correlated_inputs(90, 12, seed=15)
    whole, parts = ColumnSquares(12), ColumnSquares(12)
    whole.add_(x)
    for chunk in x.chunk(3):
        parts.add_(chunk)
    # ColumnSquares sums up to 1024 rows in float32 before adding them in float64.
    torch.testing.assert_close(whole.squares, parts.squares, rtol=1e-6, atol=0)
    assert int(parts.count) == 90
    cov = InputCovariance(12, dtype=torch.float64)
    cov.add_(x)
    torch.testing.assert_close(cov.squares(), whole.squares, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_cholesky_equals_the_three_step_reference_in_the_covariances_memory(dtype):
    x = correlated_inputs(300, 600, seed=18).to(dtype)  # wider than the 256-row bands the factor is built in
    cov = InputCovariance(600, dtype=dtype)
    cov.add_(x)
    assert cov.sum is not None
    h = cov.sum.clone()
    cov.sum.copy_(cov.sum.tril() + torch.full_like(cov.sum, 1e6).triu(1))  # only the lower triangle counts
    storage = cov.sum.untyped_storage().data_ptr()
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    upper = cov.inverse_cholesky(0.01, "fc")
    assert torch.equal(upper, expected)
    assert upper.untyped_storage().data_ptr() == storage  # no second in x in matrix
    assert cov.sum is None and cov.inverse_cholesky(0.01, "fc") is upper


# ------------------------------------------------------------------------------------------------ bad input
def test_nm_on_a_width_that_is_not_a_multiple_of_m_names_the_layer():
    with pytest.raises(ValueError, match=r"'blocks.0.fc' has 30 input features, not a multiple of 4.*`ignore`"):
        check_layer_target("blocks.0.fc", (8, 30), NM["2:4"], 0.5)


def test_sparsegpt_refuses_an_nm_target_it_cannot_reach():
    with pytest.raises(ValueError, match=r"2:4 one-shot pruning zeroes exactly 2 of every 4.*cannot reach.*0\.6"):
        SparseGPT().check_target("fc", (8, 16), NM["2:4"], 0.6)
    with pytest.raises(ValueError, match=r"`blocksize`=6 must be a multiple of m=4"):
        SparseGPT(blocksize=6).check_target("fc", (8, 16), NM["2:4"], 0.5)
    with pytest.raises(ValueError, match=r"target sparsity of 'fc' must be a number in \[0, 1\), got 1\.0"):
        SparseGPT().check_target("fc", (8, 16), Unstructured(), 1.0)


def test_a_hessian_singular_after_dampening_says_what_to_do():
    x = torch.tensor([[3.0, 3.0, 1.0], [4.0, 4.0, 2.0]], dtype=torch.float64)  # two equal columns, rank 2
    method = SparseGPT(damping=0.0, dtype=torch.float64)
    stat = statistic_for(method, x, batches=1)
    with pytest.raises(ValueError, match=r"Hessian of 'blocks.1.fc' is singular.*more calibration samples.*`damping`"):
        method.prune_("blocks.1.fc", layer(2, 3), stat, Unstructured(), 0.5)
    method = SparseGPT(damping=0.01, dtype=torch.float64)  # the default damping makes it invertible
    method.prune_("blocks.1.fc", layer(2, 3), statistic_for(method, x, batches=1), Unstructured(), 0.5)


def test_sparsegpt_keeps_counts_exact_with_inputs_that_are_always_zero():
    x = correlated_inputs(64, 16, seed=16)
    x[:, 3] = 0.0
    w = layer(8, 16, seed=17)
    pruned, keep = prune(SparseGPT(blocksize=8, dtype=torch.float64), w, x, Unstructured(), 0.25)
    assert int((~keep).sum()) == 32 and torch.isfinite(pruned).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocksize": 0}, "`blocksize` must be a positive integer"),
        ({"damping": -1}, "`damping` must be a number >= 0"),
    ],
)
def test_sparsegpt_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseGPT(**kwargs)


def test_wanda_without_statistics_says_the_layer_was_not_called():
    with pytest.raises(ValueError, match=r"Wanda scores 'fc' .* was the layer called"):
        Wanda().prune_("fc", layer(2, 4), None, Unstructured(), 0.5)


# ------------------------------------------------------------------------------------------------ OWL
def test_owl_keeps_the_total_and_prunes_layers_with_more_outliers_less():
    g = torch.Generator().manual_seed(18)
    owl = OWL(m=5.0, lam=0.08, granularity="layer")
    sizes, layers = {}, []
    for i, outliers in enumerate([0, 4, 16, 64]):
        w = torch.randn(32, 64, generator=g).abs()
        w.view(-1)[torch.randperm(w.numel(), generator=g)[:outliers]] *= 50.0
        layers.append((f"l{i}.weight", w, torch.ones(64)))
        sizes[f"l{i}.weight"] = w.numel()
    owl.observe_block(0, layers)
    targets = owl.targets(sizes, 0.7)
    pruned = sum(round(targets[n] * sizes[n]) for n in sizes)
    assert pruned == round(0.7 * sum(sizes.values()))
    values = [targets[f"l{i}.weight"] for i in range(4)]
    assert values == sorted(values, reverse=True) and values[0] > 0.7 > values[-1]
    assert values[0] - values[-1] == pytest.approx(2 * 0.08, abs=1e-3)


def test_owl_refuses_targets_outside_the_unit_interval():
    owl = OWL(lam=0.3, granularity="layer")
    spiky = torch.ones(4, 40)
    spiky[0, 0] = 100.0
    owl.observe_block(0, [("a", torch.ones(4, 40), torch.ones(40)), ("b", spiky, torch.ones(40))])
    with pytest.raises(ValueError, match=r"OWL gives \['a'\] a sparsity of 1\.2000, outside \[0, 1\).*Lower `lam`"):
        owl.targets({"a": 160, "b": 160}, 0.9)


def test_exact_targets_round_to_the_total():
    sizes = {"a": 7, "b": 11, "c": 13}
    out = exact_targets({"a": 0.41, "b": 0.52, "c": 0.55}, sizes, 0.5)
    assert sum(round(out[n] * sizes[n]) for n in sizes) == round(0.5 * 31)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"m": 0}, "OWL's `m`"), ({"lam": 0.6}, "OWL's `lam`"), ({"granularity": "x"}, "granularity")]
)
def test_owl_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OWL(**kwargs)


# ------------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_per_row_threshold_is_the_kth_value_whatever_the_dtype(dtype):
    # float32 and float64 go through NumPy's partition on the CPU, other dtypes through torch.topk.
    from lightning_prune.oneshot._select import _kth_smallest

    scores = torch.randn(37, 101, generator=torch.Generator().manual_seed(7)).abs().to(dtype)
    scores[3, :60] = 0.0  # a row with ties at the threshold
    for k in [1, 17, 50, 51, 100, 101]:
        assert torch.equal(_kth_smallest(scores, k), scores.kthvalue(k, dim=1, keepdim=True).values), k


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_entries_are_exactly_positive_zero(name, dtype):
    x = correlated_inputs(128, 32, seed=8).to(dtype)
    w = layer(12, 32, seed=9).to(dtype)
    w[0, :4] = -0.0  # negative zeros are the lowest scores: pruned, and stored as +0.0
    pruned, keep = prune(build_method(name), w, x.float(), Unstructured(), 0.5)
    bits = pruned.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
    assert not keep[0, :4].any()
    assert int(torch.count_nonzero(bits[~keep])) == 0
    assert int((~keep).sum()) == 12 * 32 // 2
