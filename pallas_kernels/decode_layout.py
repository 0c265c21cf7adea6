"""The decode GEMV's load-time weight layout ("lanes"): every quantized format's planes as 32-bit words laid
out unit by unit along K with the rows N contiguous, and the activations quantized to int8 per 32 values.

A unit is U consecutive elements of a row along K: one super-block (256) for the k-quants, one block (32)
for the others. Each plane is [K / U, P, N]: P words (or scales) per unit, the N rows of the weight on the
last axis, so a thread's 16-byte load holds the same word of four consecutive rows, and a step of the
kernel works on [units, P, rows] tiles without any reshape.

The quants stay as stored, four codes to a 32-bit word ("code words"): the word's low nibbles (or bytes)
are four consecutive elements, the partners of four consecutive activations, which two `dp2a` multiply
(the activations quantized to int16 per 32: `quantize_x`). Where a format keeps a fifth or sixth bit apart (Q5_0, Q5_1,
Q5_K, Q6_K), those bits are rearranged at load so that one shift and one mask put them in place for a
code word (`H` planes below); nothing else is changed, so the layout holds exactly the bytes of the file.

    Q4_0, Q4_1   q [nb, 4, N] words of qs: word w's low nibbles pair with activation word w of the
                 block, its high nibbles with word 4 + w. d [nb, 1, N] (and m [nb, 1, N]).
    Q5_0, Q5_1   as Q4_0/Q4_1, plus H [nb, 1, N]: bit 8j + 4 + w (w < 4) or 8j + w - 4 (w >= 4) is the fifth
                 bit of code j of code word w (the code word paired with activation word w).
    Q8_0         q [nb, 8, N] words of qs (signed bytes); d [nb, 1, N].
    Q4_K         q [ns, 32, N]: word 8c + w of chunk c holds sub-block 2c in its low nibbles and 2c + 1 in
                 its high nibbles (activation word w of each); scm [ns, 16, N] the sub-blocks' six-bit scales
                 and mins, chunk by chunk: word 4c + i the scale of sub-block 2c + i, 4c + 2 + i its min
                 (i < 2; a unit's one [16, rows] tile, the A of `lanesdot`'s offset dots); d, dmin [ns, 1, N].
    Q5_K         as Q4_K, plus H [ns, 8, N] per sub-block, arranged as Q5_0's.
    Q6_K         q [ns, 32, N] words of ql; H [ns, 16, N]: two words per 32-element block s, word
                 2s + (w >= 4) holding the two high bits of code j of code word w at bits 8j + 2(w % 4);
                 sc [ns, 16, N] int8 scales of the 16-element sub-blocks; d [ns, 1, N]. H, sc and the
                 activations take the blocks in `Layout.order`: position 2g + high is the block word
                 group g holds in its low (high = 0) or high nibbles.
    Q8_K         q [ns, 64, N] words of qs (signed bytes); d [ns, 1, N] (f32).
    Q2_K         q [ns, 16, N] words of qs; sc [ns, 16, N] the scale bytes as stored (min << 4 | scale);
                 d, dmin [ns, 1, N].
    Q3_K         q [ns, 16, N] words of qs; H [ns, 8, N] words of hmask; sc [ns, 16, N] the six-bit scales
                 unpacked (realm_jax.quant's plane); d [ns, 1, N].
    IQ4_NL       as Q4_0 (codes index the format's table of 16 int8 values).
    MXFP4        as IQ4_NL, with e [nb, 1, N] (the E8M0 scale byte) for d.
    IQ4_XS       q [ns, 32, N] words of qs (sub-block s: words 4s..4s+3, as IQ4_NL's block); sc [ns, 8, N] the
                 six-bit scales unpacked; d [ns, 1, N].

nb = K / 32 blocks, ns = K / 256 super-blocks. N is padded to a multiple of `ROW_ALIGN` with zero rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from realm_jax.errors import UnsupportedFormatError
from realm_jax.quant import QTensor, get_format
from realm_jax.quant.common import round_away

__all__ = ["GEMV_FORMATS", "LAYOUTS", "ROW_ALIGN", "Layout", "from_lanes", "quantize_x", "to_lanes"]

ROW_ALIGN = 128  # rows are padded to a multiple of this (the smallest tile of rows)
U32 = jnp.uint32


@dataclasses.dataclass(frozen=True)
class Layout:
    """A format's lane layout: `unit` elements of K per plane row, `planes` name -> words per unit, and
    `sums`: the activations are summed per this many elements (16 or 32); `int_sums`: the sums are of the
    quantized activations (int32, as llama.cpp's Q6_K dot product subtracts 32 from the codes), else of
    the activations themselves (f32); `order`: the unit's blocks of 32 in the order the kernel takes them
    (position i holds the file's block order[i]; None: the file's order), for the activations and for
    every plane kept per block."""

    unit: int
    planes: dict[str, int]
    sums: int = 32
    int_sums: bool = False
    order: tuple[int, ...] | None = None

    @property
    def x_blocks(self) -> int:
        return self.unit // 32


LAYOUTS = {
    "Q4_0": Layout(32, {"q": 4, "d": 1}),
    "Q4_1": Layout(32, {"q": 4, "d": 1, "m": 1}),
    "Q5_0": Layout(32, {"q": 4, "h": 1, "d": 1}),
    "Q5_1": Layout(32, {"q": 4, "h": 1, "d": 1, "m": 1}),
    "Q8_0": Layout(32, {"q": 8, "d": 1}),
    "Q4_K": Layout(256, {"q": 32, "scm": 16, "d": 1, "dmin": 1}),
    "Q5_K": Layout(256, {"q": 32, "h": 8, "scm": 16, "d": 1, "dmin": 1}),
    # Q6_K: word group g (ql words 8g..8g+7) holds blocks 4(g // 2) + g % 2 (low nibbles) and that + 2
    # (high nibbles); taken as blocks 2g and 2g + 1, every index the kernel computes from g is affine in g.
    "Q6_K": Layout(256, {"q": 32, "h": 16, "sc": 16, "d": 1}, sums=16, int_sums=True,
                   order=(0, 2, 1, 3, 4, 6, 5, 7)),
    "Q8_K": Layout(256, {"q": 64, "d": 1}),
    # Only the tensor-core GEMM (`pallas_kernels.mma`) reads the following: no quantize_x, no GEMV.
    "Q2_K": Layout(256, {"q": 16, "sc": 16, "d": 1, "dmin": 1}),
    "Q3_K": Layout(256, {"q": 16, "h": 8, "sc": 16, "d": 1}),
    "IQ4_NL": Layout(32, {"q": 4, "d": 1}),
    "IQ4_XS": Layout(256, {"q": 32, "sc": 8, "d": 1}),
    "MXFP4": Layout(32, {"q": 4, "e": 1}),
}
GEMV_FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q8_K")  # pallas_kernels.decode


def _layout(fmt: str) -> Layout:
    if fmt not in LAYOUTS:
        raise UnsupportedFormatError(f"decode layout: {fmt} has none; formats: {', '.join(LAYOUTS)}")
    return LAYOUTS[fmt]


def _words(b: jax.Array) -> jax.Array:
    """bytes [..., 4n] (any 8-bit type) -> little-endian uint32 words [..., n]."""
    b = lax.bitcast_convert_type(b, jnp.uint8) if b.dtype != jnp.uint8 else b
    return lax.bitcast_convert_type(b.reshape(*b.shape[:-1], -1, 4), U32)


def _bytes(w: jax.Array, dtype=jnp.uint8) -> jax.Array:
    """The inverse of `_words`: uint32 [..., n] -> [..., 4n] in `dtype` (an 8-bit type)."""
    b = lax.bitcast_convert_type(w, jnp.uint8).reshape(*w.shape[:-1], -1)
    return b if dtype == jnp.uint8 else lax.bitcast_convert_type(b, dtype)


def _lanes(a: jax.Array, units: int) -> jax.Array:
    """[N, units * P] -> [units, P, N]."""
    return a.reshape(a.shape[0], units, -1).transpose(1, 2, 0)


def _rows(a: jax.Array, n: int) -> jax.Array:
    """The inverse of `_lanes` for the first n rows: [units, P, N] -> [n, units * P]."""
    return a[..., :n].transpose(2, 0, 1).reshape(n, -1)


# --- the fifth and sixth bits -------------------------------------------------------------------------
def _code_bit_positions() -> np.ndarray:
    """[8 code words, 4 codes] -> the bit of an H word holding that code's fifth bit (Q5 layouts)."""
    w, j = np.meshgrid(np.arange(8), np.arange(4), indexing="ij")
    return np.where(w < 4, 8 * j + 4 + w, 8 * j + w - 4)


def _spread5(bits: jax.Array) -> jax.Array:
    """Fifth bits [..., 32] in element order (element 4w + j: code j of code word w) -> H words [...]."""
    pos = jnp.asarray(_code_bit_positions().reshape(-1), U32)
    return jnp.sum(bits.astype(U32) << pos, axis=-1, dtype=U32)  # distinct bits: the sum is an OR


def _gather5(h: jax.Array) -> jax.Array:
    """The inverse of `_spread5`: H words [...] -> fifth bits uint8 [..., 32] in element order."""
    pos = jnp.asarray(_code_bit_positions().reshape(-1), U32)
    return ((h[..., None] >> pos) & 1).astype(jnp.uint8)


def _spread6(bits: jax.Array) -> jax.Array:
    """High 2-bit values [..., 32] in element order -> two H words [..., 2] (code word w in word w // 4,
    code j's bits at 8j + 2(w % 4))."""
    w, j = np.meshgrid(np.arange(8), np.arange(4), indexing="ij")
    pos = jnp.asarray((8 * j + 2 * (w % 4)).reshape(2, 16), U32)  # [word, 16 codes]
    b = bits.astype(U32).reshape(*bits.shape[:-1], 2, 16)
    return jnp.sum(b << pos, axis=-1, dtype=U32)


def _gather6(h: jax.Array) -> jax.Array:
    """The inverse of `_spread6`: [..., 2] words -> 2-bit values uint8 [..., 32] in element order."""
    w, j = np.meshgrid(np.arange(8), np.arange(4), indexing="ij")
    pos = jnp.asarray((8 * j + 2 * (w % 4)).reshape(2, 16), U32)
    return ((h[..., None] >> pos) & 3).astype(jnp.uint8).reshape(*h.shape[:-1], 32)


def _q5_bits(qh: jax.Array) -> jax.Array:
    """Q5_0/Q5_1 qh uint32 [N, nb] -> fifth bits [N, nb, 32] in element order."""
    return ((qh[..., None] >> jnp.arange(32, dtype=U32)) & 1).astype(jnp.uint8)


def _q5k_bits(qh: jax.Array) -> jax.Array:
    """Q5_K qh uint8 [N, ns*32] -> fifth bits [N, ns, 8 sub-blocks, 32] (bit s of byte j: element 32s + j)."""
    q = qh.reshape(*qh.shape[:-1], -1, 1, 32)
    return (q >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1


def _q6k_bits(qh: jax.Array) -> jax.Array:
    """Q6_K qh uint8 [N, ns*64] -> high 2 bits [N, ns, 8 x-blocks, 32]: x-block 4h + t, element j from
    bits 2t of qh[32h + j]."""
    q = qh.reshape(*qh.shape[:-1], -1, 2, 1, 32)
    return ((q >> (2 * jnp.arange(4, dtype=jnp.uint8))[:, None]) & 3).reshape(*qh.shape[:-1], -1, 8, 32)


# --- QTensor <-> lanes --------------------------------------------------------------------------------
def to_lanes(w: QTensor) -> dict[str, jax.Array]:
    """A 2-D QTensor (N, K) -> its lane planes (N padded to ROW_ALIGN). Traceable."""
    lay, (n, k) = _layout(w.fmt), w.shape
    p = {name: jnp.asarray(v) for name, v in w.planes.items()}
    p = {name: jnp.pad(v, ((0, -n % ROW_ALIGN), (0, 0))) for name, v in p.items()}
    units = k // lay.unit
    out = {"q": _lanes(_words(p["ql"] if w.fmt == "Q6_K" else p["qs"]), units)}
    for name in ("d", "m", "dmin", "e"):
        if name in lay.planes:
            out[name] = _lanes(p[name], units)
    if w.fmt in ("Q5_0", "Q5_1"):
        out["h"] = _lanes(_spread5(_q5_bits(p["qh"])), units)
    elif w.fmt in ("Q4_K", "Q5_K"):
        both = jnp.stack([p["scales"].reshape(-1, units, 4, 2), p["mins"].reshape(-1, units, 4, 2)], axis=3)
        out["scm"] = _lanes(both.reshape(both.shape[0], -1), units)  # chunk c: two scales, then two mins
        if w.fmt == "Q5_K":
            out["h"] = _lanes(_spread5(_q5k_bits(p["qh"])).reshape(p["qh"].shape[0], -1), units)
    elif w.fmt in ("Q2_K", "Q3_K", "IQ4_XS"):
        out["sc"] = _lanes(p["scales"], units)
        if w.fmt == "Q3_K":
            out["h"] = _lanes(_words(p["hmask"]), units)
    elif w.fmt == "Q6_K":
        order = list(lay.order)
        out["h"] = _lanes(_spread6(_q6k_bits(p["qh"]))[:, :, order].reshape(p["qh"].shape[0], -1), units)
        out["sc"] = _lanes(p["scales"].reshape(p["scales"].shape[0], units, 8, 2)[:, :, order].reshape(
            p["scales"].shape[0], -1), units)
    return out


def from_lanes(fmt: str, shape: tuple[int, int], lanes: dict[str, jax.Array]) -> QTensor:
    """The inverse of `to_lanes`: the QTensor (N, K) the lanes hold (the padding rows dropped). Traceable;
    under jit XLA fuses it into what reads the planes (the XLA path dequantizes from it)."""
    n, k = shape
    fmt_spec = get_format(fmt)
    p = {name: _rows(v, n) for name, v in lanes.items()}
    q = p.pop("q")
    planes = {}
    if fmt == "Q6_K":
        planes["ql"] = _bytes(q)
    else:
        planes["qs"] = _bytes(q, jnp.int8 if fmt in ("Q8_0", "Q8_K") else jnp.uint8)
    planes |= {name: p[name] for name in ("d", "m", "dmin", "e") if name in p}
    if fmt in ("Q5_0", "Q5_1"):
        bits = _gather5(p["h"]).astype(U32)  # [N, nb, 32]
        planes["qh"] = jnp.sum(bits << jnp.arange(32, dtype=U32), axis=-1, dtype=U32)
    elif fmt in ("Q4_K", "Q5_K"):
        both = p["scm"].reshape(n, -1, 4, 2, 2)
        planes["scales"], planes["mins"] = both[:, :, :, 0].reshape(n, -1), both[:, :, :, 1].reshape(n, -1)
        if fmt == "Q5_K":
            bits = _gather5(p["h"].reshape(n, -1, 8))  # [N, ns, 8, 32]
            planes["qh"] = jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8)[:, None], axis=-2,
                                   dtype=jnp.uint8).reshape(n, -1)
    elif fmt == "Q6_K":
        back = list(np.argsort(LAYOUTS[fmt].order))  # the file's block order
        bits = _gather6(p["h"].reshape(n, -1, 8, 2)[:, :, back])  # [N, ns, 8, 32]: x-block 4h + t
        bits = bits.reshape(n, -1, 2, 4, 32)
        shifts = (2 * jnp.arange(4, dtype=jnp.uint8))[:, None]
        planes["qh"] = jnp.sum(bits << shifts, axis=-2, dtype=jnp.uint8).reshape(n, -1)
        planes["scales"] = p["sc"].reshape(n, -1, 8, 2)[:, :, back].reshape(n, -1)
    elif fmt in ("Q2_K", "Q3_K", "IQ4_XS"):
        planes["scales"] = p["sc"]
        if fmt == "Q3_K":
            planes["hmask"] = _bytes(p["h"])
    elif fmt == "Q8_K":
        qs = planes["qs"].reshape(n, -1, 16)
        planes["bsums"] = jnp.sum(qs.astype(jnp.int16), axis=-1, dtype=jnp.int16).reshape(n, -1)
    return QTensor(fmt_spec.name, (n, k), planes)


# --- the activations ----------------------------------------------------------------------------------
# The activations are quantized to int16 per 32 values (d = max|x| / 32767) and multiplied by the int8
# codes with `dp2a` (two 16-bit activations by two 8-bit codes, added to a 32-bit sum): the error is d / 2
# per value, below what a bf16 product makes. llama.cpp's integer dot products quantize activations to int8
# per 32 (`dp4a`, four by four): one such part alone errs by up to max|x| / 254 per value, 4x a bf16
# product's error, and on the synthetic test models its greedy text leaves llama.cpp's (itself noisy) within
# a few tokens and its mean KL to it is 0.023 against 0.009 for the exact path, past the model tests' 0.01.
X_MAX = 32767


def quantize_x(x: jax.Array, fmt: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows of activations x [M, K] as the decode kernel reads them: int16 per 32 values (above).

    Returns (pairs int32 [2, M, K / U, U / 32 * 8]: for each four activations of a code word, part 0 holds
    the first two as int16 halves of a 32-bit word, part 1 the last two; d float32 [M, K / U, U / 32]: the
    scale, max|x| / 32767; sums [M, K / U, U / S] per S = layout.sums elements: float32 of the values, or
    int32 of the quantized values where layout.int_sums).
    """
    lay = _layout(fmt)
    m, k = x.shape
    x = x.astype(jnp.float32).reshape(m, k // 32, 32)
    if lay.order is not None:  # the blocks of each unit in the kernel's order
        x = x.reshape(m, k // lay.unit, lay.x_blocks, 32)[:, :, list(lay.order)].reshape(m, k // 32, 32)
    # max(|x| / X_MAX) is max|x| / X_MAX to the bit (rounding is monotonic), and XLA's GPU compile makes it
    # within the reduction's kernel, where a division after it took one more kernel a matmul
    d = jnp.max(jnp.abs(x) / X_MAX, axis=-1, keepdims=True)
    q = round_away(x / jnp.where(d == 0, 1, d)).astype(jnp.int32)  # |q| <= X_MAX: int16 values
    units = k // lay.unit

    def lanes(a):  # [M, K/32, ...] -> [M, units, per unit]
        return a.reshape(m, units, -1)

    # the int16 halves of a word, little-endian, in integer arithmetic (a bitcast of int16 pairs and a stack
    # of the two parts made XLA's GPU compile two more kernels a matmul: a slice and a concatenation)
    quads = q.reshape(m, k // 32, 8, 4)
    pairs = jnp.moveaxis((quads[..., 0::2] & 0xFFFF) | (quads[..., 1::2] << 16), -1, 0)  # [2, M, K/32, 8]
    if lay.int_sums:
        sums = jnp.sum(q.reshape(m, k // lay.sums, lay.sums), axis=-1)
    else:
        sums = jnp.sum(x.reshape(m, k // lay.sums, lay.sums), axis=-1)
    return pairs.reshape(2, m, units, -1), lanes(d[..., 0]), lanes(sums)
