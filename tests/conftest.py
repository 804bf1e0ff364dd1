"""Shared fixtures: explicit seeds, Pyro validation, and the shared Omniglot data."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

# ../shared sits beside the checkout, as on CI; BAYESMETA_SHARED overrides it.
SHARED = Path(os.environ.get("BAYESMETA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
OMNIGLOT_SMALL = SHARED / "data" / "omniglot"


@pytest.fixture(autouse=True)
def _seeded():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The folder holding Lake's two small background zips (never skipped: CI has it)."""
    if not (OMNIGLOT_SMALL / "images_background_small1.zip").is_file():
        raise FileNotFoundError(
            f"expected the shared Omniglot zips in {OMNIGLOT_SMALL}; set BAYESMETA_SHARED"
        )
    return OMNIGLOT_SMALL


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
