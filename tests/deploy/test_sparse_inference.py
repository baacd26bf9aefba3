"""Sparse CPU inference: the CSR layers, the measured per-layer choice, and refusals."""

import copy
import pickle

import pytest
import torch
from torch import nn

from lightning_prune.deploy import kernels
from lightning_prune.deploy.kernels import measure_kernels, sparse_inference
from lightning_prune.deploy.sparse_layers import SPARSE_KERNELS, SparseConv2d, SparseLinear, to_sparse_layer
from lightning_prune.models import MLP, resnet20


def _sparsify_(module: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
    return module


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return float((a - b).detach().norm() / b.detach().norm()) <= rtol


@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96), (96,)])
def test_sparse_linear_matches_the_dense_layer(kernel, shape):
    torch.manual_seed(0)
    linear = _sparsify_(nn.Linear(96, 40), 0.9)
    sparse = SparseLinear.from_dense(linear, kernel)
    x = torch.randn(*shape)
    expected = linear(x)
    with torch.inference_mode():
        got = sparse(x)
    assert got.shape == expected.shape and got.is_contiguous()
    assert _close(got, expected)
    with torch.no_grad():
        assert _close(sparse(x), expected)
    assert sparse.nnz == int(torch.count_nonzero(linear.weight))
    assert sparse.sparsity == pytest.approx(1 - sparse.nnz / linear.weight.numel())


@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
def test_gradients_flow_to_the_input_under_autograd(kernel):
    torch.manual_seed(0)
    linear = _sparsify_(nn.Linear(32, 16, bias=False), 0.8)
    sparse = SparseLinear.from_dense(linear, kernel)
    x = torch.randn(4, 32, requires_grad=True)
    sparse(x).square().sum().backward()
    got = x.grad.clone()
    x.grad = None
    linear(x).square().sum().backward()
    assert _close(got, x.grad)


@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 0), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_1x1_convolution_matches_the_dense_layer(kernel, stride, padding, channels_last):
    torch.manual_seed(0)
    conv = _sparsify_(nn.Conv2d(24, 12, kernel_size=1, stride=stride, padding=padding), 0.85)
    sparse = SparseConv2d.from_dense(conv, kernel)
    x = torch.randn(3, 24, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        got, expected = sparse(x), conv(x)
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _close(got, expected)


def test_to_dense_gives_the_layer_back():
    torch.manual_seed(0)
    linear = _sparsify_(nn.Linear(10, 6), 0.7)
    back = SparseLinear.from_dense(linear).to_dense()
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
    conv = _sparsify_(nn.Conv2d(5, 4, 1, stride=2, bias=False), 0.5)
    back_conv = SparseConv2d.from_dense(conv, "scipy_csr").to_dense()
    assert torch.equal(back_conv.weight, conv.weight) and back_conv.stride == (2, 2) and back_conv.bias is None


def test_float64_layers_and_copies_work():
    torch.manual_seed(0)
    linear = _sparsify_(nn.Linear(20, 8), 0.6).double()
    sparse = SparseLinear.from_dense(linear, "scipy_csr")
    x = torch.randn(3, 20, dtype=torch.float64)
    with torch.no_grad():
        assert _close(sparse(x), linear(x), 1e-12)
        sparse(x)  # builds the SciPy view of the buffers
        for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
            assert _close(clone(x), linear(x), 1e-12)
    assert set(sparse.state_dict()) == {"crow_indices", "col_indices", "values", "bias"}


def test_unsupported_layers_and_inputs_are_refused():
    with pytest.raises(
        ValueError,
        match=r"No sparse kernel for this layer: Conv2d has kernel_size \(3, 3\)\. Sparse "
        r"inference supports nn\.Linear and 1x1 nn\.Conv2d",
    ):
        to_sparse_layer(nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match=r"Conv2d is grouped \(groups=2\)"):
        to_sparse_layer(nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match=r"pads with padding_mode='reflect'"):
        to_sparse_layer(nn.Conv2d(4, 4, 1, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"LayerNorm is neither an nn\.Linear nor a 1x1 nn\.Conv2d"):
        to_sparse_layer(nn.LayerNorm(4))
    with pytest.raises(
        ValueError, match=r"Linear has torch\.bfloat16 weights \(sparse kernels take float32 or float64\)"
    ):
        to_sparse_layer(nn.Linear(4, 4).bfloat16())
    with pytest.raises(ValueError, match=r"`kernel` must be one of \['torch_csr', 'scipy_csr'\], got 'mkl'"):
        to_sparse_layer(nn.Linear(4, 4), "mkl")
    with pytest.raises(TypeError, match=r"SparseLinear\.from_dense needs an nn\.Linear, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(2, 2, 1))
    sparse = SparseLinear.from_dense(nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"last dimension is in_features=4, got shape \(3, 5\)"):
        sparse(torch.zeros(3, 5))
    with pytest.raises(TypeError, match=r"holds torch\.float32 weights but got a torch\.float64 input"):
        sparse(torch.zeros(3, 4, dtype=torch.float64))
    conv = SparseConv2d.from_dense(nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(batch, 4, H, W\), got \(4, 5, 5\)"):
        conv(torch.zeros(4, 5, 5))


def test_forced_kernel_converts_the_sparse_layers_and_leaves_the_model_alone():
    torch.manual_seed(0)
    net = _sparsify_(MLP(), 0.9)
    with torch.no_grad():
        net.head.weight.fill_(1.0)  # dense: stays
    result = sparse_inference(net, torch.randn(4, 1, 8, 8), kernel="scipy_csr")
    assert [(c.name, c.kernel) for c in result.layers] == [
        ("features.1", "scipy_csr"),
        ("features.3", "scipy_csr"),
        ("head", "dense"),
    ]
    assert result.layers[2].reason == "sparsity 0.00 < min_sparsity 0.5"
    assert isinstance(result.model.features[1], SparseLinear) and isinstance(result.model.head, nn.Linear)
    assert all(type(m) is not SparseLinear for m in net.modules())  # the input model is unchanged
    assert not result.model.training
    for batch in (1, 3, 50):  # batch sizes other than the example's
        x = torch.randn(batch, 1, 8, 8)
        with torch.inference_mode():
            assert _close(result.model(x), net(x))
    assert [c.name for c in result.converted()] == ["features.1", "features.3"]
    assert "features.1  Linear  300x64" in result.table()


def test_measured_choice_follows_the_speedup_threshold():
    torch.manual_seed(0)
    net = _sparsify_(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), 0.95)
    x = torch.randn(2, 64)
    never = sparse_inference(net, x, batch_sizes=(1, 4), repeats=2, min_speedup=1e9)
    assert [c.kernel for c in never.layers] == ["dense", "dense"]
    assert all(c.reason.startswith("dense is faster: best sparse kernel") for c in never.layers)
    assert all(set(c.times_ms) == {"dense", *SPARSE_KERNELS} for c in never.layers)
    assert all(set(c.times_ms["dense"]) == {1, 4} for c in never.layers)
    always = sparse_inference(
        net, x, batch_sizes=(1,), candidates=["scipy_csr"], repeats=2, min_speedup=1e-9, check_speed=False
    )
    assert [c.kernel for c in always.layers] == ["scipy_csr", "scipy_csr"]
    assert always.layers[0].speedup == pytest.approx(
        always.layers[0].times_ms["dense"][1] / always.layers[0].times_ms["scipy_csr"][1]
    )
    with torch.inference_mode():
        assert _close(always.model(x), net(x))


@pytest.mark.parametrize("ratio", [0.5, 0.99, 1.0, 2.0])
def test_a_conversion_that_is_slower_end_to_end_is_undone(ratio, monkeypatch):
    # The end-to-end clock is replaced by the ratio under test: what is checked is the decision, not a busy clock.
    calls = []

    def end_to_end(converted, model, inputs, sizes, repeats, threads):
        calls.append((sizes, repeats, threads))
        return ratio

    monkeypatch.setattr(kernels, "_end_to_end", end_to_end)
    net = _sparsify_(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), 0.5, seed=int(ratio * 100))
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(int(ratio * 100)))
    result = sparse_inference(
        net, x, batch_sizes=(1,), candidates=["torch_csr"], repeats=2, min_sparsity=0.0, min_speedup=1e-9, threads=1
    )
    assert calls == [((1,), 2, 1)]
    if ratio < 1.0:
        assert [c.kernel for c in result.layers] == ["dense", "dense"]
        reason = f"torch_csr chosen, but the converted model ran {ratio:.2f}x end to end: kept dense"
        assert [c.reason for c in result.layers] == [reason, reason]
        assert all(isinstance(m, nn.Linear) for m in (result.model[0], result.model[2]))
    else:
        assert [c.kernel for c in result.layers] == ["torch_csr", "torch_csr"]
        assert all(isinstance(m, SparseLinear) for m in (result.model[0], result.model[2]))
    with torch.inference_mode():
        assert _close(result.model(x), net(x))


def test_residual_network_1x1_shortcuts_are_candidates():
    torch.manual_seed(0)
    net = _sparsify_(resnet20(in_channels=1), 0.9).eval()
    x = torch.randn(2, 1, 16, 16)
    result = sparse_inference(net, x, kernel="torch_csr")
    names = [c.name for c in result.layers]
    assert names == ["layer2.0.shortcut.0", "layer3.0.shortcut.0", "head"]
    assert [c.layer for c in result.layers] == ["Conv2d 1x1", "Conv2d 1x1", "Linear"]
    assert isinstance(result.model.layer2[0].shortcut[0], SparseConv2d)
    y = torch.randn(5, 1, 16, 16)
    with torch.inference_mode():
        assert _close(result.model(y), net(y))


def test_layer_patterns_select_and_refuse():
    torch.manual_seed(0)
    net = _sparsify_(resnet20(in_channels=1), 0.9).eval()
    x = torch.randn(2, 1, 16, 16)
    only = sparse_inference(net, x, kernel="torch_csr", layers=["layer3"])
    assert [c.name for c in only.layers] == ["layer3.0.shortcut.0"]  # the 3x3 convolutions under it are skipped
    with pytest.raises(
        ValueError,
        match=r"pattern 'layer1\.0\.conv1' names 'layer1\.0\.conv1', which has no sparse "
        r"kernel: Conv2d has kernel_size \(3, 3\)",
    ):
        sparse_inference(net, x, layers=["layer1.0.conv1"])
    with pytest.raises(ValueError, match=r"pattern 'decoder' matches no module of CifarResNet"):
        sparse_inference(net, x, layers=["decoder"])
    with pytest.raises(ValueError, match=r"pattern 'layer1' selects no layer with a sparse kernel"):
        sparse_inference(net, x, layers=["layer1"])


def test_layers_whose_forward_is_never_called_are_refused():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    net = Attention().eval()
    x = torch.randn(2, 3, 16)
    result = sparse_inference(net, x, kernel="torch_csr", min_sparsity=0.0)
    assert result.layers == []  # out_proj's weights are read by MultiheadAttention itself
    with pytest.raises(
        ValueError, match=r"names \['attn\.out_proj'\], which the forward on `example_inputs` never calls"
    ):
        sparse_inference(net, x, layers=["out_proj"], min_sparsity=0.0)


def test_arguments_are_checked():
    net = nn.Linear(4, 4)
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"`kernel` must be 'auto' or one of \['torch_csr', 'scipy_csr'\], got 'csr'"):
        sparse_inference(net, x, kernel="csr")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`candidates` must be a non-empty list of \['torch_csr', 'scipy_csr'\]"):
        sparse_inference(net, x, candidates=["dense"])
    with pytest.raises(ValueError, match=r"`batch_sizes` must be a non-empty sequence of integers >= 1.*got \(0,\)"):
        sparse_inference(net, x, batch_sizes=(0,))
    with pytest.raises(ValueError, match=r"`min_sparsity` must be a number in \[0\.0, 1\.0\], got 1\.5"):
        sparse_inference(net, x, min_sparsity=1.5)
    with pytest.raises(ValueError, match=r"`min_speedup` must be a number > 0 \(e\.g\. 1\.1"):
        sparse_inference(net, x, min_speedup=0)
    with pytest.raises(ValueError, match=r"`repeats` must be an integer >= 1, got 0"):
        sparse_inference(net, x, repeats=0)
    with pytest.raises(ValueError, match=r"`layers` must be None or a non-empty list of module-name patterns"):
        sparse_inference(net, x, layers=[])
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got str"):
        sparse_inference("net", x)  # type: ignore[arg-type]


def test_a_model_that_reads_a_converted_weight_is_reported():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _sparsify_(nn.Linear(8, 8), 0.9)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight

    with pytest.raises(
        RuntimeError,
        match=r"no longer runs with sparse layers \['fc'\]: AttributeError.*reads these "
        r"layers' weights directly",
    ):
        sparse_inference(Tied(), torch.randn(2, 8), kernel="torch_csr")


def test_measure_kernels_times_every_kernel_at_every_batch_size():
    conv = _sparsify_(nn.Conv2d(8, 8, 1), 0.9)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a count the call must not leave behind (it times on one thread)
    try:
        times = measure_kernels(conv, (8, 4, 4), batch_sizes=(1, 2), repeats=2, warmup=0, threads=1, channels_last=True)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert list(times) == ["dense", "torch_csr", "scipy_csr"]
    assert all(set(by) == {1, 2} and all(ms > 0 for ms in by.values()) for by in times.values())
    with pytest.raises(ValueError, match=r"`kernels` must be a non-empty list"):
        measure_kernels(conv, (8, 4, 4), kernels=[])
    with pytest.raises(ValueError, match=r"`threads` must be an integer >= 1, got 0"):
        measure_kernels(conv, (8, 4, 4), threads=0)


def test_sparse_layer_constructors_check_their_weights():
    with pytest.raises(ValueError, match=r"`weight` must be a 2-D tensor \(out_features, in_features\), got \(4,\)"):
        SparseLinear(torch.zeros(4))
    with pytest.raises(
        ValueError, match=r"`weight` must be a 1x1 convolution weight \(out, in, 1, 1\), got \(2, 2, 3, 3\)"
    ):
        SparseConv2d(torch.zeros(2, 2, 3, 3))
    with pytest.raises(ValueError, match=r"`kernel` must be one of \['torch_csr', 'scipy_csr'\], got 'coo'"):
        SparseLinear(torch.zeros(2, 2), kernel="coo")
    with pytest.raises(ValueError, match=r"Sparse kernels multiply float32 or float64 weights, got torch\.float16"):
        SparseLinear(torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"SparseConv2d\.from_dense needs an nn\.Conv2d, got Linear"):
        SparseConv2d.from_dense(nn.Linear(2, 2))
    with pytest.raises(
        ValueError, match=r"SparseConv2d supports 1x1 convolutions only: this one has kernel_size \(3, 3\)"
    ):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 3))
