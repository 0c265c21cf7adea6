"""The tensor-core GEMM (Pallas Triton): y = x @ dequant(w)^T for any rows of x, reading the lane layout of
the decode GEMV (`pallas_kernels.decode_layout`: no second copy of the weight).

Why a second kernel beside the GEMV: the GEMV (`pallas_kernels.decode`) multiplies every row of x by the
codes with `dp2a`, half an instruction a weight for each row, so at 8 or 16 rows it issues 5-20 instructions
a weight and cannot stream the weight at the memory's rate (an H200 issues ~5-6 a weight at its bandwidth).
Here each weight is dequantized once, in registers, for all the rows of x a program holds, and the tensor
cores multiply it by all of them: `mma` on bf16 (or f16) tiles.

A program owns `rows` consecutive weight rows, `x_rows` rows of x and a contiguous range of K (split where
the tiles alone give too few programs); it walks its units a chunk of 64 elements at a time: the chunk's
code words are unpacked with shifts and masks into a [64, rows] tile (the sub-block scales and offsets
applied in f32, then rounded to the compute dtype, as XLA's reference path rounds its dequantized weight),
and the transposed product [rows, 64] x [64, x_rows] joins the f32 accumulator [rows, x_rows]: the
weight is the `wgmma`'s register-fed operand (A; one pass through shared memory, in 16-byte stores, puts
it in the fragment layout), x the operand the pipelined copies bring into shared memory (B). (x @ w^T the
other way round made w the shared-memory operand, stored two bytes at a time: Q4_K 9.6 -> 9.2
instructions a weight a tile of 128 rows of x, 7.8 -> 7.3 at 16 rows, where `mma.sync` became `wgmma`.)
The elements of a chunk come out in the order the words hold them, not in K's order: x's columns are
permuted to match (`permute_x`, a gather over x) instead of moving weight bits.

A code becomes a float without a conversion instruction and, mostly, without a shift of its own
(`_placed`): one lop3 masks it where it lies in its word into the mantissa of 2^23, an exact subtraction
takes 2^23 (and the format's offset) away, and the code's scale, divided by the power of two of its bit
position, multiplies it: (code - offset) * scale exactly, as the reference computes it, before the one
rounding to the compute dtype. A word is shifted at most twice for its eight nibbles (`_halves`), not once
a code; the fifth and sixth bits join their nibbles four codes at a time (`_code_words`: a rotation and a
lop3 a word). At 16 rows of x and 4096x4096 that took the K loop from 6.6-12.1 to 6.1-9.5 instructions a
weight (Q4_0 ... Q3_K; `scripts/kernel_report.py`).

Decode (up to 64 rows of x) is one tile of x: every program multiplies all the rows, so each weight is
dequantized once. Prefill tiles x by `PREFILL_ROWS`: the programs of one weight tile, one per tile of x,
are neighbours in the grid (the tile of x varies fastest), so the weight comes from memory once and from
L2 for the others, and each dequantizes it again: `PREFILL_ROWS` rows of products per dequantization.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.decode_layout import LAYOUTS, ROW_ALIGN
from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError
from realm_jax.quant.iq4 import KVALUES
from realm_jax.quant.mxfp import E2M1, e8m0_half

__all__ = ["DECODE_ROWS", "FORMATS", "MAGIC", "MMA_ROWS", "PREFILL_ROWS", "TABLE_FORMATS", "MmaTiling", "gemm",
           "permute_x", "tiling_for"]

MMA_ROWS = 16  # the fewest rows of x a program multiplies (fewer are padded): one mma's rows
DECODE_ROWS = 64  # up to these rows of x, one tile of x: every program multiplies them all
PREFILL_ROWS = 128  # past them, tiles of this many rows of x, one a program
CHUNK = 64  # elements of K dequantized at a time
_SMS = 132
LO = 0x0F


@dataclasses.dataclass(frozen=True, kw_only=True)
class MmaTiling:
    """rows: weight rows per program (64 or 128); splits: programs along K; x_rows: rows of x a program
    multiplies (16, 32 or 64: M padded to a power of two; PREFILL_ROWS past DECODE_ROWS); num_warps: warps a
    program."""

    rows: int
    splits: int
    x_rows: int = MMA_ROWS
    num_warps: int = 4


def x_rows_for(m: int) -> int:
    """Rows of x a program multiplies: a power of two from MMA_ROWS to DECODE_ROWS, PREFILL_ROWS past it."""
    return max(MMA_ROWS, 1 << max(m - 1, 0).bit_length()) if m <= DECODE_ROWS else PREFILL_ROWS


def _padded(m: int, x_rows: int) -> int:
    return -(-m // x_rows) * x_rows


def chunk_size(fmt: str, k: int) -> int:
    """Elements of K dequantized at a time: CHUNK, or one 32-element block where K holds an odd number."""
    return CHUNK if k % CHUNK == 0 else LAYOUTS[fmt].unit


def _chunks_per_unit(fmt: str, chunk: int) -> int:
    return max(1, LAYOUTS[fmt].unit // chunk)


def _units_per_chunk(fmt: str, chunk: int) -> int:
    return max(1, chunk // LAYOUTS[fmt].unit)


def tiling_for(fmt: str, n: int, k: int, m: int = MMA_ROWS) -> MmaTiling:
    """128 weight rows a program (64 where N would give too few programs), then the fewest K splits (a
    power of two dividing the chunks) that keep the SMs busy, counting the tiles of x: decode (one tile of
    x, short programs) wants two programs an SM; prefill (M / PREFILL_ROWS tiles, long programs, and each
    split adds an f32 [M, N] partial product to write and sum) one wave with at most an eighth of the SMs
    idle. Prefill: eight warps, two warpgroups of 64 rows of x (128 registers a thread, so two programs
    fit an SM and one's dequantization overlaps the other's products)."""
    chunks = k // chunk_size(fmt, k)
    x_rows = x_rows_for(m)
    tiles = _padded(m, x_rows) // x_rows
    decode = x_rows <= DECODE_ROWS
    busy = 2 * _SMS if decode else _SMS - _SMS // 8
    options = [MmaTiling(rows=rows, splits=s, x_rows=x_rows, num_warps=4 if decode else 8)
               for rows in (128, 64) if n % rows == 0
               for s in (1 << i for i in range(chunks.bit_length())) if chunks % s == 0]
    enough = [t for t in options if tiles * n // t.rows * t.splits >= busy]
    if enough:
        return min(enough, key=lambda t: (n // t.rows * t.splits, -t.rows))
    return max(options, key=lambda t: (n // t.rows * t.splits, t.rows))


# --- the order of a chunk's elements ------------------------------------------------------------------
def _chunk_order(fmt: str, chunk: int = CHUNK) -> np.ndarray:
    """The element of the unit each position of a dequantized chunk holds, for each chunk of a unit: int
    [chunks per unit, chunk] (for the 32-element formats: [1, chunk] over the chunk's one or two units)."""
    units = chunk // 32
    if fmt in ("Q5_0", "Q5_1"):  # (unit, word p, nibble h, byte j) -> 32u + 4p + 16h + j
        u, p, h, j = np.meshgrid(np.arange(units), np.arange(4), np.arange(2), np.arange(4), indexing="ij")
        return (32 * u + 4 * p + 16 * h + j).reshape(1, chunk)
    if fmt in ("Q4_0", "Q4_1", "IQ4_NL", "MXFP4"):  # (unit, word p, byte j, nibble h) ->
        # 32u + 4p + j + 16h
        u, p, j, h = np.meshgrid(np.arange(units), np.arange(4), np.arange(4), np.arange(2), indexing="ij")
        return (32 * u + 4 * p + j + 16 * h).reshape(1, chunk)
    if fmt == "Q8_0":  # (unit, word p, byte b) -> 32u + 4p + b
        return np.arange(chunk).reshape(1, chunk)
    if fmt == "Q8_K":  # chunk c: words 16c..16c+15, byte b -> 4p + b
        return np.arange(256).reshape(4, CHUNK)
    if fmt in ("Q4_K", "Q5_K"):  # chunk c: (nibble h, word w, byte j) -> 64c + 32h + 4w + j
        c, h, w, j = np.meshgrid(np.arange(4), np.arange(2), np.arange(8), np.arange(4), indexing="ij")
        return (64 * c + 32 * h + 4 * w + j).reshape(4, CHUNK)
    if fmt == "IQ4_XS":  # chunk c: (sub-block u, word p, byte j, nibble h) -> 64c + 32u + 4p + j + 16h
        c, u, p, j, h = np.meshgrid(*(np.arange(n) for n in (4, 2, 4, 4, 2)), indexing="ij")
        return (64 * c + 32 * u + 4 * p + j + 16 * h).reshape(4, CHUNK)
    if fmt in ("Q2_K", "Q3_K"):  # chunk c: (field k2, word w, byte b) -> 128(c // 2) + 32k + 4w + b,
        c, k2, w, b = np.meshgrid(np.arange(4), np.arange(2), np.arange(8), np.arange(4), indexing="ij")
        return (128 * (c // 2) + 32 * (2 * (c % 2) + k2) + 4 * w + b).reshape(4, CHUNK)  # k = 2(c % 2) + k2
    if fmt == "Q6_K":  # chunk g: (nibble h, word w, byte j); block 2g + h of the layout's order
        order = np.asarray(LAYOUTS[fmt].order)
        g, h, w, j = np.meshgrid(np.arange(4), np.arange(2), np.arange(8), np.arange(4), indexing="ij")
        return (32 * order[2 * g + h] + 4 * w + j).reshape(4, CHUNK)
    raise UnsupportedFormatError(f"mma: {fmt} has no kernel; formats: {', '.join(FORMATS)}")


def permute_x(x: jax.Array, fmt: str, dtype, x_rows: int) -> jax.Array:
    """x [M, K] -> [M', K] in `dtype`: rows padded with zeros to whole tiles of `x_rows`, each chunk's
    columns in the order the kernel dequantizes the weight's elements (`_chunk_order`)."""
    m, k = x.shape
    chunk = chunk_size(fmt, k)
    order = _chunk_order(fmt, chunk)
    span = LAYOUTS[fmt].unit * _units_per_chunk(fmt, chunk)  # elements of K one row of `order` indexes into
    idx = (np.arange(k // span)[:, None] * span + order.reshape(-1)[None, :]).reshape(-1)
    x = jnp.pad(x.astype(dtype), ((0, _padded(m, x_rows) - m), (0, 0)))
    return x[:, idx]


# --- each format: a chunk's dequantized elements [CHUNK, rows] in `_chunk_order` ------------------------
_TN = (((0,), (1,)), ((), ()))  # w [chunk, rows] . x [x_rows, chunk] -> [rows, x_rows]
MAGIC = 0x4B000000  # the bits of float32 2^23: OR a code below 2^23 into them and the float is 2^23 + code


def _halves(words, s):
    """The halves s = 0, 1 of uint32 words with their nibbles at bits 4-19: words << 4 (bits 0-15 moved up
    four) and words >> 12 (bits 16-31 down twelve). Each nibble then sits at bit pp in 4..16 of its half, a
    place `_placed` reads without shifting it (two shifts a word, not one a code)."""
    return (words >> (12 * s)) << (4 * (1 - s))


def _pow2(e, sign: int = 1) -> jax.Array:
    """float32 2^(sign * e) of small integers e (uint32), from its exponent bits: a constant where e is."""
    exponent = (jnp.int32(127) + sign * e.astype(jnp.int32)).astype(jnp.uint32)
    return lax.bitcast_convert_type(exponent << 23, jnp.float32)


def _placed(src, pp, magic, bits: int = 4, offset: int = 0, *, interpret: bool) -> jax.Array:
    """float32 (code - offset) * 2^pp of the `bits`-bit code at bit pp of src (pp + bits <= 23), without a
    conversion instruction (a quarter of the tensor cores' issue rate on Hopper: one a weight would halve
    the kernel's speed): src masked into the mantissa of 2^23 (one lop3, the mask its immediate: `magic` is
    MAGIC read from memory, so that the compiler does not take that constant for the immediate and load each
    code's mask into a register; Q3_K ORs its codes' high bits into it) is 2^23 + code * 2^pp, less
    2^23 + offset * 2^pp exactly; the caller folds 2^-pp into the code's scale, so that the product is exact
    as the reference's (code - offset) * scale."""
    mask = jnp.uint32((1 << bits) - 1) << pp
    less = jnp.float32(8388608.0) + jnp.float32(offset) * _pow2(pp)
    src, mask, magic = jnp.broadcast_arrays(src, mask, magic)
    if interpret:
        return lax.bitcast_convert_type((src & mask) | magic, jnp.float32) - less
    [out] = pltriton.elementwise_inline_asm(
        "lop3.b32 $0, $1, $2, $3, 0xEA;", args=[src, mask, magic], constraints="=r,r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(src.shape, jnp.int32)])
    return lax.bitcast_convert_type(out, jnp.float32) - less


def _code_words(q, high, r, bits: int, interpret: bool):
    """Words of 4 codes of 4 + `bits` bits, code j at bits 8j..: the low nibbles of q (uint32 words) ORed
    with `high` rotated right by r, where it holds each code's higher bits `bits` above their place's bit
    4 (a rotation and a lop3 for four codes, where each code alone took a shift and two lop3)."""
    fields = (0x10 if bits == 1 else 0x30) * 0x01010101
    return (q & jnp.uint32(0x0F0F0F0F)) | (_rotr(high, r, interpret) & jnp.uint32(fields))


def _rotr(words, r, interpret: bool) -> jax.Array:
    """uint32 words rotated right by r (mod 32): one funnel shift (`shf.r.wrap`; the compiler makes two
    shifts, an OR and a mask of the amount of the same rotation written in jnp)."""
    words, r = jnp.broadcast_arrays(words, jnp.asarray(r, jnp.uint32) & 31)
    if interpret:
        return (words >> r) | (words << ((32 - r) & 31))
    [out] = pltriton.elementwise_inline_asm(
        "shf.r.wrap.b32 $0, $1, $1, $2;", args=[words, r], constraints="=r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.int32)])
    return lax.bitcast_convert_type(out, jnp.uint32)


def _bytes_at(words, magic, *, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """The bytes of uint32 words [..., rows], less 128, as float32 (byte - 128) * 2^pp [..., 2 s, 2 jj,
    rows] (byte 2s + jj, taken at bit pp = 8jj of the word shifted by 16s) and pp, placed by `_placed`."""
    dims = (1,) * (words.ndim - 1) + (2, 2, 1)
    src = words[..., None, None, :] >> (16 * _iota(dims, words.ndim - 1))
    pp = 8 * _iota(dims, words.ndim)
    return _placed(src, pp, magic, 8, 128, interpret=interpret), pp


def _signed_bytes(words, magic, *, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """The signed bytes of uint32 words as `_bytes_at` gives them: their two's complement flipped to 0..255
    once a word (one xor)."""
    return _bytes_at(words ^ jnp.uint32(0x80808080), magic, interpret=interpret)


def _iota(shape, dim: int, dtype=jnp.uint32) -> jax.Array:
    """Index along `dim` of a `shape` tile, made in the kernel (a constant array would be a captured input)."""
    return lax.broadcasted_iota(dtype, shape, dim)


def _legacy(fmt: str, get, part, rows: int, *, interpret: bool, magic) -> jax.Array:
    """The chunk's one or two 32-element units: dims (unit, word, byte, nibble) or (unit, word, byte)."""
    d = get("d", None).astype(jnp.float32)[:, :, None, None, :] if fmt != "Q8_0" else None
    q = get("q", None)  # [2, P, rows] uint32
    if fmt == "Q8_0":
        codes, pp = _signed_bytes(q, magic, interpret=interpret)  # [units, 8, 2, 2, rows]
        w = codes * (get("d", None).astype(jnp.float32)[:, :, None, None, :] * _pow2(pp, -1))
        return w.reshape(-1, rows)
    if fmt in ("Q5_0", "Q5_1"):  # code words of 5-bit codes: (unit, word p, nibble h) [, half s, byte jj]
        # the fifth bit of element 4p + j + 16h is H bit 8j + p + 4(1 - h): rotated right by p - 4h to 8j + 4
        p_, h_ = _iota((1, 4, 2, 1), 1), _iota((1, 1, 2, 1), 2)
        words = _code_words(q[:, :, None, :] >> (4 * h_), get("h", None)[:, :, None, :], p_ - 4 * h_, 1, interpret)
        dims = (1, 1, 1, 2, 2, 1)  # element 4p + 16h + 2s + jj at bit 16s + 8jj of word (p, h), taken at bit
        # 16s of the word shifted by 8jj
        src, pp = words[..., None, None, :] >> (8 * _iota(dims, 4)), 16 * _iota(dims, 3)
        codes, d = _placed(src, pp, magic, 5, 16 if fmt == "Q5_0" else 0, interpret=interpret), d[..., None, :]
    else:  # (unit, word p, half s, byte jj of the half, nibble h): element 4p + 2s + jj + 16h at bit
        # 16s + 8jj + 4h of word p
        dims = (1, 1, 2, 2, 2, 1)
        s_, jj_, h_ = _iota(dims, 2), _iota(dims, 3), _iota(dims, 4)
        src, pp = _halves(q[:, :, None, None, None, :], s_), 4 + 8 * jj_ + 4 * h_
        codes, d = _placed(src, pp, magic, 4, 8 if fmt == "Q4_0" else 0, interpret=interpret), d[..., None, :]
    w = codes * (d * _pow2(pp, -1))  # (code - offset) * d, exact
    if fmt in ("Q4_1", "Q5_1"):
        w = w + get("m", None).astype(jnp.float32)[:, :, None, None, None, :]
    return w.reshape(-1, rows)


def _low_kquant(fmt: str, get, c, rows: int, *, interpret: bool, magic) -> jax.Array:
    """Q2_K, Q3_K: chunk c (traced) of a 256-element unit: qs words 8(c // 2) + w hold, in their 2-bit fields
    k = 2(c % 2) + k2 (k2 = 0, 1), elements 128(c // 2) + 32k + 4w + b (byte b = 2s + bb); dims (k2, w // 4,
    w % 4, s, bb) with sub-block 8(c // 2) + 2k + w // 4 = 4c + 2 k2 + w // 4: scale words 4c..4c+3. A word
    shifted by 4(c % 2) once holds field k2 of byte b at bit 16s + 8bb + 2k2: taken at bit pp = 8bb + 2k2 of
    its half s (`_placed`)."""
    d = get("d", None).astype(jnp.float32)[0]  # [1, rows]
    dims = (2, 1, 1, 2, 2, 1)
    k2, s_, bb = _iota(dims, 0), _iota(dims, 3), _iota(dims, 4)
    q = get("q", (8 * (c // 2), 8))[0] >> jnp.asarray(4 * (c % 2), jnp.uint32)
    src, pp = q.reshape(1, 2, 4, 1, 1, rows) >> (16 * s_), 8 * bb + 2 * k2
    sc = get("sc", (4 * c, 4))[0].reshape(2, 2, 1, 1, 1, rows)  # sub-block 4c + 2 k2 + w // 4
    if fmt == "Q2_K":  # x = (d * scale) * q - dmin * min; scales[s] = min << 4 | scale
        scale, low = (sc & 0xF).astype(jnp.float32), (sc >> 4).astype(jnp.float32)
        dmin = get("dmin", None).astype(jnp.float32)[0]
        codes = _placed(src, pp, magic, 2, interpret=interpret)
        w = codes * ((d * scale) * _pow2(pp, -1)) - dmin * low
    else:  # Q3_K: q = code - 4 (1 - h), h = bit 4(c // 2) + k = 2c + k2 of hmask byte 4w + b: shifted by 2c
        # once, bit 16s + 8bb + k2 of word w; in its half, moved to the code's bit pp + 2 = 8bb + 2k2 + 2
        h = get("h", None)[0] >> jnp.asarray(2 * c, jnp.uint32)  # hmask words w
        hs = h.reshape(1, 2, 4, 1, 1, rows) >> (16 * s_)
        high = ((hs << (k2 + 2)) & (jnp.uint32(4) << pp)) | magic
        codes = _placed(src, pp, high, 2, 4, interpret=interpret)
        w = codes * ((d * (sc.astype(jnp.float32) - 32.0)) * _pow2(pp, -1))
    return w.reshape(CHUNK, rows)


def _kquant(fmt: str, get, c, rows: int, *, interpret: bool, magic) -> jax.Array:
    """Chunk c (traced) of a 256-element unit."""
    if fmt in ("Q2_K", "Q3_K"):
        return _low_kquant(fmt, get, c, rows, interpret=interpret, magic=magic)
    d = get("d", None).astype(jnp.float32)  # [1, 1, rows]
    if fmt == "Q8_K":
        q = get("q", (16 * c, 16))[0]  # [16, rows]
        codes, pp = _signed_bytes(q, magic, interpret=interpret)  # [16, 2, 2, rows]
        return (codes * (d[0] * _pow2(pp, -1))).reshape(CHUNK, rows)
    q = get("q", (8 * c, 8))[0]  # [8 words, rows]
    if fmt in ("Q5_K", "Q6_K"):  # code words of 5- or 6-bit codes, (nibble h, word w): code 4w + j of
        # block 2c + h (Q6_K: of the layout's order) is byte j of word (h, w), at bit 16s + 8jj (j = 2s + jj),
        # taken at bit 16s of the word shifted by 8jj
        h_, w_ = _iota((2, 1, 1), 0), _iota((1, 8, 1), 1)
        q = q[None] >> (4 * h_)
        if fmt == "Q6_K":  # H words 2(2c + h) + w // 4: code j of word w at bits 8j + 2(w % 4), to 8j + 4
            hw = get("h", (4 * c, 4))[0].reshape(2, 2, 1, rows)
            words = _code_words(q.reshape(2, 2, 4, rows), hw, 2 * _iota((1, 2, 4, 1), 2) - 4, 2, interpret)
        else:  # H word of sub-block 2c + h: code j of word w at bit 8j + 4 + w (w < 4) or 8j + w - 4
            hw = get("h", (2 * c, 2))[0][:, None, :]
            words = _code_words(q, hw, w_ - 8 * (w_ // 4), 1, interpret)
        dims = (1, 1, 2, 2, 1)
        src, pp = words.reshape(2, 8, rows)[:, :, None, None, :] >> (8 * _iota(dims, 3)), 16 * _iota(dims, 2)
        codes = _placed(src, pp, magic, 5 if fmt == "Q5_K" else 6, 32 if fmt == "Q6_K" else 0, interpret=interpret)
        if fmt == "Q6_K":  # (code - 32) * d * sc: exact (24 bits)
            sc = get("sc", (4 * c, 4))[0].astype(jnp.float32).reshape(2, 2, 1, 1, 1, rows)  # sub-block w // 4
            w = codes.reshape(2, 2, 4, 2, 2, rows) * ((d[0] * sc) * _pow2(16 * _iota((1, 1, 1, 2, 1, 1), 3), -1))
            return w.reshape(CHUNK, rows)
    else:  # (nibble h, word w, half s, byte jj of the half): code 4w + 2s + jj of sub-block 2c + h sits at
        # bit 16s + 8jj + 4h of word w
        dims = (2, 1, 2, 2, 1)
        h_, s_, jj_ = _iota(dims, 0), _iota(dims, 2), _iota(dims, 3)
        src, pp = _halves(q[None, :, None, None, :], s_), 4 + 8 * jj_ + 4 * h_
        codes = _placed(src, pp, magic, interpret=interpret)
    sc = get("scm", (4 * c, 2))[0].astype(jnp.float32)[:, None, None, None, :]  # sub-block 2c + h
    mn = get("scm", (4 * c + 2, 2))[0].astype(jnp.float32)[:, None, None, None, :]  # its min
    dmin = get("dmin", None).astype(jnp.float32)[0]
    w = codes * ((d[0] * sc) * _pow2(pp, -1)) - dmin * mn
    return w.reshape(CHUNK, rows)


def _prmt(a, b, sel, interpret: bool) -> jax.Array:
    """`prmt.b32`: byte k of the result is byte (sel >> 4k) & 7 of the eight bytes of a (0-3) and b (4-7),
    for uint32 a, b and selectors sel (their bit 3 clear; the low 16 bits read)."""
    a, b, sel = jnp.broadcast_arrays(a, b, sel)
    if interpret:
        out = jnp.zeros_like(a)
        for k in range(4):
            s_ = (sel >> (4 * k)) & 7
            byte = jnp.where(s_ < 4, a >> (8 * (s_ & 3)), b >> (8 * (s_ & 3))) & 0xFF
            out = out | (byte << (8 * k))
        return out
    [out] = pltriton.elementwise_inline_asm(
        "prmt.b32 $0, $1, $2, $3;", args=[a, b, sel], constraints="=r,r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])
    return lax.bitcast_convert_type(out, jnp.uint32)


def _table4(fmt: str, get, part, rows: int, *, interpret: bool, table, magic) -> jax.Array:
    """IQ4_NL and MXFP4 (the chunk's one or two blocks), IQ4_XS (chunk `part`: sub-blocks 2 part and
    2 part + 1): the codes index the format's 16 values. `table`: a gather from them in global memory
    (cached; prefill tiles), or four words holding them as bytes (value + 128; decode tiles), in which three
    byte permutations a half word of codes look them up in registers (the low eight values by the code's
    three low bits, the high eight, then one of the two by its fourth) and the bytes are placed as Q8_0's
    are: at 16 rows of x IQ4_NL 9.8 -> 7.5 instructions a weight, IQ4_XS 11.8 -> 7.9 (its registers 186-192
    -> 112), MXFP4 10.5 -> 7.7; in the eight-warp prefill tiles the permutations come out replicated
    (2 a weight, not 0.75: IQ4_NL 9.7 -> 10.8), so those keep the gather. Dims (block, word p, half i, byte
    pair s, byte jj): the code of nibble n = 4i + 2s + jj is element 4p + n // 2 + 16 (n % 2) of its
    block, the gather's (block, word p, byte j, nibble h) the same order."""
    if fmt in ("IQ4_NL", "MXFP4"):
        q = get("q", None)  # [units, 4, rows]
        if fmt == "MXFP4":  # 2^(e - 128): the table holds the E2M1 values doubled
            scale = e8m0_half(get("e", None))
        else:
            scale = get("d", None).astype(jnp.float32)
    else:
        q = get("q", (8 * part, 8))[0].reshape(2, 4, rows)
        sc = get("sc", (2 * part, 2))[0].astype(jnp.float32).reshape(2, 1, rows)
        scale = get("d", None).astype(jnp.float32)[0] * (sc - 32.0)
    if callable(table):  # the gather
        dims = (1, 1, 4, 2, 1)  # (block, word p, byte j, nibble h, rows)
        codes = ((q[:, :, None, None, :] >> (8 * _iota(dims, 2) + 4 * _iota(dims, 3))) & LO).astype(jnp.int32)
        return (scale[:, :, None, None, :] * table(codes)).reshape(-1, rows)
    half = 16 * _iota((1, 1, 2, 1), 2)
    sel = (q & jnp.uint32(0x77777777))[:, :, None, :] >> half
    pick = (((q >> 1) & jnp.uint32(0x44444444)) | jnp.uint32(0x32103210))[:, :, None, :] >> half
    t0, t1, t2, t3 = table
    values = _prmt(_prmt(t0, t1, sel, interpret), _prmt(t2, t3, sel, interpret), pick, interpret)
    codes, pp = _bytes_at(values, magic, interpret=interpret)  # [units, 4, 2, 2, 2, rows]
    return (codes * (scale[:, :, None, None, None, :] * _pow2(pp, -1))).reshape(-1, rows)


# The formats whose codes index a table of values: the table, a kernel input.
_TABLES = {"IQ4_NL": KVALUES, "IQ4_XS": KVALUES, "MXFP4": E2M1}
TABLE_FORMATS = frozenset(_TABLES)


def _table(fmt: str, x_rows: int) -> jax.Array:
    """The format's 16 values: for prefill tiles as float32 (`_table4` gathers from them), for decode tiles
    as bytes (value + 128) in four little-endian uint32 words (`_table4` permutes them in registers)."""
    if x_rows > DECODE_ROWS:
        return jnp.asarray(_TABLES[fmt], jnp.float32)
    return jnp.asarray((np.asarray(_TABLES[fmt], np.int16) + 128).astype(np.uint8).view("<u4"))


FORMATS = {f: functools.partial(_table4 if f in _TABLES else _legacy if LAYOUTS[f].unit == 32 else _kquant, f)
            for f in LAYOUTS}


# --- the kernel ---------------------------------------------------------------------------------------
def _kernel(*refs, fmt: str, names: tuple[str, ...], t: MmaTiling, chunk: int, chunks: int, stacked: bool,
            dtype, interpret: bool):
    layer_ref, x_ref, *plane_refs, magic_ref, o_ref = refs if stacked else (None, *refs)
    extra = {"magic": magic_ref[0]}  # MAGIC, read from memory rather than a constant: see `_placed`
    if fmt in _TABLES:
        *plane_refs, table_ref = plane_refs
        extra["table"] = ((lambda codes: table_ref[codes]) if table_ref.dtype == jnp.float32  # see `_table`
                          else tuple(table_ref[i] for i in range(4)))
    planes = dict(zip(names, plane_refs))
    m0 = pl.program_id(0) * t.x_rows  # the tile of x varies fastest: its neighbours share the weight tile
    r0 = pl.program_id(1) * t.rows
    c0 = pl.program_id(2) * chunks  # this program's first chunk
    lead = (layer_ref[0],) if stacked else ()
    per_unit, units_per = _chunks_per_unit(fmt, chunk), _units_per_chunk(fmt, chunk)

    def body(i, acc):
        index = c0 + i
        unit = index // per_unit if per_unit > 1 else index * units_per
        part = index % per_unit

        def get(name, words):
            """Plane `name` for the chunk's unit(s) and the program's rows: words (start, count) of one
            unit [1, count, rows], or all its words (None) of each unit [units_per, P, rows]."""
            p = LAYOUTS[fmt].planes[name]
            index = pl.ds(0, p) if words is None else pl.ds(words[0], words[1])
            return planes[name][(*lead, pl.ds(unit, units_per), index, pl.ds(r0, t.rows))]

        w = FORMATS[fmt](get, part, t.rows, interpret=interpret, **extra).astype(dtype)  # [chunk, rows]
        x = x_ref[pl.ds(m0, t.x_rows), pl.ds(index * chunk, chunk)]  # [x_rows, chunk]
        return acc + lax.dot_general(w, x, _TN, preferred_element_type=jnp.float32)  # [rows, x_rows]

    acc = lax.fori_loop(0, chunks, body, jnp.zeros((t.rows, t.x_rows), jnp.float32))
    o_ref[0] = acc.T.astype(o_ref.dtype)


def gemm(x, lanes: dict[str, jax.Array], *, fmt: str, layer=None, compute_dtype=jnp.bfloat16,
         tiling: MmaTiling | None = None, out_dtype=jnp.float32, interpret: bool = False) -> jax.Array:
    """x [M, K] @ dequant(w)^T as partial products [splits, M', N'] (their sum over axis 0, cut to [M, N],
    is the product; M' = M padded to whole tiles of x, N' the lanes' padded rows): f32, or out_dtype where
    K is not split (the one product rounded once from its f32 sums, so that no f32 [M', N'] is written and
    read again to cast it: prefill's case).

    Args:
      x: the activations [M, K].
      lanes: the weight's lane planes (`decode_layout.to_lanes`); with `layer`, stacks of them [L, ...].
      fmt: the weight's format.
      layer: None, or an int32 scalar: the layer of the stacked lanes to multiply, read in place.
      compute_dtype: bf16 or f16: the dtype the weight is rounded to and x is multiplied in.
      tiling: overrides `tiling_for`.
      out_dtype: the product's dtype where the tiling does not split K (partial sums stay f32).
      interpret: Pallas interpret mode (CPU).
    """
    if fmt not in FORMATS:
        raise UnsupportedFormatError(f"mma: {fmt} has no kernel; formats: {', '.join(FORMATS)}")
    m, k = x.shape
    stacked = layer is not None
    q = lanes["q"]
    n = q.shape[-1]
    unit = LAYOUTS[fmt].unit
    if m < 1 or n % ROW_ALIGN or q.shape[stacked] * unit != k:
        raise ShapeMismatchError(f"mma: x {x.shape} against {fmt} lanes "
                                 f"{ {key: v.shape for key, v in lanes.items()} }")
    t = tiling or tiling_for(fmt, n, k, m)
    chunk = chunk_size(fmt, k)
    total = k // chunk
    if n % t.rows or total % t.splits or t.x_rows % MMA_ROWS or (t.x_rows < m and t.x_rows < DECODE_ROWS):
        raise ShapeMismatchError(f"mma: {t} does not divide {n} rows and {total} chunks of {fmt}")
    dtype = jnp.dtype(compute_dtype)
    names = tuple(LAYOUTS[fmt].planes)
    tables = [_table(fmt, t.x_rows)] if fmt in _TABLES else []
    args = (permute_x(x, fmt, dtype, t.x_rows), *(lanes[name] for name in names), *tables,
            jnp.full((1,), MAGIC, jnp.uint32))
    if stacked:
        args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
    kernel = functools.partial(_kernel, fmt=fmt, names=names, t=t, chunk=chunk, chunks=total // t.splits,
                               stacked=stacked, dtype=dtype, interpret=interpret)
    return pl.pallas_call(
        kernel,
        grid=(_padded(m, t.x_rows) // t.x_rows, n // t.rows, t.splits),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.BlockSpec((1, t.x_rows, t.rows), lambda mt, i, s: (s, mt, i)),
        out_shape=jax.ShapeDtypeStruct((t.splits, _padded(m, t.x_rows), n),
                                       jnp.float32 if t.splits > 1 else jnp.dtype(out_dtype)),
        compiler_params=pltriton.CompilerParams(num_warps=t.num_warps, num_stages=2),
        interpret=interpret,
        name=f"mma_{fmt.lower()}",
    )(*args)
