"""The XLA reference backend (`realm_jax.linear.base`): the shared cases, and qmatmul's input checks."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

import realm_jax
from realm_jax.errors import DTypeError, QTensorError, ShapeMismatchError
from realm_jax.linear.base import XlaWeight
from realm_jax.quant import repack
from helpers import random_qtensor
from linear_base import LinearTests

N = 40


class TestXla(LinearTests):
    BACKEND = "xla"
    ROWS = (1, 2, 16, 17, 64)  # the weight goes on the left of the dot up to 16 rows (decode)


def test_prepared_weight_is_dense_in_the_params_dtype(rng):
    w = realm_jax.linear.prepare(random_qtensor("Q4_K", N, 256, rng), realm_jax.Policy.of("bf16"), impl="xla")
    assert isinstance(w, XlaWeight) and w.qt.fmt == "BF16" and w.shape == (N, 256)


def test_validation(rng):
    w = random_qtensor("Q8_0", 8, 64, rng)
    with pytest.raises(ShapeMismatchError, match="must end in K=64"):
        realm_jax.qmatmul(np.zeros((2, 32), np.float32), w)
    with pytest.raises(DTypeError, match="int32"):
        realm_jax.qmatmul(np.zeros((2, 64), np.int32), w)
    with pytest.raises(DTypeError, match="compute_dtype"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), w, compute_dtype=jnp.int8)
    with pytest.raises(QTensorError, match="must be a QTensor"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), np.zeros((8, 64), np.float32))
    stacked = repack(np.zeros((2 * 8 * 2 * 34,), np.uint8), "Q8_0", (2, 8, 64))
    with pytest.raises(ShapeMismatchError, match="2-D"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), stacked)
    broken = realm_jax.QTensor("Q8_0", (8, 64), {"d": w.planes["d"]})
    with pytest.raises(QTensorError, match="planes must be"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), broken)
    with pytest.raises(ValueError, match="impl='fast'"):
        realm_jax.qmatmul(np.zeros((2, 64), np.float32), w, impl="fast")
    with pytest.raises(ValueError, match="activation='relu'"):
        realm_jax.linear.glu(np.zeros((2, 64), np.float32), w, "relu")
