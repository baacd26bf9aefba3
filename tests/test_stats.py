import pytest
import torch
from torch import nn

from lightning_prune.models import SmallCNN
from lightning_prune.stats import MacCount, count_macs


def test_conv_macs_are_weights_times_output_positions():
    conv = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)  # 8x8 -> 4x4
    with torch.no_grad():
        conv.weight[:2] = 0.0  # half the filters
    assert count_macs(conv, torch.zeros(5, 3, 8, 8)) == MacCount(macs=54 * 16, dense_macs=108 * 16)


def test_grouped_and_1d_convs_and_token_linears():
    depthwise = nn.Conv1d(4, 4, kernel_size=3, groups=4)  # 12 weights, 10 - 2 = 8 positions
    assert count_macs(depthwise, torch.zeros(2, 4, 10)).dense_macs == 12 * 8
    linear = nn.Linear(6, 2)  # applied once per token
    assert count_macs(linear, torch.zeros(3, 5, 6)).dense_macs == 12 * 5


def test_counts_the_whole_network_per_sample_and_restores_training_mode():
    net = SmallCNN(channels=(8, 16), hidden=32).train()
    example = torch.zeros(4, 1, 8, 8)
    dense = count_macs(net, example)
    # conv 1: 8*1*9 weights over 8x8; conv 2: 16*8*9 over 4x4; linear 64->32; head 32->10.
    assert dense.dense_macs == dense.macs == 72 * 64 + 1152 * 16 + 64 * 32 + 32 * 10
    assert net.training
    assert not any(m._forward_hooks for m in net.modules())  # hooks removed
    with torch.no_grad():
        for p in net.parameters():
            p.mul_((torch.rand_like(p) < 0.5).float())
    pruned = count_macs(net, example)
    assert pruned.dense_macs == dense.dense_macs and pruned.macs < dense.macs


def test_rejects_an_empty_batch():
    with pytest.raises(ValueError, match=r"`example` must be a batch with at least one sample, got shape \(0, 4\)"):
        count_macs(nn.Linear(4, 2), torch.zeros(0, 4))
