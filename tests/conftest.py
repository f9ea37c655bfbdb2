import os

import pytest
import torch

# Tests are deterministic and sized for a 2-core CPU.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
