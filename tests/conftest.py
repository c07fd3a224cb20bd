"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite's tensors are tiny: intra-op threads gain nothing, and on a loaded 2-core machine
    # their synchronisation makes small-model loops many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
