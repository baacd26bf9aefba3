"""Fixtures shared by the tests. Helpers that tests import (the Trainer builder, seeded weights, the zero checker,
the repository's paths) are in ``_checks.py``; ``pythonpath = ["tests"]`` makes it importable from every folder."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (intra-op threads only add synchronisation on a busy machine); use it
    in a module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
