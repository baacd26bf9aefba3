import pytest
import torch
from torch import nn

from lightning_prune.deploy.profile import (
    MacCount,
    ModelProfile,
    compare_profiles,
    count_flop_macs,
    count_macs,
    count_parameters,
    measure_latency,
    profile_model,
)
from lightning_prune.models import SmallCNN


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


# ------------------------------------------------------------------ FLOP-counter MACs, parameters, latency, profiles


def test_flop_macs_agree_with_the_hook_count_and_see_functional_matmuls():
    net = SmallCNN(channels=(8, 16), hidden=32)
    example = torch.zeros(4, 1, 8, 8)
    assert count_flop_macs(net, example) == count_macs(net, example).dense_macs == 72 * 64 + 1152 * 16 + 2368

    class Functional(nn.Module):  # a matmul outside any Linear or Conv module
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(6, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight

    assert count_flop_macs(Functional(), torch.zeros(3, 4, 6)) == 4 * 6 * 5  # per sample: 4 rows x 30
    assert count_macs(Functional(), torch.zeros(3, 4, 6)).dense_macs == 0


def test_flop_macs_run_in_eval_mode_and_restore_each_modules_mode():
    seen = []
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    net.register_forward_pre_hook(lambda m, i: seen.append(m.training))
    net.train()
    net[1].eval()  # mixed modes must come back as they were
    assert count_flop_macs(net, torch.zeros(2, 4)) == 16 + 8
    assert seen == [False]
    assert [m.training for m in net.modules()] == [True, True, False, True]


def test_count_parameters_counts_shared_parameters_once():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), shared, nn.BatchNorm1d(3))
    assert count_parameters(net) == 12 + 6  # BatchNorm's gamma and beta; its running stats are buffers


class _CallLog(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.calls: list[tuple[bool, bool, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_inference_mode_enabled(), torch.get_num_threads()))
        return self.linear(x)


def test_measure_latency_runs_warmup_plus_repeats_in_eval_inference_mode_and_restores_state():
    net = _CallLog().train()
    threads = torch.get_num_threads()
    seconds = measure_latency(net, torch.zeros(2, 4), repeats=4, warmup=2, threads=1)
    assert 0.0 < seconds < 1.0
    assert net.calls == [(False, True, 1)] * 6
    assert net.training and torch.get_num_threads() == threads
    net.calls.clear()
    measure_latency(net, torch.zeros(2, 4), repeats=1, warmup=0)
    assert net.calls == [(False, True, threads)]


def test_measure_latency_rejects_bad_arguments():
    net, x = nn.Linear(2, 2), torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"`repeats` must be an integer >= 1, got 0"):
        measure_latency(net, x, repeats=0)
    with pytest.raises(ValueError, match=r"`warmup` must be an integer >= 0, got -1"):
        measure_latency(net, x, warmup=-1)
    with pytest.raises(ValueError, match=r"`threads` must be None \(keep torch's setting\) or an integer >= 1, got 0"):
        measure_latency(net, x, threads=0)
    with pytest.raises(TypeError, match=r"`example` must be a tensor \(one input batch\), got list"):
        measure_latency(net, [x])  # type: ignore[arg-type]


def test_profile_model_times_each_batch_size_with_copies_of_the_first_sample():
    net = _CallLog()
    example = torch.arange(8.0).reshape(2, 4)
    seen: list[torch.Tensor] = []
    net.register_forward_pre_hook(lambda m, i: seen.append(i[0].clone()))
    profile = profile_model(net, example, batch_sizes=(1, 3), repeats=2, warmup=1)
    assert profile.params == 20 and profile.macs == 16
    assert sorted(profile.latency_ms) == [1, 3] and all(ms > 0 for ms in profile.latency_ms.values())
    assert {tuple(x.shape) for x in seen} == {(1, 4), (3, 4)}
    assert all(torch.equal(row, example[0]) for x in seen for row in x)
    assert profile.as_dict() == {
        "params": 20,
        "macs": 16,
        "latency_b1_ms": profile.latency_ms[1],
        "latency_b3_ms": profile.latency_ms[3],
    }
    assert profile_model(net, example, batch_sizes=()).latency_ms == {}
    with pytest.raises(ValueError, match=r"`batch_sizes` must be integers >= 1, e.g. \(1, 64\), got \(1, 0\)"):
        profile_model(net, example, batch_sizes=(1, 0))


def test_compare_profiles_lays_out_ratios_before_over_after():
    dense = ModelProfile(params=1000, macs=8000, latency_ms={1: 2.0, 64: 30.0})
    small = ModelProfile(params=250, macs=1000, latency_ms={1: 1.6, 64: 10.0})
    table = compare_profiles(dense, small, title="Compaction")
    lines = table.splitlines()
    assert lines[0] == "Compaction"
    assert lines[1].split() == ["before", "after", "before/after"]
    assert lines[2].split() == ["params", "1,000", "250", "4.00x"]
    assert lines[3].split() == ["MACs", "8,000", "1,000", "8.00x"]
    assert lines[4].split() == ["latency", "b1", "2.00", "ms", "1.60", "ms", "1.25x"]
    assert lines[5].split() == ["latency", "b64", "30.00", "ms", "10.00", "ms", "3.00x"]
    untimed = ModelProfile(params=250, macs=1000, latency_ms={})
    assert len(compare_profiles(dense, untimed).splitlines()) == 3  # latency rows only where both were timed
    with pytest.raises(TypeError, match=r"`after` must be a ModelProfile \(from profile_model\), got tuple"):
        compare_profiles(dense, (250, 1000, {}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`labels` must be two strings"):
        compare_profiles(dense, small, labels=("dense",))  # type: ignore[arg-type]
