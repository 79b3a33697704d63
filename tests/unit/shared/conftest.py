"""Fixtures for the shared-package tests."""

from __future__ import annotations

import pytest
import torch

from tests.devices import devices


@pytest.fixture(params=devices("cuda:0"))
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device the tests run on: the CPU, and cuda:0 when there is one (skipped if not)."""
    param: str = request.param
    return torch.device(param)
