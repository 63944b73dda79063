"""Beta draws reproducible from a torch generator (torch's Beta sampler takes none)."""

import numpy as np
import torch

from genforge.core.rng import symmetric_beta


def test_symmetric_beta_depends_only_on_the_generator_state_and_is_numpys_beta_for_that_seed():
    draws = [symmetric_beta(0.8, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1] and 0 < draws[0] < 1
    seed = int(torch.randint(1 << 30, (1,), generator=torch.Generator().manual_seed(3)))
    assert draws[0] == float(np.random.default_rng(seed).beta(0.8, 0.8))
    g = torch.Generator().manual_seed(3)
    assert symmetric_beta(0.8, g) != symmetric_beta(0.8, g)  # the generator advances
