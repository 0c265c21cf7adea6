"""Small helpers shared by the format modules: exact arithmetic on XLA, nibble/bit unpacking, codebooks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def rounded(*xs):
    """The values as materialized f32 arrays, so XLA cannot fuse them into what follows.

    XLA:CPU contracts a*b+c into one FMA (measured: a quarter of random f32 triples round differently),
    while gguf-py and llama.cpp's reference code (libggml is built without -mfma) round the product first.
    """
    out = lax.optimization_barrier(xs)
    return out if len(xs) > 1 else out[0]


def mul_add(a, b, c, *, exact: bool):
    """a * b + c, with the product rounded to f32 before the add when `exact` (kernels pass False and let
    the compiler fuse)."""
    prod = a * b
    return (rounded(prod) if exact else prod) + c


def true_div(a, b):
    """a / b as a real f32 division.

    XLA rewrites x / broadcast(d), a constant d included, into x * (1/d), which rounds differently
    (measured for /15: 63% of random values); a divisor broadcast to a's shape and materialized keeps the
    division.
    """
    a, b = jnp.broadcast_arrays(a, jnp.asarray(b, jnp.float32))
    return a / rounded(b)


def split_nibbles(q: jax.Array, group: int) -> jax.Array:
    """uint8 [..., n*group] -> [..., n, 2*group]: each group's low nibbles, then its high nibbles."""
    # A broadcast shift rather than a stack: kernels lower it on every backend (Triton stacks only on the
    # last axis).
    q = q.reshape(*q.shape[:-1], -1, 1, group)
    shifts = (4 * jnp.arange(2, dtype=jnp.uint8))[:, None]  # [2, 1]
    return ((q >> shifts) & 0xF).reshape(*q.shape[:-3], q.shape[-3], 2 * group)


def lookup16(codes: jax.Array, table) -> jax.Array:
    """table[codes] as float32, for integer codes 0..15 and a table of 16 values: a tree of selects on the
    codes' four bits, not an indexed read, so that a kernel holds no table array and needs no gather (Mosaic
    TPU lowers neither); the values are the table's exactly."""
    level = [float(v) for v in np.asarray(table, np.float32)]
    if len(level) != 16:
        raise ValueError(f"lookup16: the table must hold 16 values, got {len(level)}")
    for bit in range(4):
        on = ((codes >> bit) & 1) != 0
        level = [jnp.where(on, hi, lo) for lo, hi in zip(level[::2], level[1::2])]
    return level[0].astype(jnp.float32)


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


def codebook(hex_codes: str, values: tuple[int, ...], bits: int, per: int, dtype) -> np.ndarray:
    """An i-quant lattice codebook from its compact form: `hex_codes` holds one little-endian uint16 a
    point, its `per` coordinates `bits` bits each (coordinate 0 in the low bits) as indices into `values`.
    Returns [points, per] in `dtype`."""
    codes = np.frombuffer(bytes.fromhex(hex_codes), "<u2").astype(np.uint32)
    idx = (codes[:, None] >> (bits * np.arange(per, dtype=np.uint32))) & ((1 << bits) - 1)
    return np.asarray(values, dtype)[idx]
