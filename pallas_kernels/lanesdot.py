"""The block-dot GEMM on the lanes (Pallas Triton): y = x @ dequant(w)^T for 1-16 rows of x, one tensor-core
dot per 16 codes of a sub-block, the codes fed to the `mma.sync` from registers, on the decode GEMV's lane
layout (`pallas_kernels.decode_layout`: no second copy of the weight). Q4_K, Q5_K, Q6_K.

Why: the GEMV (`pallas_kernels.decode`) pays half an instruction a weight for each row of x (`dp2a`), and
the lanes' tensor-core GEMM (`pallas_kernels.mma`), which XLA's own Triton (the device's compiler) compiles
to 12.6-25.8 instructions a weight at 16 rows of x (`scripts/kernel_report.py --compiler xla`: it moves the
dequantized tile's broadcasts through shared memory element by element), loses to the GEMV up to 8 rows.
The block-dot GEMM (`pallas_kernels.blockdot`) does better on its own layout, a second copy of the weight.
This is its design on the lanes (XLA's Triton, 8 / 16 rows of x, 4096x4096: Q4_K 2.8 / 3.7 instructions a
weight, Q5_K 4.6 / 6.1, Q6_K 6.3 / 6.9, against the GEMV's 9.3 / 18.6, 13.1 / 26.3, 13.3 / 26.6):

- **The operand.** A lane plane's word w of a unit for weight row n, viewed as two uint16 (halves h = 0, 1),
  is a [16, rows] tile of a chunk's eight words with no data moved: K row 2w + h, the same K row's uint16 for
  every weight row. The uint16 (w, h) of chunk c holds in nibble j the code of element 4w + 2h + j // 2 of
  sub-block 2c + j % 2 (Q6_K: of the block at position 2c + j % 2, `Layout.order`, its sub-block w // 4);
  nibble j of the tile, two codes at a time, is one lop3 from the f16 pair 1024 + q (j even) or 1024 + 16 q
  (j odd; `blockdot._pairs`): exact, no conversion, and the tile keeps its shape from the load to the dot,
  which takes it transposed (`[16, rows]^T x [16, x_rows]`). Two nibbles (16 elements each) are a 32-element
  sub-block's dot. Q6_K's tile holds two 16-element sub-blocks (rows 0-7, 8-15): each nibble meets x twice,
  each time with the other sub-block's rows of x zero, a dot per sub-block.
- **The fifth and sixth bits** stay in the GEMV's H words, one a sub-block: the tile of a row's H word
  halves broadcast over the K rows they serve; one rotation of the 32-bit register (its amount, from the
  K row, puts both halves' bits at bit 4 or 8 of their lane) and a lop3 OR them into the nibble's f16
  (`_with_high`: 1024 + q of five or six bits, or 1024 + 16 q).
- **x** permuted to that order (`prepare_x`), in f16, each row scaled by a power of two so that its largest
  value is in [2^14, 2^15) (exact; undone on the output), the high nibbles' x divided by 16 (their codes sit
  at 16 q).
- **The offsets and mins**, as `blockdot` takes them: a sub-block's dot is P = c X + sum q x (X the
  sub-block's sum of x, c = 1024 or 64), w = d sc q - dmin mn (Q6_K: d sc (q - 32)), so y = d (sum sc P - sum
  sc c' X) - dmin sum mn X (c' = c, or c + 32). The sum of sc P is one FFMA an output a sub-block; the
  offset sums are dots of the unit's scales (and mins: Q4_K's and Q5_K's "scm" plane, one [16, rows] tile)
  against c' X (and X), each in two f16 parts (~22 bits together: the cancellation against 1024 X needs
  them): four (Q6_K: two) [16, rows]^T x [16, x_rows] dots a unit.

The product is the exact f32 dot of the weight with x rounded to f16, up to the f32 accumulation: closer to
the f64 product than the reference path, which rounds the weight to bf16.

The grid: two warps a program (`mma.sync`; four make `wgmma`s, each fenced and waited for), `rows` weight
rows a program (`tiling_for`), K split into ranges of whole units so that every SM has two programs;
partial sums [splits, M, N'] f32, summed here. On a CPU the kernel runs in Pallas interpret mode, the lop3
and the rotation written in jnp (the same bits).
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

from pallas_kernels.blockdot import _CORRECTION_SCALE, _pairs, _pow2, hi_lo, launch, scale_rows
from pallas_kernels.decode_layout import LAYOUTS, ROW_ALIGN
from pallas_kernels.ptx import fma
from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError

__all__ = ["FORMATS", "MAX_ROWS", "DOT_K", "DotTiling", "gemm", "prepare_x", "tiling_for"]

FORMATS = ("Q4_K", "Q5_K", "Q6_K")
MAX_ROWS = 16  # rows of x (padded to 8 or 16: the mma's N)
_UNIT = 256
_SMS = 132
# A unit's rows of x^T (Q6_K: each sub-block's x twice, the other sub-block of its tile zero: 512) and of the
# offset dots' B (four dots of K 16: c X and X in two parts each; Q6_K: two, c X)
_X_K = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 512}
_OFFSET_K = {"Q4_K": 64, "Q5_K": 64, "Q6_K": 32}
DOT_K = {fmt: _X_K[fmt] + _OFFSET_K[fmt] for fmt in FORMATS}  # the K of a unit's dots, the offsets' included
# The plane of the sub-blocks' integer scales (Q4_K, Q5_K: and mins; `decode_layout`), one [16, rows] tile a unit
_SCALES = {"Q4_K": "scm", "Q5_K": "scm", "Q6_K": "sc"}
# Formats whose kernel loops over a unit's four chunks rather than unrolling them: unrolled, Q5_K's and Q6_K's
# take 4.3 and 12 s of compile (CPU, XLA's Triton, the whole program) for 5.33 and 6.45 instructions a weight at
# 16 rows of x, against 0.6-0.9 s for 6.11 and 6.90 in a loop; Q4_K's 2.4-2.8 s for 3.67, against 3.91.
LOOP_CHUNKS = frozenset({"Q5_K", "Q6_K"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotTiling:
    """rows: weight rows a program (a multiple of 32: two warps' m16 dots); splits: programs along K (whole
    units each); x_rows: rows of x (8 or 16, the mma's N); num_warps: two (Triton's `mma.sync`)."""

    rows: int = 128
    splits: int = 1
    x_rows: int = 16
    num_warps: int = 2


def tiling_for(fmt: str, n: int, k: int, m: int) -> DotTiling:
    """128 weight rows a program at 8 rows of x, 64 at 16 (where 128 hold 232-255 registers a thread and spill
    on pip's triton) and for Q6_K (twice the dots a unit), or fewer where fewer rows give every SM two
    programs; the fewest K splits (dividing the units) that do; else 32 rows and a unit a program."""
    units = k // LAYOUTS[fmt].unit
    x_rows = 8 if m <= 8 else 16
    divisors = [s for s in range(1, units + 1) if units % s == 0]
    for rows in (128, 64, 32) if x_rows == 8 and fmt != "Q6_K" else (64, 32):
        if n % rows == 0:
            splits = next((s for s in divisors if n // rows * s >= 2 * _SMS), None)
            if splits is not None:
                return DotTiling(rows=rows, splits=splits, x_rows=x_rows)
    return DotTiling(rows=32, splits=units, x_rows=x_rows)


# --- x --------------------------------------------------------------------------------------------------
def _positions(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(the element of a unit each row of the kernel's x^T holds, -1 for a zero; the layout's block position
    of each element of a unit). Q4_K, Q5_K: row 64 c + 16 j + 2 w + h (chunk c, nibble j, word w, half h) is
    element 4 w + 2 h + j // 2 of sub-block 2 c + j % 2. Q6_K: row 128 g + 32 j + 16 i + 2 w + h (group g,
    nibble j, sub-block i of the tile's two) is element 4 w + 2 h + j // 2 of the block at position
    2 g + j % 2 (`Layout.order`) where w // 4 = i, else zero."""
    order = np.asarray(LAYOUTS[fmt].order or range(8))
    if fmt == "Q6_K":
        g, j, i, w, h = np.meshgrid(*(np.arange(n) for n in (4, 4, 2, 8, 2)), indexing="ij")
        element = 32 * order[2 * g + j % 2] + 4 * w + 2 * h + j // 2
        rows = np.where(w // 4 == i, element, -1)
    else:
        c, j, w, h = np.meshgrid(np.arange(4), np.arange(4), np.arange(8), np.arange(2), indexing="ij")
        rows = 32 * (2 * c + j % 2) + 4 * w + 2 * h + j // 2
    return rows.reshape(-1), np.repeat(np.argsort(order), 32)


def prepare_x(x: jax.Array, fmt: str, x_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, K] -> (x^T [K / 256 * _X_K, M'] f16 in the kernel's order, B [K / 256 * _OFFSET_K, M'] f16, row
    scales [M] f32): each row times a power of two (its largest magnitude into [2^14, 2^15)) rounded to f16,
    the elements the high nibbles hold divided by 16, each unit's elements in `_positions`' order; the row
    scales undo the powers of two on the output. B: the offset dots' B operands, against the unit's tile of
    scales (`_SCALES`), each value in two f16 parts (hi, lo) times _CORRECTION_SCALE, X a sub-block's sum of
    the scaled f16 row and c = 1024 for the low nibbles' sub-blocks, 64 for the high ones' (their x divided
    by 16): Q4_K, Q5_K (row 4 c + i: the scale of sub-block 2 c + i, row 4 c + 2 + i: its min) c X, then X
    at the mins' rows; Q6_K (row 2 s + i: sub-block i of the block at position s) (c + 32) X."""
    k = x.shape[1]
    units = k // _UNIT
    x16, e = scale_rows(x, x_rows, k)
    m_pad = x16.shape[0]
    x16 = x16.reshape(m_pad, units, _UNIT)
    rows, position = _positions(fmt)
    place = jnp.asarray(np.where(position % 2 == 1, 1 / 16, 1.0), jnp.float16)  # a high nibble's element
    padded = jnp.concatenate([x16 * place, jnp.zeros((m_pad, units, 1), jnp.float16)], axis=-1)
    xt = padded[:, :, np.where(rows < 0, _UNIT, rows)].reshape(m_pad, units * _X_K[fmt]).T
    sub = 16 if fmt == "Q6_K" else 32  # a sub-block's elements
    sums = jnp.sum(x16.astype(jnp.float32).reshape(m_pad, units, _UNIT // sub, sub), axis=-1) * _CORRECTION_SCALE
    block_pos = np.argsort(np.asarray(LAYOUTS[fmt].order or range(8)))  # each file block's position
    c = np.where(np.repeat(block_pos, 32 // sub) % 2 == 1, 64.0, 1024.0)  # per sub-block, in file order

    if fmt == "Q6_K":  # in layout order: row 2 s + i, the block at position s
        file_rows = np.asarray([2 * LAYOUTS[fmt].order[p // 2] + p % 2 for p in range(16)])
        cx = (sums * jnp.asarray(c + 32.0, jnp.float32))[:, :, file_rows]
        b = jnp.stack(hi_lo(cx), axis=2)  # [M', units, 2 dots, 16]
    else:
        def tile_rows(v, at_min: bool):  # sub-block values -> the scm tile's 16 rows, zeros elsewhere
            v = v.reshape(m_pad, units, 4, 1, 2)
            zero = jnp.zeros_like(v)
            return jnp.concatenate([zero, v] if at_min else [v, zero], axis=3).reshape(m_pad, units, 16)

        cx = sums * jnp.asarray(c, jnp.float32)
        b = jnp.stack([tile_rows(p, at_min) for v, at_min in ((cx, False), (sums, True)) for p in hi_lo(v)], axis=2)
    return xt, b.reshape(m_pad, units * _OFFSET_K[fmt]).T, _pow2(-e)


# --- the kernel ---------------------------------------------------------------------------------------
_TN = (((0,), (0,)), ((), ()))  # a [16, rows] tile . a [16, x_rows] one -> [rows, x_rows]


def _high_bit_places(fmt: str, jj: int) -> jax.Array:
    """uint16 [16, 1]: for each row (word w, half h) of a tile, the bit of its half of the H word where the
    high bits of the code in byte 2 h + jj sit (`decode_layout`): Q6_K (H word of sub-block w // 4) 8 jj +
    2 (w % 4); Q5_K (H word of the sub-block) 8 jj + 4 + w (w < 4) or 8 jj + w - 4. Made in the kernel (a
    constant array would be a captured input)."""
    w = lax.broadcasted_iota(jnp.int32, (16, 1), 0) // 2
    place = 2 * (w % 4) if fmt == "Q6_K" else jnp.where(w < 4, w + 4, w - 4)
    return (8 * jj + place).astype(jnp.uint16)


def _with_high(words, high, jj: int, p: int, places, bits: int, *, interpret: bool) -> jax.Array:
    """The code in byte 2 h + jj, nibble p (low or high) of each uint16 of `words` with its `bits` high bits
    from `high` (each row's H word half, those bits at `places`, a [16, 1] array) as f16, exact: 1024 + q
    (p = 0) or 1024 + 16 q (p = 1): the nibble's lop3 (`blockdot._pairs`), one rotation of the H words that
    puts the high bits of both halves of a 32-bit register at bit t = 4 (or 8) of their lane, whatever the
    row (the rotation's amount, (place - t) mod 32, is the same for both halves: a row's two halves come
    from one word, or two rows hold the same place), and a lop3 that ORs them in."""
    t = 8 if p else 4
    mask, high_mask = (0xF0 if p else 0x0F), ((1 << bits) - 1) << t
    places = jnp.broadcast_to(jnp.asarray(places, jnp.uint16), words.shape)
    if interpret:
        low = (words >> (8 * jj)) & mask
        up = jnp.where(places >= t, high >> (places - t), high << (t - places)) & high_mask
        return lax.bitcast_convert_type((low | up | 0x6400).astype(jnp.uint16), jnp.float16)
    amount = (places + (32 - t)) & 31
    low = "shr.b32 a, $1, 8;" if jj else "mov.b32 a, $1;"
    asm = (f"{{.reg .b32 a, h; {low} shf.r.wrap.b32 h, $2, $2, $3; "
           f"lop3.b32 a, a, {mask << 16 | mask:#010x}, 0x64006400, 0xEA; "
           f"lop3.b32 $0, h, {high_mask << 16 | high_mask:#010x}, a, 0xEA;}}")
    [out] = pltriton.elementwise_inline_asm(asm, args=[words, high, amount], constraints="=r,r,r,r", pack=2,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float16)])
    return out


def _kernel(*refs, fmt: str, t: DotTiling, steps: int, stacked: bool, interpret: bool):
    if stacked:
        layer_ref, *refs = refs
        lead = (layer_ref[0],)
    else:
        lead = ()
    xt_ref, b_ref, q_ref, *refs = refs
    h_ref = refs.pop(0) if fmt != "Q4_K" else None
    scales_ref, d_ref, *refs = refs
    dmin_ref = refs.pop(0) if fmt != "Q6_K" else None
    (o_ref,) = refs
    rows = pl.ds(pl.program_id(0) * t.rows, t.rows)
    halves = pl.ds(pl.program_id(0) * 2 * t.rows, 2 * t.rows)  # the rows' uint16 halves of the code words
    u0 = pl.program_id(1) * steps
    unscale = 1 / _CORRECTION_SCALE
    x_k, offset_k = _X_K[fmt], _OFFSET_K[fmt]

    def column(ref, u, word):  # word `word` of a unit's plane for the program's rows: [rows, 1] f32
        return ref[(*lead, u, pl.ds(word, 1), rows)].astype(jnp.float32).T

    def words_of(ref, u, first: int, count: int, copies: int = 1):  # words first.. of a unit as [2 count
        # copies, rows] uint16, K row (word, copy, half): each word `copies` times (contiguous: 16-byte loads)
        w = ref[(*lead, u, pl.ds(first, count), halves)].reshape(count, 1, t.rows, 2)
        w = jnp.broadcast_to(w, (count, copies, t.rows, 2)) if copies > 1 else w
        return jnp.transpose(w, (0, 1, 3, 2)).reshape(2 * count * copies, t.rows)

    def body(i, acc):
        u = u0 + i
        scales = scales_ref[(*lead, u, pl.ds(0, 16), rows)].astype(jnp.float16)  # [16, rows], exact
        offsets = []
        for first in range(0, offset_k // 16, 2):  # each value: the dots of its hi and lo parts
            hi, lo = (b_ref[pl.ds(u * offset_k + 16 * (first + h), 16), :] for h in (0, 1))
            offsets.append(lax.dot_general(scales, hi, _TN, preferred_element_type=jnp.float32)
                           + lax.dot_general(scales, lo, _TN, preferred_element_type=jnp.float32))
        step_sum = offsets[0] * -unscale  # less sum sc c X
        if dmin_ref is not None:  # less dmin sum mn X
            acc = fma(column(dmin_ref, u, 0) * -unscale, offsets[1], acc, interpret=interpret)
        def chunk(c, step_sum):  # chunk c of the unit: the same code on other words
            words = words_of(q_ref, u, 8 * c, 8)  # [16, rows]: K row 2 w + h
            for p in range(2):  # the low nibbles' sub-block(s), then the high ones'
                if fmt == "Q6_K":  # sub-blocks i = 0, 1 of the block at position 2c + p: rows 8i.. of the tile
                    high = words_of(h_ref, u, 4 * c + 2 * p, 2, copies=4)  # word 4c + 2p + w // 4
                    codes = [_with_high(words, high, jj, p, _high_bit_places(fmt, jj), 2, interpret=interpret)
                             for jj in range(2)]
                    for i in range(2):
                        dot = None
                        for jj in range(2):
                            x = xt_ref[pl.ds(u * x_k + 128 * c + 32 * (p + 2 * jj) + 16 * i, 16), :]
                            d = lax.dot_general(codes[jj], x, _TN, preferred_element_type=jnp.float32)
                            dot = d if dot is None else dot + d
                        scale = column(scales_ref, u, 2 * (2 * c + p) + i)
                        step_sum = fma(scale, dot, step_sum, interpret=interpret)
                    continue
                if fmt == "Q5_K":  # the fifth bits: H word 2c + p, every row's
                    high = words_of(h_ref, u, 2 * c + p, 1, copies=8)
                dot = None
                for jj in range(2):
                    j = p + 2 * jj
                    codes = (_pairs(words, j, 4, interpret=interpret) if fmt == "Q4_K" else
                             _with_high(words, high, jj, p, _high_bit_places(fmt, jj), 1, interpret=interpret))
                    x = xt_ref[pl.ds(u * x_k + 64 * c + 16 * j, 16), :]  # [16, x_rows]
                    d = lax.dot_general(codes, x, _TN, preferred_element_type=jnp.float32)
                    dot = d if dot is None else dot + d
                step_sum = fma(column(scales_ref, u, 4 * c + p), dot, step_sum, interpret=interpret)
            return step_sum

        if fmt in LOOP_CHUNKS:  # the same code on other words, c traced
            step_sum = lax.fori_loop(0, 4, chunk, step_sum)
        else:
            step_sum = functools.reduce(lambda acc, c: chunk(c, acc), range(4), step_sum)
        return fma(column(d_ref, u, 0), step_sum, acc, interpret=interpret)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((t.rows, t.x_rows), jnp.float32))
    o_ref[0] = acc.T


def gemm(x: jax.Array, lanes: dict[str, jax.Array], *, fmt: str, layer=None, tiling: DotTiling | None = None,
         interpret: bool = False) -> jax.Array:
    """x [M, K] @ dequant(w)^T for M <= MAX_ROWS: [M, N'] f32 (N' the lanes' padded rows; the K splits'
    partial sums added), w in lane planes (`decode_layout.to_lanes`).

    Args:
      x: the activations [M, K], any float dtype (rounded to f16 after a power-of-two scale a row).
      lanes: the weight's lane planes; with `layer`, stacks of them [L, ...].
      fmt: one of FORMATS.
      layer: None, or an int32 scalar: the layer of the stacked lanes to multiply, read in place.
      tiling: overrides `tiling_for`.
      interpret: Pallas interpret mode (CPU).
    """
    if fmt not in FORMATS:
        raise UnsupportedFormatError(f"lanesdot: {fmt} has no kernel; formats: {', '.join(FORMATS)}")
    m, k = x.shape
    stacked = layer is not None
    q = lanes["q"]
    n = q.shape[-1]
    if not 1 <= m <= MAX_ROWS:
        raise ShapeMismatchError(f"lanesdot: x {x.shape}: 1 to {MAX_ROWS} rows of x")
    if q.ndim != 3 + stacked or q.shape[stacked] * _UNIT != k or n % ROW_ALIGN:
        raise ShapeMismatchError(f"lanesdot: x {x.shape} against {fmt} lanes "
                                 f"{ {key: v.shape for key, v in lanes.items()} }"
                                 + (" (a stack)" if stacked else ""))
    t = tiling or tiling_for(fmt, n, k, m)
    units = k // _UNIT
    if n % t.rows or t.rows % 32 or units % t.splits or t.x_rows not in (8, 16) or t.x_rows < m:
        raise ShapeMismatchError(f"lanesdot: {t} does not divide {n} rows and {units} units for {m} rows of x")
    xt, b, scale = prepare_x(x, fmt, t.x_rows)

    def halves(a):  # uint32 words [.., units, P, N] as their uint16 halves [.., units, P, 2N]: no copy
        return lax.bitcast_convert_type(a, jnp.uint16).reshape(*a.shape[:-1], 2 * n)

    planes = [halves(q), *([halves(lanes["h"])] if fmt != "Q4_K" else []), lanes[_SCALES[fmt]], lanes["d"],
              *([lanes["dmin"]] if fmt != "Q6_K" else [])]
    args = (xt, b, *planes)
    if stacked:
        args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
    kernel = functools.partial(_kernel, fmt=fmt, t=t, steps=units // t.splits, stacked=stacked, interpret=interpret)
    return launch(kernel, args, t, m, n, scale, f"lanesdot_{fmt.lower()}", interpret)
