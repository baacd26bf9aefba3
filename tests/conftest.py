"""Fixtures shared by the tests. Helpers that tests import (the Trainer builder, seeded weights, the zero checker,
the repository's paths) are in ``_checks.py``; ``pythonpath = ["tests"]`` makes it importable from every folder."""

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (intra-op threads only add synchronisation on a busy machine); use it
    in a module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Hypothesis draws the same examples on every run ("ci", the default): a failure reproduces and the suite never
# flickers. HYPOTHESIS_PROFILE=explore draws new ones (from `--hypothesis-seed=<seed>` when given, printed in the
# header); a failure prints the blob that reproduces it.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config: pytest.Config) -> str:
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    if settings.default.derandomize:
        return f"hypothesis: profile {profile!r}, derandomized"
    seed = config.getoption("hypothesis_seed", None)
    return f"hypothesis: profile {profile!r}, seed {seed if seed is not None else 'random'}"
