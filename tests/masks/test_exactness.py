"""Pruned weights and their optimizer state stay exactly zero after every step, for every optimizer of
``torch.optim``, in a plain loop with gradient accumulation, bf16 autocast and gradient clipping; the per-step work is
one in-place gradient pass, and re-masking runs only where it is needed."""

import pytest
import torch
from _optimizers import ARGUMENTS, NOT_APPLICABLE, assert_pruned_entries_zero, build_optimizer, mlp, optimizer_names
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_prune.criteria.magnitude import MagnitudeImportance
from lightning_prune.masks.maskset import GRADIENT_ONLY_OPTIMIZERS, SMALL_MASK_BYTES, MaskSet
from lightning_prune.masks.params import prunable_parameters
from lightning_prune.structures.unstructured import Unstructured

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(count)]


def train_pruned(name: str, remask: str = "auto", steps: int = 12, accumulate: int = 2, sparsity: float = 0.7):
    """Three dense steps (so momentum and moments are non-zero), prune, then ``steps`` steps of ``accumulate``
    micro-batches under bf16 autocast with gradient clipping, checking after every step."""
    net = mlp()
    opt = build_optimizer(name, net.parameters())
    data = batches(1, accumulate)

    def closure():
        opt.zero_grad()
        total = 0.0
        for x, y in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(net(x), y) / accumulate
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        return torch.tensor(total)

    for _ in range(3):
        opt.step(closure)
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), sparsity)
    masks.attach([opt], remask=remask)
    assert_pruned_entries_zero(masks, opt, "after attach")
    before = [p.detach().clone() for p in masks.params]
    for step in range(steps):
        opt.step(closure)
        assert_pruned_entries_zero(masks, opt, f"after step {step}")
    assert masks.num_pruned() == round(sparsity * masks.numel())
    assert any(not torch.equal(b[m], p[m]) for b, p, m in zip(before, masks.params, masks.masks)), "nothing trained"
    return net, opt, masks


def test_the_enumeration_finds_every_optimizer_we_configure():
    names = optimizer_names()
    assert {"SGD", "Adam", "AdamW", "LBFGS", "Adafactor", "Muon"} <= set(names)
    assert set(ARGUMENTS) <= set(names) | set(NOT_APPLICABLE)
    assert {cls.__name__ for cls in GRADIENT_ONLY_OPTIMIZERS} < set(names)


@pytest.mark.parametrize("name", optimizer_names())
def test_pruned_weights_and_state_stay_exactly_zero(name):
    train_pruned(name)


@pytest.mark.parametrize(
    ("name", "what"),
    [("Adamax", "state"), ("Muon", "weight")],
)
def test_without_the_safety_net_these_optimizers_leak(name, what):
    """The reason they are re-masked after every step: with masked gradients alone, Adamax's infinity norm of a
    pruned entry grows to ``eps`` and Muon's orthogonalised update moves pruned weights."""
    assert getattr(torch.optim, name) not in GRADIENT_ONLY_OPTIMIZERS
    with pytest.raises(AssertionError, match=r"optimizer state .* of a pruned entry|a pruned weight of .* moved"):
        train_pruned(name, remask="pruning_steps")
    if what == "weight":
        with pytest.raises(AssertionError, match=r"a pruned weight of .* moved under Muon"):
            train_pruned(name, remask="pruning_steps")


class Counter:
    def __init__(self, masks: MaskSet) -> None:
        self.calls = 0
        self.inner = masks.remask_
        masks.remask_ = self  # type: ignore[method-assign]

    def __call__(self, optimizer=None):
        self.calls += 1
        self.inner(optimizer)


@pytest.mark.parametrize(
    ("name", "remask", "expected"),
    [
        ("SGD", "auto", 1),
        ("AdamW", "auto", 1),
        ("Adamax", "auto", 5),
        ("SGD", "always", 5),
        ("Muon", "pruning_steps", 1),
    ],
)
def test_re_masking_runs_after_the_first_step_and_every_step_only_where_needed(name, remask, expected):
    net = mlp()
    opt = build_optimizer(name, net.parameters())
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.5)
    masks.attach([opt], remask=remask)
    counter = Counter(masks)
    for x, y in batches(2, 5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert counter.calls == expected


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__) + "." + func._overloadname)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("width", [64, 1100])  # 4 * 64 * 64 * 2 bytes of masks: the fused path; 1100: bool masks only
def test_gradients_are_masked_in_place_in_one_pass(width):
    net = nn.Sequential(nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False))
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    masks.attach([opt])
    small = 2 * width * width * 4 <= SMALL_MASK_BYTES
    assert masks.held_bytes() == 2 * width * width * (5 if small else 1)  # bool masks, and float copies if small
    net(torch.randn(2, width)).sum().backward()
    grads = [p.grad for p in net.parameters()]
    with OpLog() as log:
        masks.mask_gradients_()
    assert log.ops == (["_foreach_mul_.List"] if small else ["where.self_out", "where.self_out"])
    assert all(p.grad is g for p, g in zip(net.parameters(), grads)), "masked in place"
    assert all(bool((g[~m] == 0).all()) and bool((g[m] != 0).any()) for g, m in zip(grads, masks.masks))


def test_mixed_parameter_dtypes_and_frozen_weights():
    """A bf16 layer beside an fp32 one, and a frozen layer: every pruned entry stays zero; the frozen weight is
    masked (it has no gradient to mask)."""
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32).to(torch.bfloat16), nn.Linear(32, 4))
    net[3].weight.requires_grad_(False)
    masks = MaskSet(prunable_parameters(net))
    Unstructured().prune_(masks, MagnitudeImportance(), 0.6)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    masks.attach([opt])
    frozen = net[3].weight.detach().clone()
    for x, y in batches(3, 6):
        opt.zero_grad()
        h = net[1](net[0](x)).to(torch.bfloat16)
        out = net[3](net[2](h).float())
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
        assert_pruned_entries_zero(masks, opt, "mixed dtypes")
    assert net[3].weight.grad is None
    assert masks.layer_sparsity()["3.weight"] > 0
    assert torch.equal(net[3].weight, frozen), "a frozen weight is only masked, never trained"
