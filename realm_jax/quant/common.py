"""Small jnp helpers shared by the format modules: exact arithmetic on XLA and nibble/bit unpacking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def mul_add(a, b, c, *, exact: bool):
    """a * b + c, with the product rounded to f32 before the add when `exact`.

    XLA:CPU contracts a*b+c into one FMA (measured: a quarter of random f32 triples round differently),
    while gguf-py and llama.cpp's reference dequantizers round the product first. The barrier keeps the
    two roundings; kernels pass exact=False and let the compiler fuse.
    """
    prod = a * b
    if exact:
        prod = lax.optimization_barrier(prod)
    return prod + c


def true_div(a, divisor: float):
    """a / divisor as a real f32 division.

    XLA rewrites division by a constant into multiplication by its reciprocal, which rounds differently
    (measured for /15: 63% of random values); hiding the constant behind a barrier keeps the division.
    """
    return a / lax.optimization_barrier(jnp.float32(divisor))


def split_nibbles(q: jax.Array, group: int) -> jax.Array:
    """uint8 [..., n*group] -> [..., n, 2*group]: each group's low nibbles, then its high nibbles."""
    q = q.reshape(*q.shape[:-1], -1, group)
    return jnp.stack([q & 0xF, q >> 4], axis=-2).reshape(*q.shape[:-2], q.shape[-2], 2 * group)


def join_nibbles(q: jax.Array, group: int) -> jax.Array:
    """The inverse of `split_nibbles`: values 0..15 [..., n, 2*group] -> packed uint8 [..., n*group]."""
    q = q.astype(jnp.uint8).reshape(*q.shape[:-1], 2, group)
    packed = (q[..., 0, :] & 0xF) | (q[..., 1, :] << 4)
    return packed.reshape(*packed.shape[:-2], -1)


def round_away(x: jax.Array) -> jax.Array:
    """roundf(): halves away from zero, as gguf-py's np_roundf and C's roundf."""
    a = jnp.abs(x)
    floored = jnp.floor(a)
    return jnp.sign(x) * (floored + jnp.floor(2 * (a - floored)))
