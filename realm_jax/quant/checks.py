"""Checks at the boundary of `quantize`, `dequantize` and `qmatmul`: what an argument is, whether the memory an
operation materialises fits (before it is allocated), and whether quantizing kept every value.

The checks of values and of memory run on concrete arrays only: under a transformation (a `jax.core.Tracer`)
they are skipped, so that tracing never reads data and never depends on it. The checks of types, dtypes and
shapes are static and run always.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax import preflight
from realm_jax.errors import ArgumentError, DTypeError, ShapeMismatchError
from realm_jax.inputs import shown
from realm_jax.quant.block import Format

__all__ = ["as_array", "check_dtype", "check_fits", "check_quantized", "copied_bytes", "is_concrete", "to_float32"]

# float32's overflow threshold: a wider float rounds to inf from 2^128 - 2^103 up (the midpoint between
# float32's largest value and 2^128 rounds to the even one, 2^128).
_F32_INF_FROM = 2.0**128 - 2.0**103
# No format with an f16 scale holds a value past 65504 * 4096 (Q6_K's reach: an int8 sub-scale of -128 times a
# 6-bit level of -32; every other one reaches less). A block a little too large for its format overflows the
# scale to inf (found in the scale planes); one far past this bound overflows the quantizer's own f32 sums
# instead, and Q3_K, Q6_K and IQ4_XS then write a zero block: refused on the block's max.
_F16_SCALED_MAX = 65504.0 * 4096


def as_array(x, what: str, name: str = "x", *, dtypes: tuple[np.dtype, ...] | None = None):
    """`x` as an array of floats JAX can hold (float16/bfloat16/float32/float64, float8s; or one of `dtypes`),
    without copying it: a jax array (or tracer) as it is, anything else through `np.asarray` (so that a
    broadcast view stays a view until the memory check has seen it).

    Raises:
      DTypeError: `x` is None, a string, or holds anything but floats (ints, bools, strings, objects).
      ShapeMismatchError: `x` is a ragged nested sequence.
    """
    if isinstance(x, (jax.Array, np.ndarray)):
        arr = x
    elif x is None or isinstance(x, (str, bytes)):
        raise DTypeError(f"{what}: {name} must be an array of floats, got {type(x).__name__}")
    elif hasattr(x, "__jax_array__"):
        arr = jnp.asarray(x)
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError, OverflowError) as e:
            if "inhomogeneous" in str(e):  # numpy's word for a ragged nested sequence
                raise ShapeMismatchError(f"{what}: {name} must be a rectangular array, got a ragged "
                                         f"{type(x).__name__} ({e})") from None
            raise DTypeError(f"{what}: {name} must be an array of floats, got {type(x).__name__} ({e})") from None
    dtype = np.dtype(arr.dtype)
    if dtypes is not None:
        if dtype not in dtypes:
            raise DTypeError(f"{what}: {name}.dtype={dtype} must be one of {', '.join(map(str, dtypes))} ({name}: "
                             f"{type(x).__name__})")
    elif not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize > 8:  # long double: JAX has no such type
        raise DTypeError(f"{what}: {name}.dtype={dtype} must be floating (float32, float16, bfloat16 or float64) "
                         f"({name}: {type(x).__name__})")
    return arr


def check_dtype(dtype, what: str, name: str = "dtype") -> np.dtype:
    """`dtype` as a floating dtype JAX holds as it is, or DTypeError naming `name`: float64 exists only with
    jax_enable_x64 (without it JAX would hand back float32 silently)."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise DTypeError(f"{what}: {name}={shown(dtype)} is not a dtype") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise DTypeError(f"{what}: {name}={dt} must be a floating dtype")
    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise DTypeError(f"{what}: {name}={dt} needs jax_enable_x64 (JAX holds no 64-bit arrays without it)")
    return dt


def is_concrete(*trees) -> bool:
    """Whether every leaf of `trees` is a concrete array (numpy, or a jax array that is not a tracer)."""
    return all(isinstance(v, np.ndarray) or (isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer))
               for v in jax.tree.leaves(trees))


def copied_bytes(arrays: Iterable, itemsize: int | None = None) -> int:
    """Bytes that putting `arrays` on a device allocates: none for jax arrays; a numpy array's logical size
    (a broadcast view counts in full), at `itemsize` bytes an element where given, except a C-contiguous one
    that a CPU device may use in place (this is a lower bound: nothing real is refused)."""
    cpu = jax.default_backend() == "cpu"
    total = 0
    for a in arrays:
        if isinstance(a, np.ndarray):
            size = itemsize or a.dtype.itemsize
            if not (cpu and a.flags.c_contiguous and size == a.dtype.itemsize):
                total += math.prod(a.shape) * size
    return total


def check_fits(what: str, need: int, trees) -> None:
    """MemoryBudgetError unless `need` bytes fit on the devices the jax arrays of `trees` live on (the
    default device where there are none)."""
    devices = {d for v in jax.tree.leaves(trees) if isinstance(v, jax.Array) for d in v.devices()}
    preflight.check_fits(what, need, sorted(devices, key=lambda d: d.id) or None)


@jax.jit
def _scan(x: jax.Array, scales: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
    """Whether x and each scale plane hold finite values only, and max |x|: one compiled reduction and one
    transfer for them all."""
    return jnp.stack([jnp.all(jnp.isfinite(a)) for a in (x, *scales)]), jnp.max(jnp.abs(x))


def _first(bad: jax.Array) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(jnp.argmax(bad.reshape(-1))), bad.shape))


def _at(index) -> str:
    return f"[{', '.join(map(str, index))}]"


def _f32(v) -> str:
    return str(np.float32(v))  # "3e+38", where float() would print float32's error in 17 digits


def to_float32(x, what: str) -> jax.Array:
    """`x` as the float32 jax array the quantizers read; ArgumentError where a finite value of a wider float
    is past float32's range (it would become inf), unless x is traced."""
    wide = np.dtype(x.dtype).itemsize > 4
    if wide and isinstance(x, np.ndarray):  # checked before the conversion, which would warn of the overflow
        _refuse_past_float32(x, np, what)
    x32 = jnp.asarray(x).astype(jnp.float32)
    # A concrete jax array inside a jit (a closed-over constant) gives a tracer here: its values are not read.
    if wide and not isinstance(x, np.ndarray) and not isinstance(x32, jax.core.Tracer):
        _refuse_past_float32(x, jnp, what)  # a jax float64 array exists under jax_enable_x64
    return x32


def _refuse_past_float32(x, xp, what: str) -> None:
    with np.errstate(invalid="ignore"):
        past = xp.isfinite(x) & (xp.abs(x) >= _F32_INF_FROM)
    if bool(past.any()):
        at = _first(jnp.asarray(past))
        raise ArgumentError(f"{what}: x{_at(at)}={float(x[at])!r} is past float32's range, which the values are "
                            f"taken in")


def check_quantized(x32: jax.Array, planes: dict, fmt: Format, what: str) -> None:
    """ArgumentError unless quantizing the concrete float32 `x32` to `fmt` kept every value.

    A quantized format holds finite values only (a NaN would quantize to 0, an inf poisons its block), and its
    float scale planes must not overflow (a block too large for an f16 scale dequantizes to inf or NaN). A float
    format (F32, F16, BF16) keeps NaN and inf as they are, but must not turn a finite value into inf.
    """
    dense = fmt.block_size == 1
    scales = [p for p in fmt.planes if jnp.issubdtype(p.dtype, jnp.floating)]
    finite, amax = jax.device_get(_scan(x32, tuple(planes[p.name] for p in scales)))
    limit = None if dense or not any(p.dtype == np.float16 for p in scales) else _F16_SCALED_MAX
    if finite.all() and (limit is None or amax <= limit):
        return
    if not dense and not finite[0]:
        at = _first(~jnp.isfinite(x32))
        raise ArgumentError(f"{what}: x{_at(at)}={_f32(x32[at])} is not finite; {fmt.name} holds finite values "
                            f"only")
    for p, ok in zip(scales, finite[1:]):
        plane = planes[p.name]
        if ok:
            continue
        if dense:  # the values themselves: wrong only where x was finite
            bad = ~jnp.isfinite(plane) & jnp.isfinite(x32)
            if bool(jnp.any(bad)):
                at = _first(bad)
                raise ArgumentError(f"{what}: x{_at(at)}={_f32(x32[at])} is past {fmt.name}'s range (it would "
                                    f"become {_f32(plane[at])})")
            continue
        *lead, col = _first(~jnp.isfinite(plane))
        _too_large(what, fmt, x32, lead, col // p.count * fmt.block_size,
                   f"overflows its {np.dtype(p.dtype)} scale {p.name!r}")
    if limit is not None and amax > limit:
        blocks = x32.reshape(*x32.shape[:-1], -1, fmt.block_size)
        *lead, block = _first(jnp.max(jnp.abs(blocks), axis=-1) > limit)
        _too_large(what, fmt, x32, lead, block * fmt.block_size, f"is past {_f32(limit)}, more than any format "
                   "with an f16 scale holds")


def _too_large(what: str, fmt: Format, x32: jax.Array, lead: list[int], start: int, why: str) -> NoReturn:
    block = x32[(*lead, slice(start, start + fmt.block_size))]
    raise ArgumentError(f"{what}: the block x{_at([*lead, f'{start}:{start + fmt.block_size}'])} is too large for "
                        f"{fmt.name}: its max |x|={_f32(jnp.max(jnp.abs(block)))} {why}")
