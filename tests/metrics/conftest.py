"""Shared test helpers for the metrics tests."""

import numpy as np
import pytest


def frechet_reference(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance of two Gaussians (Heusel et al. 2017, eq. 6), written independently.

    tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD form that stays exact when
    the covariances are singular (some ReLU features are never active).
    """
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root @ s2 @ root).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@pytest.fixture(name="frechet_reference")
def frechet_reference_fixture():
    """The independent Frechet distance, for comparison with torch-fidelity's."""
    return frechet_reference
