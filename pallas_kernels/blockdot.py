"""The block-dot decode GEMM (Pallas Triton): y = x @ dequant(w)^T for 1-16 rows of x, one tensor-core dot
per 32-element block, the weight's codes fed to the `wgmma` from registers, for Q4_0, Q4_1 and Q4_K.

Why a third GPU kernel. The GEMV (`pallas_kernels.decode`) pays half an instruction a weight for each row of
x (`dp2a`), and the tensor-core GEMM on the lanes (`pallas_kernels.mma`) dequantizes exactly in f32 and
sends each dequantized tile through shared memory to the wgmma's fragment: 6.1 instructions a weight at 8-16
rows of x (Q4_0, `scripts/kernel_report.py`). Here the codes cost 0.6 instructions a weight whatever the
rows, and a block's scale and offset one or two FFMA an output (M / 32 - M / 16 a weight): 2.4-4.0 in all
(Q4_0 2.44 up to 8 rows, Q4_K 3.97 at 16; the lanes GEMM 6.1-6.7):

- **The layout** (`to_blocks`, made at load): the codes of a row, four to a uint16, so that a block is a
  [rows, 32] tile with no reshape. Plane element (n, 64 s + 32 t + w) holds in nibble j the code of element
  w of block 8 s + 4 t + j (K = 256 s + 32 (4 t + j) + w). The scales stay as stored: [N, K / 32] f16
  (Q4_0, Q4_1); Q4_K's six-bit sub-block scales and mins unpacked to bytes [N, K / 32], d and dmin
  [N, K / 256] (a step of the loop is one super-block).
- **The operand**: nibble j of a loaded [rows, 32] tile, two codes at a time, is one lop3 from the f16 pair
  1024 + q (nibbles 0 and 2) or 1024 + 16 q (1 and 3; the shift by 8 for nibbles 2-3 is shared by a word):
  exact, no conversion instruction, no shared memory (Triton loads the words in the operand's layout
  because nothing between the load and the dot changes the tile's shape).
- **The offset, off the f32 accumulators**: the block's dot P = sum (1024 + p q) x (p the nibble's place, 1
  or 16) against x in f16. With x of the blocks whose nibbles sit at 16 divided by 16 (exact) and
  X = the block's sum of x, sum (d q + o) x = d (P - c X) + o X with c = 1024, or 64 where x was divided by
  16 (`_offsets`): per output and block an FFMA or two on f32 accumulators, where 1024 X costs ~8 of their 24
  bits (a bf16 weight has 8).
  Q4_0 (o = -8 d) folds o into c: acc += d (P - c X), c X made with x ([K / 32, M], f32, outside the loop).
  Q4_K is Q4_1's form with d = d sc and o = -dmin m of the sub-block, made in f32 (exact) in the loop.
- **x in f16**, each row scaled by a power of two (exact; undone on the output) so that its largest value
  is in [2^14, 2^15): any magnitude of activation fits f16's range, and bf16 x converts exactly.

The product is then the exact f32 dot of the weight (not rounded to bf16, as XLA's reference path rounds
it) with x rounded to f16: closer to the f64 product than the reference.

The grid: 128 weight rows a program (four warps, one warpgroup: two m64 wgmma tiles), K split into
`splits` ranges of whole 256-element steps so that every SM has at least two programs at an 8B llama's
shapes (all but the k/v projection, whose 8 row tiles and 16 steps make 128); partial sums [splits, M', N']
f32, summed here (at 4096 x 4096 and 16 rows of x, 16 splits write and read 4 MB beside the weight's 9.4).
On a CPU the kernel runs in Pallas interpret mode, the lop3 written in jnp (the same bits).

`benchmarks/mma_probe.py` is where the design was measured without a GPU (instructions a weight, against
the variants that lost); no device has timed this kernel yet.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError
from realm_jax.quant import QTensor
from realm_jax.quant.common import split_nibbles

__all__ = ["FORMATS", "MAX_ROWS", "ROW_ALIGN", "STEP", "BlockTiling", "from_blocks", "gemm", "prepare_x",
           "tiling_for", "to_blocks"]

FORMATS = ("Q4_0", "Q4_1", "Q4_K")
# The planes besides the codes: per block (32 elements of K) and per step (256).
_PER_BLOCK = {"Q4_0": ("d",), "Q4_1": ("d", "m"), "Q4_K": ("sc", "mn")}
_PER_STEP = {"Q4_0": (), "Q4_1": (), "Q4_K": ("d", "dmin")}
MAX_ROWS = 16  # rows of x the kernel takes (padded to 8 or 16: the wgmma's N)
ROW_ALIGN = 128  # weight rows are padded to a multiple of this (a program's rows)
STEP = 256  # elements of K a loop step takes: eight blocks, two [rows, 32] tiles of code words
_BLOCK = 32
_SMS = 132
_X_MAX_EXP = 14  # each row of x is scaled so that its largest magnitude lies in [2^14, 2^15)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockTiling:
    """rows: weight rows a program; splits: programs along K (each a range of whole steps); x_rows: rows of x
    (8 or 16, the wgmma's N); num_warps: warps a program."""

    rows: int = 128
    splits: int = 1
    x_rows: int = 8
    num_warps: int = 4


def _steps(k: int) -> int:
    return -(-k // STEP)


def tiling_for(n: int, k: int, m: int) -> BlockTiling:
    """128 weight rows a program, and the fewest K splits (whole steps each, dividing the steps) that give
    every SM two programs; the most there are where none does."""
    rows = ROW_ALIGN
    tiles = -(-n // rows)
    steps = _steps(k)
    divisors = [s for s in range(1, steps + 1) if steps % s == 0]
    splits = next((s for s in divisors if tiles * s >= 2 * _SMS), divisors[-1])
    return BlockTiling(rows=rows, splits=splits, x_rows=8 if m <= 8 else 16)


# --- the layout ---------------------------------------------------------------------------------------
def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UnsupportedFormatError(f"blockdot: {fmt} has no kernel; formats: {', '.join(FORMATS)}")


def _codes(w: QTensor) -> jax.Array:
    """The 4-bit codes of a QTensor (or a stack), uint8 [..., N, K / 32, 32] in element order."""
    qs = jnp.asarray(w.planes["qs"])
    if w.fmt == "Q4_K":  # 32-byte chunks: byte j holds element j of block 2c (low) and of block 2c + 1 (high)
        return split_nibbles(qs, 32).reshape(*qs.shape[:-1], -1, _BLOCK)
    qs = qs.reshape(*qs.shape[:-1], -1, 16)
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def to_blocks(w: QTensor) -> dict[str, jax.Array]:
    """A Q4_0 / Q4_1 / Q4_K QTensor (N, K), or a stack of them ([L, N, ...] planes), -> its block planes: "q"
    uint16 [..., N', K' / 4] (the codes, four to an element: see the module's docstring), and per block
    "d" (and "m") f16 [..., N', K' / 32] as stored, or (Q4_K) "sc", "mn" uint8 [..., N', K' / 32] and per
    step "d", "dmin" f16 [..., N', K' / 256]; N' = N padded to ROW_ALIGN rows, K' = K padded to whole STEPs
    (padding: zero codes and zero scales, which multiply to zero). Traceable."""
    _check_format(w.fmt)
    n, k = w.shape
    codes = _codes(w).astype(jnp.uint16)
    lead = codes.shape[:-3]
    steps = _steps(k)

    def pad(a, per_step: int):  # rows to ROW_ALIGN, [..., n, k / per_step] to whole steps
        return jnp.pad(a, [(0, 0)] * len(lead) + [(0, -n % ROW_ALIGN), (0, steps * per_step - a.shape[-1])])

    codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, -n % ROW_ALIGN), (0, steps * 8 - k // _BLOCK), (0, 0)])
    rows = codes.shape[-3]
    codes = codes.reshape(*lead, rows, steps, 2, 4, _BLOCK)  # (step s, tile t, nibble j, element w)
    words = functools.reduce(jnp.bitwise_or, [codes[..., j, :] << (4 * j) for j in range(4)])
    out = {"q": words.reshape(*lead, rows, -1)}
    names = {"sc": "scales", "mn": "mins"}
    for name in _PER_BLOCK[w.fmt]:
        out[name] = pad(jnp.asarray(w.planes[names.get(name, name)]), STEP // _BLOCK)
    for name in _PER_STEP[w.fmt]:
        out[name] = pad(jnp.asarray(w.planes[name]), 1)
    return out


def from_blocks(fmt: str, shape: tuple[int, int], planes: dict[str, jax.Array]) -> QTensor:
    """The inverse of `to_blocks` for one weight: the QTensor (N, K) the block planes hold. Traceable;
    under jit XLA fuses it into what reads the planes (the XLA path dequantizes from it)."""
    _check_format(fmt)
    n, k = shape
    nb = k // _BLOCK
    q = planes["q"]
    rows = q.shape[-2]
    words = q.reshape(rows, -1, 2, 1, _BLOCK)
    codes = (words >> (4 * jnp.arange(4, dtype=jnp.uint16)).reshape(4, 1)) & 0xF  # [rows, s, 2, 4, 32]
    codes = codes.reshape(rows, -1, _BLOCK)[:n, :nb].astype(jnp.uint8)  # [n, nb, 32] element order
    if fmt == "Q4_K":  # chunk c of a super-block: byte j = element j of block 2c | element j of 2c + 1 << 4
        pairs = codes.reshape(n, -1, 4, 2, _BLOCK)
        out = {"qs": (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).reshape(n, -1),
               "scales": planes["sc"][:n, :nb], "mins": planes["mn"][:n, :nb],
               "d": planes["d"][:n, : k // STEP], "dmin": planes["dmin"][:n, : k // STEP]}
    else:
        qs = (codes[..., :16] | (codes[..., 16:] << 4)).reshape(n, nb * 16)
        out = {"qs": qs} | {name: planes[name][:n, :nb] for name in _PER_BLOCK[fmt]}
    return QTensor(fmt, (n, k), out)


# --- x --------------------------------------------------------------------------------------------------
def _offsets(fmt: str, blocks: int) -> jax.Array:
    """c of each block, f32 [blocks]: what d multiplies the block's sum of x by, less its dot: 1024 (+ 8
    for Q4_0's offset) where the nibble sits at bit 0 (even blocks of a step), 64 (+ 8) where x was divided
    by 16 for a nibble at bit 4 (odd blocks)."""
    odd = jnp.arange(blocks) % 2 == 1
    base = jnp.where(odd, 64.0, 1024.0)
    return base + (8.0 if fmt == "Q4_0" else 0.0)


def prepare_x(x: jax.Array, fmt: str, k_padded: int, x_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, K] -> (x^T [K', M'] f16, sums [K' / 32, M'] f32, row scales [M] f32): each row times a power of
    two (its largest magnitude into [2^14, 2^15)) rounded to f16, the odd blocks of each step divided by 16;
    `sums`: c X (Q4_0) or X (the others) of each block, X the block's sum of the scaled f16 row (`_offsets`); the
    row scales undo the powers of two on the output."""
    m, k = x.shape
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1)
    e = jnp.where(amax > 0, _X_MAX_EXP - jnp.floor(jnp.log2(jnp.where(amax > 0, amax, 1.0))), 0.0)
    e = jnp.clip(e, -126.0, 126.0)
    x16 = (xf * jnp.exp2(e)[:, None]).astype(jnp.float16)
    x16 = jnp.pad(x16, ((0, -(-m // x_rows) * x_rows - m), (0, k_padded - k)))
    blocks = k_padded // _BLOCK
    sums = jnp.sum(x16.astype(jnp.float32).reshape(-1, blocks, _BLOCK), axis=-1)  # [M', blocks]
    if fmt == "Q4_0":
        sums = sums * _offsets(fmt, blocks)
    place = jnp.where(jnp.arange(blocks) % 2 == 1, 1.0 / 16, 1.0).astype(jnp.float16)
    xt = (x16.reshape(-1, blocks, _BLOCK) * place[None, :, None]).reshape(-1, k_padded).T
    return xt, sums.T, jnp.exp2(-e)


# --- the kernel ---------------------------------------------------------------------------------------
def _pairs(words, j: int, *, interpret: bool) -> jax.Array:
    """Nibble j of each uint16 of `words` as f16: 1024 + q (j = 0, 2) or 1024 + 16 q (j = 1, 3), exact."""
    mask = 0xF0 if j % 2 else 0x0F
    if interpret:
        bits = ((words >> (8 if j >= 2 else 0)) & mask) | 0x6400
        return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16)
    shift = "shr.b32 t, $1, 8;" if j >= 2 else "mov.b32 t, $1;"
    asm = f"{{.reg .b32 t; {shift} lop3.b32 $0, t, {mask << 16 | mask:#010x}, 0x64006400, 0xEA;}}"
    [out] = pltriton.elementwise_inline_asm(asm, args=[words], constraints="=r,r", pack=2,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float16)])
    return out


def _kernel(*refs, fmt: str, t: BlockTiling, steps: int, stacked: bool, interpret: bool):
    if stacked:
        layer_ref, *refs = refs
        lead = (layer_ref[0],)
    else:
        lead = ()
    xt_ref, sums_ref, q_ref, *plane_refs, o_ref = refs
    planes = dict(zip(_PER_BLOCK[fmt] + _PER_STEP[fmt], plane_refs))
    r0 = pl.program_id(0) * t.rows
    s0 = pl.program_id(1) * steps
    rows = pl.ds(r0, t.rows)

    def body(i, acc):
        step = s0 + i

        def per_step(name):  # [rows, 1] f32
            return planes[name][(*lead, rows, pl.ds(step, 1))].astype(jnp.float32)

        if fmt == "Q4_K":
            d, dmin = per_step("d"), per_step("dmin")
        for tile in range(2):
            words = q_ref[(*lead, rows, pl.ds(step * (STEP // 4) + 32 * tile, 32))]  # [rows, 32] uint16
            for j in range(4):
                b = 4 * tile + j  # nibble j of the tile is block b of the step
                col = pl.ds(step * (STEP // _BLOCK) + b, 1)

                def per_block(name):  # [rows, 1] f32
                    return planes[name][(*lead, rows, col)].astype(jnp.float32)

                x = xt_ref[pl.ds(step * STEP + _BLOCK * b, _BLOCK), :]  # [32, x_rows]
                p = jnp.dot(_pairs(words, j, interpret=interpret), x, preferred_element_type=jnp.float32)
                s = sums_ref[col, :]  # [1, x_rows]
                c = 64.0 if b % 2 else 1024.0  # the pair's 1024 (x divided by 16 where the nibble is at bit 4)
                if fmt == "Q4_0":  # d (P - c X)
                    acc = acc + per_block("d") * (p - s)
                else:  # w = a q + o: a P + (o - c a) X
                    if fmt == "Q4_1":
                        a, o = per_block("d"), per_block("m")
                    else:
                        a, o = d * per_block("sc"), -(dmin * per_block("mn"))
                    acc = acc + a * p + (o - c * a) * s
        return acc

    acc = lax.fori_loop(0, steps, body, jnp.zeros((t.rows, t.x_rows), jnp.float32))
    o_ref[0] = acc.T


def gemm(x: jax.Array, planes: dict[str, jax.Array], *, fmt: str, layer=None, tiling: BlockTiling | None = None,
         interpret: bool = False) -> jax.Array:
    """x [M, K] @ dequant(w)^T for M <= MAX_ROWS: [M, N'] f32 (N' the planes' padded rows; the K splits'
    partial sums added), w in block planes (`to_blocks`).

    Args:
      x: the activations [M, K], any float dtype (rounded to f16 after a power-of-two scale a row).
      planes: the weight's block planes; with `layer`, stacks of them [L, ...].
      fmt: one of FORMATS.
      layer: None, or an int32 scalar: the layer of the stacked planes to multiply, read in place.
      tiling: overrides `tiling_for`.
      interpret: Pallas interpret mode (CPU).
    """
    _check_format(fmt)
    m, k = x.shape
    stacked = layer is not None
    q = planes["q"]
    n_pad, k_pad = q.shape[-2], q.shape[-1] * 4
    if not 1 <= m <= MAX_ROWS or k_pad != _steps(k) * STEP or n_pad % ROW_ALIGN or q.ndim != 2 + stacked:
        raise ShapeMismatchError(f"blockdot: x {x.shape} against {fmt} block planes "
                                 f"{ {key: v.shape for key, v in planes.items()} } (at most {MAX_ROWS} rows of x)")
    t = tiling or tiling_for(n_pad, k, m)
    steps = k_pad // STEP
    if n_pad % t.rows or steps % t.splits or t.x_rows not in (8, 16) or t.x_rows < m:
        raise ShapeMismatchError(f"blockdot: {t} does not divide {n_pad} rows and {steps} steps for {m} rows of x")
    xt, sums, scale = prepare_x(x, fmt, k_pad, t.x_rows)
    args = (xt, sums, q, *(planes[name] for name in _PER_BLOCK[fmt] + _PER_STEP[fmt]))
    if stacked:
        args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
    kernel = functools.partial(_kernel, fmt=fmt, t=t, steps=steps // t.splits, stacked=stacked, interpret=interpret)
    part = pl.pallas_call(
        kernel,
        grid=(n_pad // t.rows, t.splits),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.BlockSpec((1, t.x_rows, t.rows), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((t.splits, t.x_rows, n_pad), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=t.num_warps, num_stages=3),
        interpret=interpret,
        name=f"blockdot_{fmt.lower()}",
    )(*args)
    y = part[0] if t.splits == 1 else jnp.sum(part, axis=0)
    return y[:m] * scale[:, None]
