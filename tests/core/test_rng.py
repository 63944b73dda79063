"""Beta draws reproducible from a torch generator (torch's Beta sampler takes none)."""

import numpy as np
import pytest
import torch
from scipy import stats

from genforge.core.rng import symmetric_beta


@pytest.mark.parametrize("alpha", [0.2, 0.8, 4.0])
def test_draws_follow_beta_alpha_alpha(alpha):
    g = torch.Generator().manual_seed(0)
    draws = np.array([symmetric_beta(alpha, g) for _ in range(3000)])
    assert ((draws > 0) & (draws < 1)).all()
    # moments of Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); standard errors ~0.005 / ~0.004
    assert abs(draws.mean() - 0.5) < 0.03
    assert abs(draws.var() - 1 / (4 * (2 * alpha + 1))) < 0.02
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert stats.kstest(1 - draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3  # symmetric about 1/2
    if alpha != 4.0:  # and not some other symmetric Beta
        assert stats.kstest(draws, stats.beta(4.0, 4.0).cdf).pvalue < 1e-6


def test_draws_depend_only_on_the_generator_state():
    def sequence(global_seed):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        g = torch.Generator().manual_seed(3)
        return [symmetric_beta(0.8, g) for _ in range(5)]

    first = sequence(0)
    assert sequence(1) == first  # the global torch and numpy generators play no part
    assert len(set(first)) == 5  # the generator advances with every draw
    g = torch.Generator().manual_seed(3)
    symmetric_beta(0.8, g)
    state = g.get_state()
    resumed = torch.Generator()
    resumed.set_state(state)
    assert symmetric_beta(0.8, resumed) == first[1]  # a saved generator state reproduces the stream
