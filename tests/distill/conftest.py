"""Shared fixtures of the distillation tests: the digits as RealData (train, test)."""

import pytest

from genforge.distill import load_real


@pytest.fixture(scope="session")
def digits():
    return load_real("digits")
