"""Shared by every test folder."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run several times faster on one thread (no spinning worker threads on a shared CPU).

    A build sets torch's threads per clip itself (`fwdata.runtime.clip_threads`) and restores them.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
