"""Shared fixtures: explicit seeds, Pyro validation, and the packaged Omniglot data."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

from bayesmeta.data import packaged_omniglot_root


@pytest.fixture(autouse=True)
def _seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The folder holding Lake's two small background zips, shipped inside the package (never
    skipped: a checkout has them, nothing outside it is needed)."""
    return packaged_omniglot_root()


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
