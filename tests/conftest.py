"""Shared fixtures: devices, seeded generators, and one loaded default model per session."""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU"))]


@pytest.fixture
def gen():
    """A fresh, test-specific seeded generator (seed from the test's name, so inputs differ per test)."""
    seed = abs(hash(os.environ.get("PYTEST_CURRENT_TEST", ""))) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct loaded once for the whole session (skipped if the package is missing)."""
    from spd.models import ALIASES, DEFAULT_MODEL, load

    source = ALIASES[DEFAULT_MODEL]
    if not source.installed():
        pytest.skip(f"default model not installed: `{source.install_command}`")
    return load(DEFAULT_MODEL, device="cpu")
