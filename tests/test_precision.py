"""Policy: parsing, presets, per-device automatic selection, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from realm_jax.errors import DTypeError
from realm_jax.precision import Policy, PrecisionMode, auto_dtype, resolve_policy

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


def test_modes_and_fields_parse():
    p = Policy.parse("bf16")
    assert (p.params, p.compute, p.kv, p.output, p.scores, p.norm) == (BF16, BF16, BF16, F32, F32, F32)
    assert Policy.parse("f32") == Policy.full()
    p = Policy.parse("params=f32, compute=f16, output=bf16")
    assert (p.params, p.compute, p.kv, p.output) == (F32, F16, F16, BF16)
    assert Policy.parse(str(p)) == p
    assert {m.value for m in PrecisionMode} == {"f32", "f16", "bf16", "auto"}


@pytest.mark.parametrize("text", ["f64", "compute=int8", "compute", "weights=bf16", ""])
def test_bad_policies_name_the_problem(text):
    with pytest.raises(DTypeError, match="precision"):
        Policy.parse(text)


def test_auto_on_cpu_is_bf16():
    cpu = jax.devices("cpu")[0]
    assert auto_dtype(cpu) == BF16
    assert resolve_policy(None, cpu) == resolve_policy("auto", cpu) == Policy.of(BF16)
    assert resolve_policy(Policy.full()) == Policy.full()
    with pytest.raises(DTypeError):
        resolve_policy(3.0)
