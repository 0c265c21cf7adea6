"""The block-dot GEMM on the lanes (Pallas Triton): y = x @ dequant(w)^T for 2-16 rows of x, one tensor-core
dot per 16 codes of a sub-block, the codes fed to the `mma.sync` from registers, on the decode GEMV's lane
layout (`pallas_kernels.decode_layout`: no second copy of the weight). Q4_K.

Why: the GEMV (`pallas_kernels.decode`) pays half an instruction a weight for each row of x (`dp2a`), and
the lanes' tensor-core GEMM (`pallas_kernels.mma`), which XLA's own Triton (the device's compiler) compiles
to 12.6-25.8 instructions a weight at 16 rows of x (`scripts/kernel_report.py --compiler xla`: it moves the
dequantized tile's broadcasts through shared memory element by element), loses to the GEMV up to 8 rows.
The block-dot GEMM (`pallas_kernels.blockdot`) does better on its own layout, a second copy of the weight.
This is its design on the lanes:

- **The operand.** A lane plane's word w of a unit for weight row n, viewed as two uint16 (halves h = 0, 1),
  is a [16, rows] tile of a chunk's eight words with no data moved: K row 2w + h, the same K row's uint16 for
  every weight row. Q4_K's uint16 (w, h) of chunk c holds in nibble j the code of element 4w + 2h + j // 2
  of sub-block 2c + j % 2; nibble j of the tile, two codes at a time, is one lop3 from the f16 pair 1024 + q
  (j even) or 1024 + 16 q (j odd; `blockdot._pairs`): exact, no conversion, and the tile keeps its shape
  from the load to the dot, which takes it transposed (`[16, rows]^T x [16, x_rows]`): Triton loads it
  into the operand's layout. Two nibbles (16 elements each) are a sub-block's dot.
- **x** permuted to that order (`prepare_x`), in f16, each row scaled by a power of two so that its largest
  value is in [2^14, 2^15) (exact; undone on the output), the odd sub-blocks' x divided by 16 (their codes
  sit at 16 q).
- **The offsets and mins**, as `blockdot` takes them: a sub-block's dot is P = c X + sum q x (X the
  sub-block's sum of x, c = 1024 or 64), w = d sc q - dmin mn, so y = d (sum sc P - sum sc c X) - dmin sum mn X.
  The sum of sc P is one FFMA an output a sub-block; the two offset sums are dots of the unit's scales and
  mins (the "scm" plane, one [16, rows] tile) against c X and X, each in two f16 parts (~22 bits together:
  the cancellation against 1024 X needs them), four [16, rows]^T x [16, x_rows] dots a unit.

The product is the exact f32 dot of the weight with x rounded to f16, up to the f32 accumulation: closer to
the f64 product than the reference path, which rounds the weight to bf16.

The grid: two warps a program (`mma.sync`; four make `wgmma`s, each fenced and waited for), `rows` weight
rows a program (128, or 64 or 32 where 128 cannot give every SM two programs, as at the k/v projection), K
split into ranges of whole units so that every SM has two programs; partial sums [splits, M, N'] f32,
summed here. On a CPU the kernel runs in Pallas interpret mode, the lop3 written in jnp (the same bits).
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

from pallas_kernels.blockdot import _pairs, _pow2
from pallas_kernels.decode_layout import LAYOUTS, ROW_ALIGN
from pallas_kernels.ptx import fma
from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError

__all__ = ["FORMATS", "MAX_ROWS", "DotTiling", "gemm", "prepare_x", "supports", "tiling_for"]

FORMATS = ("Q4_K",)
MAX_ROWS = 16  # rows of x (padded to 8 or 16: the mma's N)
_UNIT = 256
_SMS = 132
_X_MAX_EXP = 14  # each row of x is scaled so that its largest magnitude lies in [2^14, 2^15)
_CORRECTION_SCALE = 2.0**-16  # B of the offset dots: x's sub-block sums scaled into f16's range
_OFFSET_K = 64  # a unit's offset dots: four of K 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotTiling:
    """rows: weight rows a program (a multiple of 32: two warps' m16 dots); splits: programs along K (whole
    units each); x_rows: rows of x (8 or 16, the mma's N); num_warps: two (Triton's `mma.sync`)."""

    rows: int = 128
    splits: int = 1
    x_rows: int = 16
    num_warps: int = 2


def supports(fmt: str, k: int, m: int) -> bool:
    """Whether the kernel multiplies m rows of x by a `fmt` weight of K = k."""
    return fmt in FORMATS and 1 <= m <= MAX_ROWS and k % LAYOUTS[fmt].unit == 0


def tiling_for(fmt: str, n: int, k: int, m: int) -> DotTiling:
    """128 weight rows a program (64 at 16 rows of x, where 128 hold 232-255 registers a thread and spill on
    pip's triton), or fewer where fewer rows give every SM two programs; the fewest K splits (dividing the
    units) that do; else 32 rows and a unit a program."""
    units = k // LAYOUTS[fmt].unit
    x_rows = 8 if m <= 8 else 16
    divisors = [s for s in range(1, units + 1) if units % s == 0]
    for rows in (128, 64, 32) if x_rows == 8 else (64, 32):
        if n % rows == 0:
            splits = next((s for s in divisors if n // rows * s >= 2 * _SMS), None)
            if splits is not None:
                return DotTiling(rows=rows, splits=splits, x_rows=x_rows)
    return DotTiling(rows=32, splits=units, x_rows=x_rows)


# --- x --------------------------------------------------------------------------------------------------
def _unit_order(fmt: str) -> np.ndarray:
    """The element of a unit each position of the kernel's x holds: position 64 c + 16 j + 2 w + h (chunk c,
    nibble j, word w, half h) is element 4 w + 2 h + j // 2 of sub-block 2 c + j % 2."""
    c, j, w, h = np.meshgrid(np.arange(4), np.arange(4), np.arange(8), np.arange(2), indexing="ij")
    return (32 * (2 * c + j % 2) + 4 * w + 2 * h + j // 2).reshape(-1)


def prepare_x(x: jax.Array, fmt: str, x_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, K] -> (x^T [K, M'] f16 in the kernel's order, B [K / 256 * 64, M'] f16, row scales [M] f32): each
    row times a power of two (its largest magnitude into [2^14, 2^15)) rounded to f16, the odd sub-blocks
    divided by 16, each unit's elements in `_unit_order`; the row scales undo the powers of two on the output.
    B: the offset dots' B operands, a unit's 64 rows: against the "scm" tile (row 4 c + i: the scale of
    sub-block 2 c + i, row 4 c + 2 + i: its min), c X in two f16 parts (hi, lo), then X in two, each times
    _CORRECTION_SCALE (X the sub-block's sum of the scaled f16 row; c = 1024 for even sub-blocks, 64 for odd:
    their x divided by 16)."""
    m, k = x.shape
    units = k // _UNIT
    m_pad = -(-m // x_rows) * x_rows
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1)
    exponent = (lax.bitcast_convert_type(amax, jnp.int32) >> 23) - 127  # from its bits: exact (blockdot)
    e = jnp.clip(jnp.where(amax > 0, _X_MAX_EXP - exponent, 0), -126, 126)
    x16 = jnp.pad((xf * _pow2(e)[:, None]).astype(jnp.float16), ((0, m_pad - m), (0, 0)))
    by_block = x16.reshape(m_pad, units, 8, 32)
    odd = np.arange(8) % 2 == 1
    place = jnp.asarray(np.where(odd, 1 / 16, 1.0), jnp.float16)[None, None, :, None]
    order = _unit_order(fmt)
    xt = (by_block * place).reshape(m_pad, units, _UNIT)[:, :, order].reshape(m_pad, k).T
    sums = jnp.sum(by_block.astype(jnp.float32), axis=-1) * _CORRECTION_SCALE  # [M', units, 8]
    cx = sums * jnp.asarray(np.where(odd, 64.0, 1024.0), jnp.float32)

    def rows(v, at_min: bool):  # [M', units, 8] sub-block values -> the scm tile's 16 rows, zeros elsewhere
        v = v.reshape(m_pad, units, 4, 1, 2)
        zero = jnp.zeros_like(v)
        return jnp.concatenate([zero, v] if at_min else [v, zero], axis=3).reshape(m_pad, units, 16)

    def parts(v):
        hi = v.astype(jnp.float16)
        return hi, (v - hi.astype(jnp.float32)).astype(jnp.float16)

    b = jnp.stack([rows(p, at_min) for value, at_min in ((cx, False), (sums, True)) for p in parts(value)],
                  axis=2)  # [M', units, 4 dots, 16]
    return xt, b.reshape(m_pad, units * _OFFSET_K).T, _pow2(-e)


# --- the kernel ---------------------------------------------------------------------------------------
_TN = (((0,), (0,)), ((), ()))  # a [16, rows] tile . a [16, x_rows] one -> [rows, x_rows]


def _kernel(*refs, t: DotTiling, steps: int, stacked: bool, interpret: bool):
    if stacked:
        layer_ref, *refs = refs
        lead = (layer_ref[0],)
    else:
        lead = ()
    xt_ref, b_ref, q_ref, scm_ref, d_ref, dmin_ref, o_ref = refs
    rows = pl.ds(pl.program_id(0) * t.rows, t.rows)
    halves = pl.ds(pl.program_id(0) * 2 * t.rows, 2 * t.rows)  # the rows' uint16 halves of the code words
    u0 = pl.program_id(1) * steps
    unscale = 1 / _CORRECTION_SCALE

    def column(ref, u, word):  # word `word` of a unit's plane for the program's rows: [rows, 1] f32
        return ref[(*lead, u, pl.ds(word, 1), rows)].astype(jnp.float32).T

    def body(i, acc):
        u = u0 + i
        scm = scm_ref[(*lead, u, pl.ds(0, 16), rows)].astype(jnp.float16)  # [16, rows], exact
        offsets = []
        for i in (0, 2):  # sum sc c X, then sum mn X: each the dots of its hi and lo parts
            hi, lo = (b_ref[pl.ds(u * _OFFSET_K + 16 * (i + h), 16), :] for h in (0, 1))
            offsets.append(lax.dot_general(scm, hi, _TN, preferred_element_type=jnp.float32)
                           + lax.dot_general(scm, lo, _TN, preferred_element_type=jnp.float32))
        acc = fma(column(dmin_ref, u, 0) * -unscale, offsets[1], acc, interpret=interpret)  # less dmin sum mn X
        step_sum = offsets[0] * -unscale  # less sum sc c X
        for c in range(4):
            # the chunk's eight words, each two uint16: [16, rows], K row 2 w + h
            words = q_ref[(*lead, u, pl.ds(8 * c, 8), halves)].reshape(8, t.rows, 2)  # contiguous: 16-byte loads
            words = jnp.transpose(words, (0, 2, 1)).reshape(16, t.rows)
            for s in range(2):  # sub-block 2c + s: nibbles s and s + 2
                p = None
                for j in (s, s + 2):
                    codes = _pairs(words, j, 4, interpret=interpret)  # [16, rows] f16
                    x = xt_ref[pl.ds(u * _UNIT + 64 * c + 16 * j, 16), :]  # [16, x_rows]
                    pj = lax.dot_general(codes, x, _TN, preferred_element_type=jnp.float32)
                    p = pj if p is None else p + pj
                step_sum = fma(column(scm_ref, u, 4 * c + s), p, step_sum, interpret=interpret)
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
    words = lax.bitcast_convert_type(q, jnp.uint16).reshape(*q.shape[:-1], 2 * n)  # [.., units, 32, 2N]: no copy
    args = (xt, b, words, lanes["scm"], lanes["d"], lanes["dmin"])
    if stacked:
        args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
    kernel = functools.partial(_kernel, t=t, steps=units // t.splits, stacked=stacked, interpret=interpret)
    part = pl.pallas_call(
        kernel,
        grid=(n // t.rows, t.splits),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.BlockSpec((1, t.x_rows, t.rows), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((t.splits, m, n), jnp.float32),  # the rows of x past m: not stored
        compiler_params=pltriton.CompilerParams(num_warps=t.num_warps, num_stages=3),
        interpret=interpret,
        name=f"lanesdot_{fmt.lower()}",
    )(*args)
    y = part[0] if t.splits == 1 else jnp.sum(part, axis=0)
    return y * scale[:m, None]
