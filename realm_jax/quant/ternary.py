"""The ternary formats TQ1_0 and TQ2_0 (BitNet b1.58, TriLMs): every weight is d * t with t in {-1, 0, 1}.

Block structs (little-endian), 256 elements each:

    TQ1_0  | qs:48 B | qh:4 B | d:f16 |       54 B, 1.6875 bits/weight (five trits a byte, base 3)
    TQ2_0  | qs:64 B | d:f16 |                66 B, 2.0625 bits/weight (four 2-bit codes a byte)

TQ2_0: bits 2k+1:2k of byte j of chunk c (32 bytes) hold element 128c + 32k + j as t + 1.

TQ1_0 packs trits t + 1 in {0, 1, 2} as a fixed-point fraction of a byte: b = ceil(256 * v / 243) for the base-3
number v = 81 t0 + 27 t1 + 9 t2 + 3 t3 + t4 (t0 first). Trit i comes back as ((uint8(b * 3^i)) * 3) >> 8. The
bytes hold, in element order:

    qs[0:32]    trit i of byte j -> element 32i + j           (i = 0..4: elements 0..159)
    qs[32:48]   trit i of byte j -> element 160 + 16i + j     (elements 160..239)
    qh[0:4]     trit i of byte j -> element 240 + 4i + j      (i = 0..3: elements 240..255)

The planes are the fields. realm-jax reads these formats; it does not write them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.quant.block import Field, Format

F16, U8 = np.dtype(np.float16), np.dtype(np.uint8)
QK_K = 256
_POW3 = np.array([1, 3, 9, 27, 81], np.uint8)


def _trits(b: jax.Array, per: int, digits: int) -> jax.Array:
    """Bytes [..., n*per] -> trits - 1, int8 [..., n, digits * per] (digit-major)."""
    b = b.reshape(*b.shape[:-1], -1, 1, per)
    powers = jnp.asarray(_POW3[:digits], jnp.uint8)[:, None]
    t = (((b * powers).astype(jnp.uint16) * 3) >> 8).astype(jnp.int8) - 1  # b * 3^i wraps as uint8
    return t.reshape(*t.shape[:-2], digits * per)


def tile_tq1_0(p, *, exact: bool = False) -> jax.Array:
    del exact  # one product per element
    qs = p["qs"].reshape(*p["qs"].shape[:-1], -1, 48)
    lead = qs.shape[:-1]
    t = jnp.concatenate([_trits(qs[..., :32].reshape(*lead[:-1], -1), 32, 5),
                         _trits(qs[..., 32:].reshape(*lead[:-1], -1), 16, 5),
                         _trits(p["qh"], 4, 4)], axis=-1)  # [..., n, 256]
    y = p["d"].astype(jnp.float32)[..., None] * t.astype(jnp.float32)
    return y.reshape(*y.shape[:-2], -1)


def tile_tq2_0(p, *, exact: bool = False) -> jax.Array:
    del exact
    qs = p["qs"].reshape(*p["qs"].shape[:-1], -1, 2, 1, 32)
    t = ((qs >> jnp.arange(0, 8, 2, dtype=jnp.uint8)[:, None]) & 3).astype(jnp.int8) - 1  # [..., n, 2, 4, 32]
    y = p["d"].astype(jnp.float32)[..., None] * t.reshape(*t.shape[:-3], QK_K).astype(jnp.float32)
    return y.reshape(*y.shape[:-2], -1)


FORMATS = (
    Format("TQ1_0", 34, QK_K, 54, (Field("qs", U8, 48), Field("qh", U8, 4), Field("d", F16, 1)), tile_tq1_0),
    Format("TQ2_0", 35, QK_K, 66, (Field("qs", U8, 64), Field("d", F16, 1)), tile_tq2_0),
)
