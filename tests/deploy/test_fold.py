import copy

import pytest
import torch
from torch import nn

from lightning_prune.deploy.fold import deployable
from lightning_prune.models import VGG, SmallCNN, resnet20, torchvision_model

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _randomise_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding has something to get wrong."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BATCHNORMS):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.1)
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(torch.randn(n, generator=generator))
    return model


def _count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: SmallCNN(in_channels=1), (2, 1, 8, 8)),
        (resnet20, (2, 3, 32, 32)),
        (lambda: VGG("vgg11"), (2, 3, 32, 32)),
        (lambda: torchvision_model("resnet18"), (2, 3, 32, 32)),
        (lambda: torchvision_model("mobilenet_v2"), (2, 3, 32, 32)),
    ],
    ids=["SmallCNN", "resnet20", "vgg11", "resnet18", "mobilenet_v2"],
)
def test_folds_every_batchnorm_and_matches_the_eval_model(build, shape):
    torch.manual_seed(0)
    model = _randomise_batchnorms(build()).eval()
    x = torch.randn(*shape)
    fast = deployable(model, x)
    assert type(fast) is type(model) and not fast.training
    assert _count(model, _BATCHNORMS) > 0 and _count(fast, _BATCHNORMS) == 0
    with torch.no_grad():
        assert _close(fast(x), model(x))
        other = torch.randn(*shape)  # not the inputs the check ran on
        assert _close(fast(other), model(other))


def test_input_model_is_unchanged_and_keeps_its_mode():
    model = _randomise_batchnorms(resnet20()).train()
    before = copy.deepcopy(model.state_dict())
    fast = deployable(model, torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert _count(model, nn.BatchNorm2d) == 21 and _count(fast, nn.BatchNorm2d) == 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.is_contiguous() for p in model.parameters())


def test_channels_last_and_the_switches():
    model = _randomise_batchnorms(SmallCNN(in_channels=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    fast = deployable(model, x)
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(not c.weight.is_contiguous() for c in convs)  # 3x3 kernels: channels-last is a real change
    plain = deployable(model, x, fold_bn=False, channels_last=False)
    assert _count(plain, nn.BatchNorm2d) == 2 and all(p.is_contiguous() for p in plain.parameters())
    with torch.no_grad():
        assert _close(plain(x), model(x)) and _close(fast(x), model(x))


class _Untraceable(nn.Module):
    """Data-dependent control flow at the top: torch.fx cannot trace it, its children can be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = resnet20().layer2[0]  # 16 -> 32 channels, stride 2, projection shortcut
        self.widen = nn.Conv2d(8, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.widen(self.stem(x)))
        if x.sum() > 0:  # data-dependent branch
            x = -x
        return self.block(x)


def test_a_model_fx_cannot_trace_folds_its_traceable_parts():
    with pytest.raises(Exception):  # noqa: B017 - any fx error; the point is that tracing fails
        torch.fx.symbolic_trace(_Untraceable())
    model = _randomise_batchnorms(_Untraceable()).eval()
    x = torch.randn(2, 3, 8, 8)
    fast = deployable(model, x)
    # stem (Sequential) and block (BasicBlock: bn1, bn2, shortcut) fold; self.bn follows self.widen in the
    # untraceable forward, so it stays.
    assert _count(fast, nn.BatchNorm2d) == 1 and isinstance(fast.bn, nn.BatchNorm2d)
    with torch.no_grad():
        for inputs in (x, -x):  # both branches
            assert _close(fast(inputs), model(inputs))


class _ReusesItsConv(nn.Module):
    """Untraceable, and calls the conv of a traceable child a second time outside the child's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.features(x) + self.features[0](x)


def test_a_fold_that_changes_the_outputs_is_undone_with_a_warning():
    model = _randomise_batchnorms(_ReusesItsConv()).eval()
    x = torch.randn(2, 4, 6, 6)
    with pytest.warns(UserWarning, match=r"Folding 1 BatchNorm\(s\) changed the outputs .* without folding"):
        fast = deployable(model, x)
    assert isinstance(fast.features[1], nn.BatchNorm2d)
    with torch.no_grad():
        assert _close(fast(x), model(x))


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class _Tokens(nn.Module):
    """A Linear on (batch, tokens, features) followed by BatchNorm1d over the tokens: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 5)  # as many features as tokens, so the shapes alone would allow it
        self.bn = nn.BatchNorm1d(5)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(25, 6), nn.BatchNorm1d(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.bn(self.linear(x)))


@pytest.mark.filterwarnings("error")  # left alone up front, not folded and then undone by the output check
def test_pairs_that_must_not_fold_are_left_alone():
    x = torch.randn(3, 4, 6, 6)
    shared = _randomise_batchnorms(_SharedConv()).eval()
    fast = deployable(shared, x)
    assert isinstance(fast.bn, nn.BatchNorm2d)  # the conv has a second use
    with torch.no_grad():
        assert _close(fast(x), shared(x))

    tokens = _randomise_batchnorms(_Tokens()).eval()
    t = torch.randn(3, 5, 5)
    fast = deployable(tokens, t)
    assert isinstance(fast.bn, nn.BatchNorm1d)  # normalises tokens, not the linear's features
    assert isinstance(fast.mlp[2], nn.Identity)  # a 2-D Linear -> BatchNorm1d folds
    with torch.no_grad():
        assert _close(fast(t), tokens(t))

    hooked = _randomise_batchnorms(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    hooked[0].register_forward_hook(lambda m, i, out: out * 2)
    fast = deployable(hooked, x)
    assert isinstance(fast[1], nn.BatchNorm2d)
    with torch.no_grad():
        assert _close(fast(x), hooked(x))

    batch_stats = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert isinstance(deployable(batch_stats, x)[1], nn.BatchNorm2d)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": self.a(x) + self.b(y), "x": self.a(x).mean()}


def test_tuple_inputs_and_structured_outputs():
    model = _randomise_batchnorms(_TwoInputs()).eval()
    inputs = (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6))
    fast = deployable(model, inputs)
    # self.a is called twice: left alone; self.b folds.
    assert isinstance(fast.a[1], nn.BatchNorm2d) and isinstance(fast.b[1], nn.Identity)
    with torch.no_grad():
        out, ref = fast(*inputs), model(*inputs)
    assert _close(out["sum"], ref["sum"]) and _close(out["x"], ref["x"])


def test_rejects_bad_arguments():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    x = torch.zeros(1, 1, 5, 5)
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got function"):
        deployable(lambda t: t, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`example_inputs` must be a tensor or a non-empty tuple of tensors"):
        deployable(net, [x])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`fold_bn` must be True or False, got 'yes'"):
        deployable(net, x, fold_bn="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`channels_last` must be True or False, got 1"):
        deployable(net, x, channels_last=1)  # type: ignore[arg-type]
