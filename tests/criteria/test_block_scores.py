"""Block-importance scores for depth pruning: the pure per-token functions and their means over calibration
batches (score_blocks) against hand-computed values on blocks whose effect is known exactly (a scaling and two
rotations), the blocks each score selects, and the bad inputs."""

import math

import pytest
import torch
from _gloo_ranks import run_on_ranks, score_blocks_on_rank
from torch import nn

from lightning_prune.criteria.depth import angular_distance, block_influence, build_block_score, relative_norm
from lightning_prune.oneshot import score_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_per_token_scores_match_hand_computed_values():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[6.0, 8.0], [0.0, 5.0], [-1.0, 0.0]])  # same direction, 90 degrees, 90 degrees
    assert block_influence(x, y).tolist() == pytest.approx([0.0, 1.0, 1.0], abs=1e-12)
    assert angular_distance(x, y).tolist() == pytest.approx([0.0, 0.5, 0.5], abs=1e-12)
    assert relative_norm(x, y).tolist() == pytest.approx([1.0, math.sqrt(26), math.sqrt(5) / 2], abs=1e-12)
    assert block_influence(x, y).dtype == torch.float64
    assert block_influence(x[None], y[None]).shape == (1, 3)  # (batch, tokens, hidden) -> (batch, tokens)


def rotation(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def known_blocks() -> nn.Sequential:
    """Three blocks on 2-D hidden states: a scaling by 2, a rotation by 90 degrees and one by 45 degrees."""
    blocks = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(3)])
    with torch.no_grad():
        for block, weight in zip(blocks, (2 * torch.eye(2), rotation(90), rotation(45))):
            block.weight.copy_(weight)
    return blocks


@pytest.mark.parametrize(
    ("score", "expected", "least"),
    [
        ("influence", [0.0, 1.0, 1 - math.sqrt(2) / 2], [0]),
        ("angular", [0.0, 0.5, 0.25], [0]),
        # the update's size: |2x - x| = |x|, |Rx - x| = 2 sin(angle / 2) |x|; the 45-degree turn is the smallest
        ("relative_norm", [1.0, math.sqrt(2), 2 * math.sin(math.radians(22.5))], [2]),
    ],
)
def test_score_blocks_averages_over_every_calibration_token(score, expected, least):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 5, 2, generator=g), torch.zeros(4)) for _ in range(3)]  # (inputs, targets)
    found = score_blocks(known_blocks(), batches, score=score, num_samples=10)
    assert found.names == ["0", "1", "2"] and found.container == ""
    assert found.tokens == 10 * 5  # 10 samples of 5 tokens: the third batch was cut to 2 samples
    assert found.scores.tolist() == pytest.approx(expected, abs=1e-6)
    assert found.least_important(1) == least
    assert f"Block importance ({score}, 50 tokens)" in found.table(least)


def test_bad_scores_and_blocks_are_refused():
    with pytest.raises(
        ValueError,
        match=r"^Unknown block `score` 'cosine'; expected one of \['angular', 'influence', 'relative_norm'\]",
    ):
        build_block_score("cosine")
    with pytest.raises(ValueError, match=r"^A block's input and output hidden states must have one shape"):
        block_influence(torch.zeros(2, 3), torch.zeros(2, 4))
    widening = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"^Block '0' returned shape \(4, 3\) for hidden states of shape \(4, 2\): "):
        score_blocks(widening, [torch.randn(4, 2)])
    with pytest.raises(ValueError, match=r"^The calibration dataloader yielded no batch"):
        score_blocks(known_blocks(), [])


@pytest.mark.slow  # two spawned processes import torch: seconds on a quiet machine, more on a busy one
def test_scores_over_a_real_two_process_gloo_group_are_those_of_all_the_samples(tmp_path):
    torch.manual_seed(0)
    blocks = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    g = torch.Generator().manual_seed(1)
    batches = [[torch.randn(2, 3, 4, generator=g)], [torch.randn(5, 3, 4, generator=g)]]  # shares of unequal size
    got = run_on_ranks(tmp_path, score_blocks_on_rank, blocks, batches)
    both = score_blocks(blocks, [*batches[0], *batches[1]], num_samples=None)
    assert [r["tokens"] for r in got] == [both.tokens] * 2 == [21] * 2
    assert torch.equal(got[0]["scores"], got[1]["scores"])  # every rank removes the same blocks
    torch.testing.assert_close(got[0]["scores"], both.scores)
