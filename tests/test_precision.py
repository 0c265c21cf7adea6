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


def test_casts_touch_only_floating_leaves():
    import numpy as np

    import realm_jax

    q = realm_jax.quantize(np.ones((2, 32), np.float32), "Q8_0")
    dense = realm_jax.quantize(np.ones((2, 32), np.float32), "F32")
    tree = {"q": q, "dense": dense, "norm": np.ones(4, np.float32), "ids": np.arange(3), "flag": np.array([True])}
    out = Policy.parse("bf16").cast_to_param(tree)
    assert out["q"] is q  # quantized blocks pass untouched, f16 scales included
    assert out["dense"].fmt == "BF16" and out["dense"].planes["w"].dtype == BF16
    assert out["norm"].dtype == BF16
    assert out["ids"].dtype == tree["ids"].dtype and out["flag"].dtype == bool
    assert Policy.parse("params=f32,compute=f16,output=f32").cast_to_compute(tree)["norm"].dtype == F16


class _FakeDevice:
    def __init__(self, platform, compute_capability=None):
        self.platform, self.compute_capability = platform, compute_capability


@pytest.mark.parametrize("platform, cc, want", [
    ("gpu", "9.0", BF16), ("gpu", "8.0", BF16), ("gpu", "7.5", F16), ("gpu", "5.3", F16), ("gpu", "5.2", F32),
    ("tpu", None, BF16), ("cpu", None, BF16), ("metal", None, F32),
])
def test_auto_per_device(platform, cc, want):
    assert auto_dtype(_FakeDevice(platform, cc)) == want
    assert Policy.inference(_FakeDevice(platform, cc)).compute == want


def test_logits_dtype_is_the_output_dtype():
    assert Policy.parse("compute=bf16,output=f16").logits == F16


@pytest.mark.parametrize("text", [5, None, b"bf16", ["bf16"]])
def test_policy_text_that_is_not_a_str_is_refused(text):
    with pytest.raises(DTypeError, match=rf"^precision: text=.* must be a str such as 'bf16' .*\(got "
                                         rf"{type(text).__name__}\)$"):
        Policy.parse(text)
