"""Compaction: a physically smaller model without its pruned channels, and its saving and reloading.

* :func:`compact` removes every channel whose slices are all zero (the masked ones) from a copy of the model with
  Torch-Pruning's layer surgery, and checks that the copy computes what the original computes.
* :func:`compact_state` / :func:`save_compact` / :func:`load_compact` save a compacted model as a state dict plus
  its layer widths, and rebuild it from a fresh, full-width instance of the same architecture.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_prune.structures.channel import prune_channels_
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 3))
    >>> x = torch.randn(2, 3, 8, 8)
    >>> _ = prune_channels_(net, x, sparsity=0.5)
    >>> small = compact(net.eval(), x)
    >>> small[0].out_channels, small[1].num_features, small[3].in_channels
    (8, 8, 8)
    >>> torch.allclose(small(x), net(x), rtol=1e-5, atol=1e-6)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_prune._files import atomic_save, check_path, load_torch_file, verify_digest, with_digest
from lightning_prune._helpers import check_flag, eval_mode, forward, is_int, is_number, output_tensors
from lightning_prune.deploy.attention import CompactMultiheadAttention
from lightning_prune.deploy.depth import remove_blocks_
from lightning_prune.deploy.window_attention import CompactRelativeAttention, CompactShiftedWindowAttention
from lightning_prune.masks.channels import ChannelGroup
from lightning_prune.structures.tracing import ExampleInputs, Traced, pruning_group, trace_groups

if TYPE_CHECKING:
    import torch_pruning as tp


_COMPACT_FORMAT = "lightning_prune.compact"


_COMPACT_VERSION = 1


#: Module attributes that describe widths; saved with a compact model so a fresh instance can be resized.
_WIDTH_ATTRS = (
    "in_channels",
    "out_channels",
    "in_features",
    "out_features",
    "num_features",
    "num_parameters",
    "groups",
    # attention bookkeeping of head-pruned transformers (lightning_prune.deploy.transformer)
    "num_heads",
    "num_kv_heads",
    "num_key_value_groups",
    "split_size",
    "nf",
    "nx",
    "num_attention_heads",
    "all_head_size",
    # expert counts of expert-pruned mixtures of experts (lightning_prune.deploy.experts)
    "num_experts",
    "intermediate_size",
    # nn.TransformerEncoder's nested-tensor path, turned off where compact attention replaced its layers' own
    "use_nested_tensor",
)

#: Width fields of a module's ``config`` that head and neuron compaction rewrite: LitGPT's ``Config``, which its
#: ``GPT``, blocks, attention modules and MLPs share, recognised by its ``n_query_groups``.
_CONFIG_WIDTHS = ("n_head", "n_query_groups", "intermediate_size")


def _config_widths(m: nn.Module) -> dict[str, int]:
    """The width fields of ``m``'s LitGPT-style ``config``; empty for a module without one."""
    config = getattr(m, "config", None)
    if not is_int(getattr(config, "n_query_groups", None)):
        return {}
    return {f: int(getattr(config, f)) for f in _CONFIG_WIDTHS if is_int(getattr(config, f, None))}


def _set_config_widths(m: nn.Module, widths: Mapping[str, int], copies: dict[tuple[int, tuple], Any]) -> None:
    """Give ``m`` a copy of its ``config`` with ``widths``; modules of one config given equal widths share one copy
    (kept in ``copies``). A module whose config already has these widths keeps it."""
    if all(_config_widths(m).get(f) == v for f, v in widths.items()):
        return
    key = (id(m.config), tuple(sorted(widths.items())))
    if key not in copies:
        config = copy.copy(m.config)
        for field, value in widths.items():
            setattr(config, field, value)
        copies[key] = config
    m.config = copies[key]


#: Modules that compaction puts in place of a layer that cannot shrink in place, by class name: saved with their
#: ``compact_config()`` and rebuilt by :func:`load_compact` (only these classes are ever built from a file).
_REPLACEMENTS: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (CompactMultiheadAttention, CompactShiftedWindowAttention, CompactRelativeAttention)
}


# ---------------------------------------------------------------------------------------------- compaction
def compact(
    model: nn.Module,
    example_inputs: ExampleInputs,
    ignore: Sequence[str] = (),
    *,
    verify: bool = True,
    rtol: float = 1e-4,
) -> nn.Module:
    """A physically smaller copy of ``model`` without its pruned channels; ``model`` is left unchanged.

    A channel of a coupled group is removed when every entry it owns is exactly zero, which is what
    :class:`ChannelStructure`'s masks leave (at least one channel of a group always stays). Removing such a
    channel changes no output: its consumers' input columns are zero. The layer surgery is Torch-Pruning's.

    Args:
        model: the masked network, e.g. ``pl_module`` after channel pruning, or its inner ``nn.Module``.
        example_inputs: what ``model``'s forward takes (see :func:`channel_groups`).
        ignore: module-name patterns whose output channels are kept whole.
        verify: run both models in eval mode on ``example_inputs`` and raise unless the outputs agree to
            ``rtol`` (relative to the largest output magnitude).
        rtol: the tolerance of ``verify``.

    Returns:
        The compact model, in ``model``'s training mode.

    Raises:
        ValueError: the model does not run on ``example_inputs``, cannot be traced, or has no channel group;
            ``rtol`` is not a finite number >= 0.
        TypeError: ``verify`` is not a bool.
        RuntimeError: the surgery failed, the outputs are not finite (NaN weights), or the compact model
            computes something else (``model`` is then
            unchanged all the same: only the copy was touched).

    Example:
        >>> from torch import nn
        >>> from lightning_prune.structures.channel import prune_channels_
        >>> net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> _ = prune_channels_(net, torch.randn(2, 4), sparsity=0.5)
        >>> compact(net, torch.randn(2, 4))
        Sequential(
          (0): Linear(in_features=4, out_features=5, bias=True)
          (1): ReLU()
          (2): Linear(in_features=5, out_features=2, bias=True)
        )
    """
    check_flag("verify", verify)
    if not is_number(rtol, finite=True) or rtol < 0:
        raise ValueError(f"`rtol` must be a finite number >= 0 (e.g. 1e-4), got {rtol!r}.")
    small = copy.deepcopy(model)
    groups = trace_groups(small, example_inputs, ignore)  # checks the example inputs on the copy
    named = dict(small.named_parameters())
    plan: list[tuple[Traced, tp.Group, list[int]]] = []
    for traced, tp_group, group in groups:
        zero = _removable_channels(group, named)
        if zero:
            plan.append((traced, tp_group, zero))
    try:
        for traced, tp_group, zero in plan:
            root = tp_group[0].dep
            surgery = pruning_group(traced, root.target.module, root.handler, zero)
            if isinstance(surgery, str):
                raise RuntimeError(f"the group of {root.target.module} could not be followed again: {surgery}")
            surgery.prune()
    except Exception as err:
        raise RuntimeError(
            f"Compacting {type(model).__name__} failed in the layer surgery ({type(err).__name__}: {err}); "
            "the model is unchanged."
        ) from err
    small.train(model.training)
    if verify:
        _verify(model, small, example_inputs, rtol)
    return small


def _removable_channels(group: ChannelGroup, params: Mapping[str, Tensor]) -> list[int]:
    """The all-zero channels of ``group``, less one channel of every layer (and of the group) that would be
    emptied otherwise, so that every layer keeps a valid width. Through grouped convolutions, every block
    (:attr:`ChannelGroup.blocks`) loses as many as the one with the fewest, so that ``groups`` stays."""
    nonzero = torch.zeros(group.channels, dtype=torch.long)
    for s in group.slices:
        nonzero.index_add_(0, s.root, s.rows(params[s.param].detach()).ne(0).any(1).long().cpu())
    zero = nonzero == 0
    if group.blocks is not None:
        members = [torch.nonzero(group.blocks == b).flatten() for b in range(int(group.blocks.max()) + 1)]
        count = min(min(int(zero[m].sum()) for m in members), len(members[0]) - 1)
        for m in members:
            zero[m[zero[m]][count:]] = False  # the block's zero channels past the common count stay
        return torch.nonzero(zero).flatten().tolist()
    for part in (*group.parts, torch.arange(group.channels)):
        if bool(zero[part].all()):
            zero[part[0]] = False
    return torch.nonzero(zero).flatten().tolist()


def _verify(model: nn.Module, small: nn.Module, example_inputs: ExampleInputs, rtol: float) -> None:
    with eval_mode(model), eval_mode(small), torch.no_grad():
        expected = output_tensors(forward(model, example_inputs))
        try:
            got = output_tensors(forward(small, example_inputs))
        except Exception as err:
            raise RuntimeError(
                f"The compact model does not run ({type(err).__name__}: {err}); a layer was resized that its "
                "neighbours do not follow. The original model is unchanged."
            ) from err
    shapes = [tuple(t.shape) for t in expected], [tuple(t.shape) for t in got]
    if shapes[0] != shapes[1]:
        raise RuntimeError(f"The compact model's outputs have shapes {shapes[1]}, the original's {shapes[0]}.")
    for e, g in zip(expected, got):
        if not e.is_floating_point():
            continue
        if not bool(torch.isfinite(e).all()):  # NaN compares as not greater than any tolerance
            raise RuntimeError(
                "The original model's outputs on `example_inputs` are not finite (NaN or inf), so the compact "
                "model cannot be checked against them; fix the weights (e.g. NaN after a diverged run) or pass "
                "`verify=False`."
            )
        if not bool(torch.isfinite(g).all()):
            raise RuntimeError("The compact model's outputs are not finite (NaN or inf) where the original's are.")
        scale = float(e.abs().max()) if e.numel() else 0.0
        error = float((e - g).abs().max()) if e.numel() else 0.0
        if error > rtol * max(scale, 1e-12) and error > 1e-6:
            raise RuntimeError(
                f"The compact model differs from the original by {error:.3g} (outputs up to {scale:.3g}); "
                "a pruned channel was not exactly zero in every entry it owns, or a layer is not supported."
            )


# ---------------------------------------------------------------------------------------------- saving
def _plain_attribute(m: nn.Module, attr: str) -> bool:
    """True when ``attr`` is a value stored on ``m`` (not a method, and not a property computed from its weights,
    such as this package's ``SwiGLU.intermediate_size``, which cannot be set)."""
    return (
        hasattr(m, attr) and not callable(getattr(m, attr)) and not isinstance(getattr(type(m), attr, None), property)
    )


def compact_state(model: nn.Module) -> dict[str, Any]:
    """What rebuilds a compact model from a fresh instance: its ``state_dict`` and its layers' widths.

    Example:
        >>> from torch import nn
        >>> from lightning_prune.structures.channel import prune_channels_
        >>> net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> _ = prune_channels_(net, torch.randn(2, 4), sparsity=0.5)
        >>> state = compact_state(compact(net, torch.randn(2, 4)))
        >>> state["widths"]["0"]
        {'in_features': 4, 'out_features': 5}
        >>> load_compact(nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2)), state)[2]
        Linear(in_features=5, out_features=2, bias=True)
    """
    widths = {
        name: {a: copy.deepcopy(getattr(m, a)) for a in _WIDTH_ATTRS if _plain_attribute(m, a)}
        for name, m in model.named_modules()
    }
    replaced = {
        name: {"type": type(m).__name__, "config": m.compact_config()}  # type: ignore[operator]
        for name, m in model.named_modules()
        if type(m).__name__ in _REPLACEMENTS and isinstance(m, _REPLACEMENTS[type(m).__name__])
    }
    return {
        "format": _COMPACT_FORMAT,
        "version": _COMPACT_VERSION,
        "architecture": type(model).__qualname__,
        "replaced": replaced,
        "widths": {n: w for n, w in widths.items() if w},
        "configs": {n: c for n, m in model.named_modules() if (c := _config_widths(m))},
        # block lists' lengths: a depth-pruned model (lightning_prune.deploy.depth) has fewer blocks than a fresh one
        "depths": {n: len(m) for n, m in model.named_modules() if _block_list(m)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_compact(model: nn.Module, path: str | Path) -> Path:
    """Save :func:`compact_state` of ``model`` to ``path``; returns the path.

    The file is written atomically (a failure leaves the previous file as it was) and holds a digest of its
    content, which :func:`load_compact` checks.

    Raises:
        TypeError: ``path`` is not a path.
        ArtifactWriteError: The file could not be written (an ``OSError`` naming the path and the reason).

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = save_compact(net, Path(folder) / "compact.pt")
        ...     load_compact(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), path)[0].out_features
        8
    """
    path = check_path(path)
    return atomic_save(with_digest(compact_state(model)), path)


@torch.no_grad()
def load_compact(model: nn.Module, state: Mapping[str, Any] | str | Path) -> nn.Module:
    """Resize a fresh, full-width ``model`` to a saved compact model's widths and load its weights, in place.

    Args:
        model: a new instance of the architecture that was compacted (same constructor arguments).
        state: :func:`compact_state`'s dict or the path :func:`save_compact` wrote.

    Returns:
        ``model``, now compact.

    Raises:
        FileNotFoundError: The file ``state`` names does not exist.
        ValueError: ``state`` is not a compact model (or a damaged, truncated or edited file), or was saved from
            another architecture.
    """
    if isinstance(state, (str, Path)):
        path = str(state)
        state = load_torch_file(state, "compact model")
        if isinstance(state, Mapping):
            verify_digest(state, path)
    if not isinstance(state, Mapping) or state.get("format") != _COMPACT_FORMAT:
        raise ValueError("`state` is not a compact model saved by lightning_prune.save_compact / compact_state.")
    if state.get("version") != _COMPACT_VERSION:
        raise ValueError(f"Compact model format version {state.get('version')!r} is not supported.")
    if state.get("architecture") != type(model).__qualname__:
        raise ValueError(
            f"The compact model was saved from a {state.get('architecture')}, not a {type(model).__qualname__}."
        )
    _truncate_blocks(model, state.get("depths", {}))
    _put_replacements(model, state.get("replaced", {}))
    modules = dict(model.named_modules())
    unknown = [n for n in (*state["widths"], *state.get("configs", {})) if n not in modules]
    if unknown:
        raise ValueError(f"The compact model has layers this {type(model).__qualname__} lacks: {unknown[:5]}.")
    current = model.state_dict()
    missing = sorted(set(current) - set(state["state_dict"]))
    unexpected = sorted(set(state["state_dict"]) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"The compact model's weights do not fit this {type(model).__qualname__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Build the model with the constructor arguments it was trained with."
        )
    for name, widths in state["widths"].items():
        for attr, value in widths.items():
            setattr(modules[name], attr, value)
    copies: dict[tuple[int, tuple], Any] = {}
    for name, fields in state.get("configs", {}).items():
        _set_config_widths(modules[name], fields, copies)
    for key, saved in state["state_dict"].items():
        if key in current and current[key].shape != saved.shape:
            module_name, _, attr = key.rpartition(".")
            owner = modules[module_name]
            blank = torch.empty(saved.shape, dtype=current[key].dtype, device=current[key].device)
            if attr in owner._parameters:
                old = owner._parameters[attr]
                owner._parameters[attr] = nn.Parameter(blank, requires_grad=old is None or old.requires_grad)
            else:
                owner._buffers[attr] = blank
    model.load_state_dict(state["state_dict"], strict=True)
    return model


def _put_replacements(model: nn.Module, replaced: Mapping[str, Any]) -> None:
    """Build the modules compaction put in place of others (:data:`_REPLACEMENTS`) and install them in ``model``."""
    if not isinstance(replaced, Mapping):
        raise ValueError(f"The compact model's `replaced` entry must be a mapping, got {type(replaced).__name__}.")
    modules = dict(model.named_modules())
    for name, entry in replaced.items():
        kind = entry.get("type") if isinstance(entry, Mapping) else None
        config = entry.get("config") if isinstance(entry, Mapping) else None
        if kind not in _REPLACEMENTS or not isinstance(config, Mapping):
            raise ValueError(
                f"The compact model replaces {name!r} by {kind!r}, which load_compact cannot build: it builds "
                f"{sorted(_REPLACEMENTS)}."
            )
        if not name or name not in modules:
            raise ValueError(f"The compact model has layers this {type(model).__qualname__} lacks: [{name!r}].")
        old = modules[name]
        reference = next(old.parameters(), None)
        factory = {"device": reference.device, "dtype": reference.dtype} if reference is not None else {}
        new = _REPLACEMENTS[kind](**config, **factory)
        new.train(old.training)
        model.set_submodule(name, new)


def _block_list(m: nn.Module) -> bool:
    """Whether ``m`` is a list of alike blocks (an ``nn.ModuleList`` or ``nn.Sequential`` whose children are all of
    one class), which depth pruning may shorten; a model's other containers (e.g. a CNN's ``features``) must match a
    fresh instance's exactly."""
    return isinstance(m, (nn.ModuleList, nn.Sequential)) and len({type(c) for c in m.children()}) == 1


def _truncate_blocks(model: nn.Module, depths: Mapping[str, int]) -> None:
    """Remove the trailing blocks of every block list of a fresh ``model`` that the saved compact model has fewer of
    (a depth-pruned model's blocks are numbered 0, 1, ... and are alike in a fresh model, so which ones stay does
    not matter: the weights and widths loaded next make them the saved ones)."""
    for name in sorted(depths, key=lambda n: (n.count(".") if n else -1, n)):  # outer block lists first
        container = dict(model.named_modules()).get(name)
        if container is not None and _block_list(container) and len(container) > depths[name] >= 1:
            remove_blocks_(model, list(range(depths[name], len(container))), name)
