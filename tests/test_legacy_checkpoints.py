"""Checkpoints written by lightning-prune 0.1.0 (the flat layout) resume under the current code to the same masks (bit
for bit) and the same weights (up to the few units in the last place by which CPU kernels differ between processors:
the expected weights were computed on one machine)."""

from __future__ import annotations

import pytest
import torch
from fixtures import legacy


@pytest.mark.parametrize("name", sorted(legacy.FIXTURES))
def test_a_legacy_checkpoint_resumes_to_the_same_weights_and_masks(name: str) -> None:
    expected = torch.load(legacy.HERE / f"{name}.expected.pt", weights_only=True)
    got = legacy.resume(name)
    assert got["masks"].keys() == expected["masks"].keys()
    for key, mask in expected["masks"].items():
        assert torch.equal(got["masks"][key], mask), key
    assert got["state_dict"].keys() == expected["state_dict"].keys()
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, mask in got["masks"].items():  # pruned weights are exactly zero after the resumed training
        assert not bool(got["state_dict"][key][~mask].any()), key
    # The resumed run went on pruning from the saved masks: the schedule's final target is reached.
    pruned = sum(int((~m).sum()) for m in got["masks"].values())
    saved = torch.load(legacy.HERE / f"{name}.ckpt", weights_only=True)
    state = next(iter(saved["callbacks"].values()))
    assert pruned > sum(int((~m).sum()) for m in state["masks"].values())
