"""The block-dot decode GEMM (Pallas Triton): y = x @ dequant(w)^T for 1-16 rows of x, one tensor-core dot
per 32-element block (Q6_K: 16-element sub-block), the weight's codes fed to the `mma.sync` from registers, for
Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 and Q8_K.

Why a third GPU kernel. The GEMV (`pallas_kernels.decode`) pays half an instruction a weight for each row of
x (`dp2a`), and the tensor-core GEMM on the lanes (`pallas_kernels.mma`) dequantizes exactly in f32 and
sends each dequantized tile through shared memory to the wgmma's fragment: 6.1 instructions a weight at 8-16
rows of x (Q4_0, `scripts/kernel_report.py`). Here the codes cost 0.5-0.6 instructions a weight whatever
the rows, and a block's scale one FFMA an output (M / 32 a weight): 1.6-2.2 in all for Q4_0, Q4_1, Q4_K and
Q8_0 (2.7 for Q4_K at 16 rows of x), 1.1-1.3 for Q8_K, 2.8-4.4 for the five- and six-bit formats, whose
high bits cost a second lop3, a shift and a widening (the lanes GEMM: 6.1-7.6):

- **The layout** (`to_blocks`, made at load): the codes of a row, four to a uint16, so that a block is a
  [rows, 32] tile with no reshape. Plane element (n, 64 s + 32 t + w) holds in nibble j the code of element
  w of block 8 s + 4 t + j (K = 256 s + 32 (4 t + j) + w). The scales as stored, [N, K / 32] f16 (Q4_0,
  Q8_0); Q4_1's a step's eight scales then its eight mins ("dm" [N, K / 16]); Q4_K's six-bit sub-block
  scales and mins unpacked to bytes, the same way ("scm" [N, K / 16]), d and dmin [N, K / 256] (a step of
  the loop is one super-block).
  Q8_0: two codes to a uint16, each q + 128 (a byte): element (n, 128 s + 32 t + w) holds in byte j that of
  element w of block 8 s + 2 t + j.
  Q6_K: its sixteen 16-element sub-blocks are the blocks, [rows, 16] tiles: "q" holds the codes' low four
  bits as above (element (n, 64 s + 16 t + w), nibble j: sub-block 16 s + 4 t + j), "qh" their high two,
  eight to a uint16 (element (n, 32 s + 16 h + w), sub-block 16 s + 8 h + i at bits 2 _HIGH_SLOTS[2][0][i]), "sc"
  the int8 scales, "d" [N, K / 256].
  Q5_0, Q5_1, Q5_K: "q" and the scale planes as for Q4_0, Q4_1, Q4_K; "qh" uint8 [N, K / 8], each element
  the fifth bits of eight codes (element (n, 32 s + w): block 8 s + i at bit _HIGH_SLOTS[1][0][i]).
  Q8_K: "q" as Q8_0's, "d" its f32 scale a super-block: a step's eight dots add up on the tensor cores, and
  d (P - c X) is one FFMA an output a step (1.4-1.75 instructions a weight at 1-16 rows of x).
- **The operand**: nibble j of a loaded [rows, 32] tile, two codes at a time, is one lop3 from the f16 pair
  1024 + q (nibbles 0 and 2) or 1024 + 16 q (1 and 3; the shift by 8 for nibbles 2-3 is shared by a word):
  exact, no conversion instruction, and no trip of a dequantized tile through shared memory (the code words
  come in through Triton's pipelined copies and `ldmatrix` straight into the operand's layout, because
  nothing between the load and the dot changes the tile's shape). Q8_0's byte j is one prmt for two codes,
  1024 + (q + 128). Q5's and Q6_K's is the nibble's lop3 and one more that ORs in the high bits, a shift of
  their element (shared by two codes) having put them at bit 4 or 8: 1024 + q or 1024 + 16 q, q of five or
  six bits, against the same x (`_with_high`).
- **The offsets, on the tensor cores**: the block's dot P = sum (1024 + p q) x (p the nibble's place, 1 or 16)
  against x in f16. With x of the blocks whose nibbles sit at 16 divided by 16 (exact) and X = the block's sum
  of x, sum (d q + o) x = d P - (c d - o) X with c = 1024, or 64 where x was divided by 16 (`_offsets`; Q8_0:
  c = 1024 + 128 every block). A block costs one FFMA an output, d P; a step's offsets, sum_b (c d_b - o_b)
  X_b over its eight blocks, are two [rows, 16] x [16, M] dots (Q4_K: four; `_OFFSET_DOTS`): A the step's
  scales (and mins: Q4_1's m, Q4_K's six-bit sc and m, all exact in f16), B c X (and -X or X) in two f16
  parts, a dot each (~22 bits together). 1024 X against 1024 X costs ~8 of the f32 accumulators' 24 bits (a
  bf16 weight has 8): for x exact in f16 the product is within ~2e-5 of the f64 one (5-7e-6 with each block's
  offset taken off its own dot, an FADD an output a block more; at 16 rows of x Q4_K 3.97 -> 3.55 instructions
  a weight), and within 4-7e-5 (1.2e-4 for a row of one block) of the product of x rounded to f16 otherwise.
- **x in f16**, each row scaled by a power of two (made from its exponent bits: exact; undone on the
  output) so that its largest value is in [2^14, 2^15): any finite magnitude of activation fits f16's
  range, and bf16 x converts exactly. A row holding an inf or a NaN comes out NaN.

The product is then the exact f32 dot of the weight (not rounded to bf16, as XLA's reference path rounds
it) with x rounded to f16: closer to the f64 product than the reference.

The grid: two warps a program, so that Triton makes the dots `mma.sync` (m16n8k16, the codes' tile the A
operand, x the B): with four, a warpgroup, it makes them `wgmma`s, and every one is fenced, committed and
waited for, because its result is scaled at once: ~270 instructions a step and thread, ~1 a weight at 128
weight rows (2.88 -> 1.97 for Q4_K at 8 rows of x, 3.26 -> 2.72 at 16; Q6_K 3.91 -> 3.39). 128 weight rows
a program (`_ROWS`: 256 for Q8_K; 64 for Q6_K, and for Q4_K and Q5_K at 16 rows of x, which spill at 128;
64 too where 128 cannot give every SM two programs, as at the k/v projection), K split into `splits` ranges
of whole 256-element steps so that every SM has at least two programs at an 8B llama's shapes where the
steps allow (the k/v projection, 1024 x 4096: 16 row tiles of 64 and 16 steps, 256); partial sums
[splits, M, N'] f32, summed here: the rows of x padding the mma's N are not stored (at 4096 x 4096 Q4_0,
16 splits write and read 256 KB at one row of x, 4 MB at 16, beside the weight's 9.4 MB).
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

from pallas_kernels.ptx import fma
from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError
from realm_jax.quant import QTensor, get_format
from realm_jax.quant import kquantize, kquants, legacy
from realm_jax.quant.common import split_nibbles

__all__ = ["FORMATS", "MAX_ROWS", "OFFSET_K", "ROW_ALIGN", "STEP", "BlockTiling", "from_blocks", "gemm", "hi_lo",
           "launch", "prepare_x", "scale_rows", "split_columns", "tiling_for", "to_blocks"]

FORMATS = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_K")
# Codes a uint16 of the "q" plane: four nibbles (Q6_K: the codes' low four bits), or (Q8_0) two bytes, each
# code q + 128.
_PER_WORD = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 4, "Q5_1": 4, "Q5_K": 4, "Q6_K": 4, "Q8_0": 2, "Q8_K": 2}
# Elements a block: a dot and its scale (Q6_K's sub-blocks: 16).
_BLOCK_K = {"Q6_K": 16}
# The planes besides the codes, and their elements a step (256 elements of K): Q4_0's and Q8_0's scales one
# a block (eight more at the end: a step's offset dots read 16 from its first); Q4_1's "dm", a step's eight
# scales then its eight mins; Q4_K's super-block d and dmin, and "scm" its eight sub-block scales then eight
# mins (uint8); Q6_K's d and "sc", its sixteen int8 sub-block scales.
_PLANES = {"Q4_0": {"d": 8}, "Q4_1": {"dm": 16}, "Q4_K": {"scm": 16, "d": 1, "dmin": 1}, "Q6_K": {"sc": 16, "d": 1},
           "Q8_0": {"d": 8}, "Q8_K": {"d": 1}}
_PLANES |= {"Q5_0": _PLANES["Q4_0"], "Q5_1": _PLANES["Q4_1"], "Q5_K": _PLANES["Q4_K"]}  # their scales: the 4-bit's
_SCALES = {"Q4_0": "d", "Q4_1": "dm", "Q4_K": "scm", "Q5_0": "d", "Q5_1": "dm", "Q5_K": "scm", "Q6_K": "sc",
           "Q8_0": "d", "Q8_K": None}  # the plane of the blocks' scales (Q8_K: one f32 d a step)
_TAIL = {"Q4_0": 8, "Q5_0": 8, "Q8_0": 8}  # extra columns of the "d" plane
_SUPER = ("Q4_K", "Q5_K", "Q6_K")  # integer sub-block scales: summed over a step, times its d once
# Planes the kernel reads as [.., N, steps, width] ([rows, 1, width] a load): the k-quants' integer sub-block
# scales (Q6_K's int8, Q4_K's and Q5_K's uint8 scales and mins). As [rows, 16] tiles, Triton's coalescing gave
# the code words (loads of the same shape) 32 bytes a thread, too many for an asynchronous copy, and sent them
# through shared memory to the dot (Q6_K, session 32); at 64 rows a program Q4_K's tile itself went through
# shared memory (20 STS a step: 2.51 instructions a weight against 2.16 so).
_BY_STEP = {"Q6_K": ("sc",), "Q4_K": ("scm",), "Q5_K": ("scm",)}
# Formats whose codes have bits above the four of "q": their bits a code, in a plane "qh" of eight codes an
# element (Q6_K: uint16; the five-bit formats: uint8, read as [rows, 1, 32] for the reason of _BY_STEP).
_HIGH = {"Q5_0": 1, "Q5_1": 1, "Q5_K": 1, "Q6_K": 2}
# A step's offset dots: [rows, 16] x [16, M], A a plane's 16 values from the step's first (Q4_0, Q8_0: its
# eight blocks and, unused, the next step's eight; Q4_1, Q4_K: the eight scales and the eight mins; Q6_K: its
# sixteen sub-blocks' scales), B 16 rows: at places 0-7 and 8-15, a value of x's block sums (c X, X or -X;
# "+": of the step's blocks 8-15) or zeros, in two f16 parts (a dot each). Per format: (A's plane, B's value
# at 0-7, at 8-15) a dot; their sum, with each term's multiplier, is what comes off the blocks' dots
# (`_kernel`).
_OFFSET_DOTS = {
    "Q4_0": (("d", "cx", None),) * 2,  # d (c + 8) X
    "Q8_0": (("d", "cx", None),) * 2,  # d (c + 128) X
    "Q4_1": (("dm", "cx", "-x"),) * 2,  # d c X - m X
    "Q4_K": (("scm", "cx", None),) * 2 + (("scm", None, "x"),) * 2,  # d sc c X + dmin mn X
    "Q6_K": (("sc", "cx", "cx+"),) * 2,  # d sc (c + 32) X
    "Q8_K": (),  # d (P - c X), c X of the step's 256 elements in f32 (B: [steps, M'])
}
_OFFSET_DOTS |= {"Q5_0": _OFFSET_DOTS["Q4_0"], "Q5_1": _OFFSET_DOTS["Q4_1"], "Q5_K": _OFFSET_DOTS["Q4_K"]}
OFFSET_K = {fmt: 16 * len(dots) for fmt, dots in _OFFSET_DOTS.items()}  # the K of a step's offset dots
_CORRECTION_SCALE = 2.0**-16  # B of the offset dots: x's block sums scaled into f16's range
MAX_ROWS = 16  # rows of x the kernel takes (padded to 8 or 16: the mma's N)
ROW_ALIGN = 128  # weight rows are padded to a multiple of this (a program's rows)
_MIN_ROWS = 64  # the fewest weight rows a program: two warps, two m16 dots each
STEP = 256  # elements of K a loop step takes: eight blocks, two [rows, 32] tiles of code words
_BLOCK = 32
_SMS = 132
_X_MAX_EXP = 14  # each row of x is scaled so that its largest magnitude lies in [2^14, 2^15)
# The high bits: code i of a "qh" element (block 8 h + i of the step, h the element's tile: code j of the
# step's "q" tile 2 h + i // 4, j = i % 4) sits in slot _HIGH_SLOT[i] (at bits `bits` slot), so that one
# shift of the element (the second tuple, right; negative: left) puts two codes where the nibble they extend
# wants them: at bit 4 (j even: the nibble at bits 0-3) and 8 (j odd: at 4-7). Four shifts an element,
# each shared by two codes. Per bits a code: (slots, shifts).
_HIGH_SLOTS = {2: ((0, 2, 1, 3, 4, 6, 5, 7), (-4, -4, -2, -2, 4, 4, 6, 6)),
               1: ((0, 4, 1, 5, 2, 6, 3, 7), (-4, -4, -3, -3, -2, -2, -1, -1))}


def _block_k(fmt: str) -> int:
    return _BLOCK_K.get(fmt, _BLOCK)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockTiling:
    """rows: weight rows a program; splits: programs along K (each a range of whole steps); x_rows: rows of x
    (8 or 16, the mma's N); num_warps: warps a program (two: Triton's `mma.sync` dots, where four would make
    them `wgmma`s, each fenced and waited for: ~1 instruction a weight more)."""

    rows: int = 128
    splits: int = 1
    x_rows: int = 8
    num_warps: int = 2


def _steps(k: int) -> int:
    return -(-k // STEP)


# Weight rows a program of two warps, by rows of x (the mma's N) and format: the most that do not spill
# (`scripts/kernel_report.py`, session 39): 256 spill for every format but Q8_K (one scale a step), 128 for Q6_K
# (64-104 bytes of stack) and, at 16 rows of x, for Q4_K and Q5_K (56-88).
_ROWS = {8: {"Q6_K": 64, "Q8_K": 256}, 16: {"Q4_K": 64, "Q5_K": 64, "Q6_K": 64, "Q8_K": 256}}


def tiling_for(fmt: str, n: int, k: int, m: int) -> BlockTiling:
    """The format's weight rows a program (`_ROWS`, else 128) and the fewest K splits (whole steps each,
    dividing the steps) that give every SM two programs; where none does, half the rows (down to 64, the
    smallest tile of two warps' m16 dots) and the most splits there are."""
    x_rows = 8 if m <= 8 else 16
    steps = _steps(k)
    divisors = [s for s in range(1, steps + 1) if steps % s == 0]
    rows = _ROWS[x_rows].get(fmt, ROW_ALIGN)
    while True:
        splits = next((s for s in divisors if n // rows * s >= 2 * _SMS), None) if n % rows == 0 else None
        if splits is not None:
            return BlockTiling(rows=rows, splits=splits, x_rows=x_rows)
        if rows == _MIN_ROWS or n % (rows // 2):
            return BlockTiling(rows=rows, splits=divisors[-1], x_rows=x_rows)
        rows //= 2


# --- the layout ---------------------------------------------------------------------------------------
def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UnsupportedFormatError(f"blockdot: {fmt} has no kernel; formats: {', '.join(FORMATS)}")


def _codes(w: QTensor) -> jax.Array:
    """The codes of a QTensor (or a stack), uint8 [..., N, K / B, B] in element order (B the block's
    elements, `_block_k`): 4-bit, 6-bit (Q6_K: q + 32), or (Q8_0) q + 128."""
    qs = jnp.asarray(w.planes["ql" if w.fmt == "Q6_K" else "qs"])
    bk = _block_k(w.fmt)
    if w.fmt in ("Q8_0", "Q8_K"):
        # q + 128: the sign bit flipped
        return (lax.bitcast_convert_type(qs, jnp.uint8) ^ 0x80).reshape(*qs.shape[:-1], -1, _BLOCK)
    if w.fmt == "Q4_K":  # 32-byte chunks: byte j holds element j of block 2c (low) and of block 2c + 1 (high)
        return split_nibbles(qs, 32).reshape(*qs.shape[:-1], -1, _BLOCK)
    if w.fmt == "Q5_K":
        return kquants.q5_k_codes(qs, jnp.asarray(w.planes["qh"])).reshape(*qs.shape[:-1], -1, _BLOCK)
    if w.fmt == "Q6_K":
        return kquants.q6_k_codes(qs, jnp.asarray(w.planes["qh"])).reshape(*qs.shape[:-1], -1, bk)
    qs = qs.reshape(*qs.shape[:-1], -1, 16)
    codes = jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)
    if w.fmt in ("Q5_0", "Q5_1"):
        codes = codes | (legacy.high_bits(jnp.asarray(w.planes["qh"])) << 4)
    return codes


def _words(codes: jax.Array, per: int, bits: int, slots=None) -> jax.Array:
    """[..., rows, steps, blocks a step, B] codes (< 2^bits) -> uint16 words [..., rows, steps * W]: per
    codes a word, those of blocks per t + j (j < per) of the step at bits `bits` slots[j] (default j), the
    words of t then t + 1, each B long."""
    *lead, rows, steps, blocks, bk = codes.shape
    slots = range(per) if slots is None else slots
    codes = codes.astype(jnp.uint16).reshape(*lead, rows, steps, blocks // per, per, bk)
    words = functools.reduce(jnp.bitwise_or, [codes[..., j, :] << (bits * slots[j]) for j in range(per)])
    return words.reshape(*lead, rows, -1)


def _unwords(words: jax.Array, per: int, bits: int, bk: int, slots=None) -> jax.Array:
    """The inverse of `_words`: [..., rows, steps * W] -> codes [..., rows, blocks, B] (uint8)."""
    *lead, rows, _ = words.shape
    slots = range(per) if slots is None else slots
    w = words.reshape(*lead, rows, -1, 1, bk)
    codes = (w >> jnp.asarray([bits * s for s in slots], jnp.uint16).reshape(per, 1)) & (2**bits - 1)
    return codes.reshape(*lead, rows, -1, bk).astype(jnp.uint8)


def to_blocks(w: QTensor) -> dict[str, jax.Array]:
    """A QTensor (N, K) of FORMATS, or a stack of them ([L, N, ...] planes), -> its block planes: "q" uint16
    [..., N', K' / 4] (the codes, four to an element; Q8_0 [..., N', K' / 2], two: see the module's
    docstring), and: Q4_0, Q8_0 "d" f16 [..., N', K' / 32 + 8], a scale a block as stored (and eight zeros:
    a step's offset dots read sixteen from its first); Q4_1 "dm" f16 [..., N', K' / 16], a step's eight
    scales then its eight mins; Q4_K "scm" uint8 [..., N', K' / 16] (a super-block's eight scales, then its
    eight mins) and per step "d", "dmin" f16 [..., N', K' / 256]; Q6_K "qh" uint16 [..., N', K' / 8] (the
    codes' high two bits, eight to an element), "sc" int8 [..., N', K' / 16] and "d" f16 [..., N', K' / 256];
    Q5_0, Q5_1, Q5_K those of Q4_0, Q4_1, Q4_K and "qh" uint8 [..., N', K' / 8] (the fifth bits, eight to an
    element); Q8_K "q" as Q8_0 and "d" f32 [..., N', K' / 256].
    N' = N padded to ROW_ALIGN rows, K' = K padded to whole STEPs (padding: zero codes and zero scales, which
    multiply to zero). Traceable."""
    _check_format(w.fmt)
    n, k = w.shape
    bk = _block_k(w.fmt)
    codes = _codes(w)
    lead = codes.shape[:-3]
    steps = _steps(k)

    def pad(a, per_step: int):  # rows to ROW_ALIGN, [..., n, k / per_step] to whole steps
        return jnp.pad(a, [(0, 0)] * len(lead) + [(0, -a.shape[-2] % ROW_ALIGN), (0, steps * per_step - a.shape[-1])])

    codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, -n % ROW_ALIGN), (0, steps * STEP // bk - k // bk), (0, 0)])
    codes = codes.reshape(*lead, codes.shape[-3], steps, STEP // bk, bk)  # (step, block of the step, element)
    per = _PER_WORD[w.fmt]
    if w.fmt in _HIGH:
        bits = _HIGH[w.fmt]
        high = _words(codes >> 4, 8, bits, _HIGH_SLOTS[bits][0])
        out = {"q": _words(codes & 0xF, per, 4), "qh": high if bits == 2 else high.astype(jnp.uint8)}
    else:
        out = {"q": _words(codes, per, 16 // per)}
    planes = {name: jnp.asarray(v) for name, v in w.planes.items()}
    pairs = {"Q4_K": ("scm", "scales", "mins"), "Q5_K": ("scm", "scales", "mins"), "Q4_1": ("dm", "d", "m"),
             "Q5_1": ("dm", "d", "m")}
    if w.fmt in pairs:  # per step: the eight scales, then the eight mins
        name, *parts = pairs[w.fmt]
        eights = [pad(planes[p], 8).reshape(*lead, -1, steps, 8) for p in parts]
        planes[name] = jnp.concatenate(eights, axis=-1).reshape(*lead, -1, steps * 16)
    if w.fmt == "Q6_K":
        planes["sc"] = planes["scales"]
    for name, width in _PLANES[w.fmt].items():
        out[name] = pad(planes[name], width)
        if name == "d" and w.fmt in _TAIL:
            out[name] = jnp.pad(out[name], [(0, 0)] * (out[name].ndim - 1) + [(0, _TAIL[w.fmt])])
    return out


def split_columns(fmt: str, shape: tuple[int, int], planes: dict[str, jax.Array], shards: int) -> dict[str, jax.Array]:
    """Block planes (of a weight of logical `shape`, or a stack) laid out for K split into `shards` equal
    ranges: each range's own block planes (`to_blocks` of that slice of the weight: K padded to whole steps
    a range), one after another along the last axis, so that an even split of it gives every shard its own
    planes. A range must hold whole blocks of the format (32 elements; Q4_K's super-blocks, 256)."""
    n, k = shape
    unit = get_format(fmt).block_size
    if k % shards or (k // shards) % unit:
        raise ShapeMismatchError(f"blockdot: {fmt} {shape}: K={k} does not split into {shards} ranges of whole "
                                 f"{unit}-element blocks")
    qt = from_blocks(fmt, shape, planes)
    width = k // shards
    parts = []
    for i in range(shards):  # each plane holds a fixed number of values an element of K
        part = {name: a[..., a.shape[-1] * i // shards: a.shape[-1] * (i + 1) // shards]
                for name, a in qt.planes.items()}
        parts.append(to_blocks(QTensor(fmt, (n, width), part)))
    return {name: jnp.concatenate([p[name] for p in parts], axis=-1) for name in parts[0]}


def from_blocks(fmt: str, shape: tuple[int, int], planes: dict[str, jax.Array]) -> QTensor:
    """The inverse of `to_blocks`: the QTensor (N, K) the block planes hold (a stack of them where the planes
    are [L, ...]). Traceable; under jit XLA fuses it into what reads the planes (the XLA path dequantizes
    from it)."""
    _check_format(fmt)
    n, k = shape
    bk = _block_k(fmt)
    nb = k // bk
    q = planes["q"]
    lead, per = q.shape[:-2], _PER_WORD[fmt]
    codes = _unwords(q, per, 16 // per, bk)
    if fmt in _HIGH:
        bits = _HIGH[fmt]
        codes = codes | (_unwords(planes["qh"], 8, bits, bk, _HIGH_SLOTS[bits][0]) << 4)
    codes = codes[..., :n, :nb, :]  # [.., n, nb, B] in element order
    if fmt == "Q6_K":
        ql, qh = kquantize.pack_q6_k(codes.reshape(*lead, n, k))
        out = {"ql": ql, "qh": qh, "scales": planes["sc"][..., :n, :nb], "d": planes["d"][..., :n, : k // STEP]}
    elif fmt in ("Q4_K", "Q5_K"):  # chunk c of a super-block: byte j = element j of block 2c | of 2c + 1 << 4
        pairs = (codes & 0xF).reshape(*lead, n, -1, 4, 2, _BLOCK)
        scm = planes["scm"][..., :n, : k // STEP * 16].reshape(*lead, n, -1, 2, 8)
        out = {"qs": (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).reshape(*lead, n, -1),
               "scales": scm[..., 0, :].reshape(*lead, n, nb), "mins": scm[..., 1, :].reshape(*lead, n, nb),
               "d": planes["d"][..., :n, : k // STEP], "dmin": planes["dmin"][..., :n, : k // STEP]}
        if fmt == "Q5_K":
            out["qh"] = kquantize.pack_q5_k_high(codes.reshape(*lead, n, k))
    else:
        if fmt in ("Q8_0", "Q8_K"):
            qs = lax.bitcast_convert_type(codes ^ 0x80, jnp.int8).reshape(*lead, n, nb * _BLOCK)
        else:
            low = codes & 0xF
            qs = (low[..., :16] | (low[..., 16:] << 4)).reshape(*lead, n, nb * 16)
        if fmt == "Q8_K":  # and the sums of each 16 codes, as stored
            sums = jnp.sum(qs.reshape(*lead, n, -1, 16).astype(jnp.int32), axis=-1).astype(jnp.int16)
            out = {"qs": qs, "d": planes["d"][..., :n, : k // STEP], "bsums": sums}
            return QTensor(fmt, (n, k), out)
        if fmt in ("Q5_0", "Q5_1"):
            qs = {"qs": qs, "qh": legacy.pack_high_bits(codes)}
        else:
            qs = {"qs": qs}
        if fmt in ("Q4_1", "Q5_1"):  # a step's eight scales, then its eight mins
            dm = planes["dm"][..., :n, : _steps(k) * 16].reshape(*lead, n, -1, 2, 8)
            scales = {name: dm[..., i, :].reshape(*lead, n, -1)[..., :nb] for i, name in enumerate(("d", "m"))}
        else:
            scales = {"d": planes["d"][..., :n, :nb]}
        out = qs | scales
    return QTensor(fmt, (n, k), out)


# --- x --------------------------------------------------------------------------------------------------
def _offsets(fmt: str, blocks: int) -> jax.Array:
    """c of each block, f32 [blocks]: what d multiplies the block's sum of x by, less its dot: 1024 (+ 8
    for Q4_0's offset, + 16 for Q5_0's, + 32 for Q6_K's) where the code sits at bit 0 (even blocks of a
    step), 64 (+ 8, + 16, + 32) where x was divided by 16 for a code at bit 4 (odd blocks); Q8_0: 1024 + 128,
    every block."""
    if fmt in ("Q8_0", "Q8_K"):
        return jnp.full((blocks,), 1152.0)
    odd = jnp.arange(blocks) % 2 == 1
    base = jnp.where(odd, 64.0, 1024.0)
    return base + {"Q4_0": 8.0, "Q5_0": 16.0, "Q6_K": 32.0}.get(fmt, 0.0)


def _pow2(e: jax.Array) -> jax.Array:
    """float32 2^e of int32 e in [-126, 127], from its exponent bits (exact)."""
    return lax.bitcast_convert_type((e + 127).astype(jnp.int32) << 23, jnp.float32)


def scale_rows(x: jax.Array, x_rows: int, k_padded: int) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (x16 [M', K'] f16, e [M] int32): each row times 2^e, its largest magnitude into [2^14, 2^15)
    (any finite row fits f16's range; bf16 x converts exactly), rounded to f16, zero-padded to whole tiles of
    x_rows rows and to k_padded columns. 2^-e undoes it on the output (`_pow2(-e)`)."""
    m, k = x.shape
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1)
    # the exponent of amax from its bits (log2 and exp2 are approximations on some backends: XLA:CPU's
    # exp2(13) is 8192.0039), and 2^e, 2^-e made from exponent bits: exact, both normal for |e| <= 126
    exponent = (lax.bitcast_convert_type(amax, jnp.int32) >> 23) - 127  # subnormal amax: -127
    e = jnp.clip(jnp.where(amax > 0, _X_MAX_EXP - exponent, 0), -126, 126)
    x16 = (xf * _pow2(e)[:, None]).astype(jnp.float16)
    return jnp.pad(x16, ((0, -(-m // x_rows) * x_rows - m), (0, k_padded - k))), e


def hi_lo(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """f32 v as two f16 parts, v ~ hi + lo (~22 bits together): the offset dots' B operands."""
    hi = v.astype(jnp.float16)
    return hi, (v - hi.astype(jnp.float32)).astype(jnp.float16)


def prepare_x(x: jax.Array, fmt: str, k_padded: int, x_rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [M, K] -> (x^T [K', M'] f16, B, row scales [M] f32): each row times a power of two (its largest
    magnitude into [2^14, 2^15)) rounded to f16, the odd blocks of each step divided by 16; the row scales
    undo the powers of two on the output. B: the offset dots' B operands (`_OFFSET_DOTS`),
    [OFFSET_K a step, M'] f16, from X, each block's sum of the scaled f16 row, and c X (`_offsets`), times
    _CORRECTION_SCALE, each in two f16 parts (hi, lo: ~22 bits together, as the cancellation against the
    blocks' dots, 1024 X of them, needs)."""
    bk = _block_k(fmt)
    x16, e = scale_rows(x, x_rows, k_padded)
    blocks, steps = k_padded // bk, k_padded // STEP
    odd = (jnp.arange(blocks) % 2 == 1) & (_PER_WORD[fmt] == 4)  # a nibble at bit 4
    place = jnp.where(odd, 1.0 / 16, 1.0).astype(jnp.float16)
    by_block = x16.reshape(-1, blocks, bk)
    xt = (by_block * place[None, :, None]).reshape(-1, k_padded).T
    sums = jnp.sum(by_block.astype(jnp.float32), axis=-1) * _CORRECTION_SCALE
    values = {"x": sums, "-x": -sums, "cx": sums * _offsets(fmt, blocks)}  # [M', blocks]
    parts, zero = [], jnp.zeros((sums.shape[0], steps, 8), jnp.float16)
    for i, (_, *places) in enumerate(_OFFSET_DOTS[fmt]):
        for value in places:  # places 0-7, then 8-15
            if value is None:
                parts.append(zero)
                continue
            first = 8 if value.endswith("+") else 0  # of the step's blocks
            v = values[value.rstrip("+")].reshape(-1, steps, STEP // bk)[..., first: first + 8]
            parts.append(hi_lo(v)[i % 2])  # hi, then lo
    if not parts:  # Q8_K: c X of each step, f32 [steps, M']
        return xt, jnp.sum(values["cx"].reshape(-1, steps, STEP // bk), axis=-1).T / _CORRECTION_SCALE, _pow2(-e)
    b = jnp.stack(parts, axis=2).reshape(sums.shape[0], -1).T  # [steps * OFFSET_K, M']
    return xt, b, _pow2(-e)


# --- the kernel ---------------------------------------------------------------------------------------
def _pairs(words, j: int, per: int, *, interpret: bool) -> jax.Array:
    """Code j of each uint16 of `words` as f16, exact: nibble j (per = 4) 1024 + q (j = 0, 2) or 1024 + 16 q
    (j = 1, 3); byte j (per = 2) 1024 + b, one prmt for two."""
    if per == 2:
        if interpret:
            return lax.bitcast_convert_type((((words >> (8 * j)) & 0xFF) | 0x6400).astype(jnp.uint16), jnp.float16)
        # bytes j and j + 2 of the pair of words under 0x64 each: the f16 pair 1024 + b
        # 0x64646464 made from a value ptxas cannot fold (ctaid.x < 2^30): as a constant, the selector took a
        # register move a PRMT; in a register, the selector is PRMT's immediate (ptxas computes it once)
        asm = ("{.reg .b32 k; mov.u32 k, %ctaid.x; shr.u32 k, k, 30; or.b32 k, k, 0x64646464; "
               f"prmt.b32 $0, $1, k, {0x4240 + 0x101 * j:#06x};}}")
        [out] = pltriton.elementwise_inline_asm(asm, args=[words], constraints="=r,r", pack=2,
                                                result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float16)])
        return out
    mask = 0xF0 if j % 2 else 0x0F
    if interpret:
        bits = ((words >> (8 if j >= 2 else 0)) & mask) | 0x6400
        return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16)
    shift = "shr.b32 t, $1, 8;" if j >= 2 else "mov.b32 t, $1;"
    asm = f"{{.reg .b32 t; {shift} lop3.b32 $0, t, {mask << 16 | mask:#010x}, 0x64006400, 0xEA;}}"
    [out] = pltriton.elementwise_inline_asm(asm, args=[words], constraints="=r,r", pack=2,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float16)])
    return out


def _with_high(words, high, j: int, i: int, bits: int, *, interpret: bool) -> jax.Array:
    """Code j of each uint16 of "q" (the low four bits) with code i of the "qh" element beside it (the high
    `bits`, zero-extended to 16) as f16, exact: 1024 + q (j even) or 1024 + 16 q (j odd), the nibble's lop3
    (`_pairs`) and one more for the high bits, moved by a shift shared by two codes (`_HIGH_SLOTS`) to bit 4
    or 8."""
    mask, shift = (0xF0 if j % 2 else 0x0F), _HIGH_SLOTS[bits][1][i]
    high_mask = (2**bits - 1) << (8 if j % 2 else 4)
    if interpret:
        low = (words >> (8 if j >= 2 else 0)) & mask
        moved = high >> shift if shift > 0 else high << -shift
        return lax.bitcast_convert_type((low | (moved & high_mask) | 0x6400).astype(jnp.uint16), jnp.float16)
    # the two lanes of a 32-bit register shift as one: what crosses into a lane lies outside its masks
    low = "shr.b32 a, $1, 8;" if j >= 2 else "mov.b32 a, $1;"
    move = f"shr.b32 h, $2, {shift};" if shift > 0 else f"shl.b32 h, $2, {-shift};"
    asm = (f"{{.reg .b32 a, h; {low} {move} lop3.b32 a, a, {mask << 16 | mask:#010x}, 0x64006400, 0xEA; "
           f"lop3.b32 $0, h, {high_mask << 16 | high_mask:#010x}, a, 0xEA;}}")
    [out] = pltriton.elementwise_inline_asm(asm, args=[words, high], constraints="=r,r,r", pack=2,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float16)])
    return out


def _kernel(*refs, fmt: str, t: BlockTiling, steps: int, stacked: bool, interpret: bool):
    if stacked:
        layer_ref, *refs = refs
        lead = (layer_ref[0],)
    else:
        lead = ()
    high = fmt in _HIGH
    xt_ref, b_ref, q_ref, *refs = refs
    qh_ref = refs.pop(0) if high else None
    *plane_refs, o_ref = refs
    planes = dict(zip(_PLANES[fmt], plane_refs))
    r0 = pl.program_id(0) * t.rows
    s0 = pl.program_id(1) * steps
    rows = pl.ds(r0, t.rows)
    unscale = 1 / _CORRECTION_SCALE
    bk = _block_k(fmt)
    blocks = STEP // bk  # a step's
    per = _PER_WORD[fmt]

    def body(i, acc):
        step = s0 + i

        def plane(name, index, count: int = 1):  # [rows, count]: the plane's values from the step's index-th
            if name in _BY_STEP.get(fmt, ()):  # [.., N, steps, width]: loaded as [rows, 1, count]
                return planes[name][(*lead, rows, pl.ds(step, 1), pl.ds(index, count))].reshape(t.rows, count)
            return planes[name][(*lead, rows, pl.ds(step * _PLANES[fmt][name] + index, count))]

        # The offsets: each pair of dots (hi, lo parts of B) one term, [rows, x_rows] f32.
        dots = [jnp.dot(plane(name, 0, 16).astype(jnp.float16), b_ref[pl.ds(step * OFFSET_K[fmt] + 16 * i, 16), :],
                        preferred_element_type=jnp.float32) for i, (name, *_) in enumerate(_OFFSET_DOTS[fmt])]
        terms = [dots[i] + dots[i + 1] for i in range(0, len(dots), 2)]
        if fmt == "Q8_K":  # one f32 scale a step: the blocks' dots summed on the tensor cores, less c X, times d
            step_sum = -b_ref[pl.ds(step, 1), :]  # [1, x_rows]
            d = plane("d", 0)
        if fmt in ("Q4_K", "Q5_K"):  # less dmin sum_b mn_b X_b (and d sum_b sc_b c X_b, below)
            acc = acc - (plane("dmin", 0).astype(jnp.float32) * unscale) * terms[1]
        if fmt in _SUPER:  # sum_b sc_b (P_b - c X_b), times d once a step
            d = plane("d", 0).astype(jnp.float32)
            step_sum = -unscale * terms[0]
        elif terms:  # less sum_b d_b c X_b (Q4_0: c + 8, Q8_0: 1024 + 128; Q4_1: less m_b X_b)
            acc = acc - unscale * terms[0]
        if _SCALES[fmt]:  # the step's block scales in one load, split into columns
            scales = jnp.split(plane(_SCALES[fmt], 0, blocks).astype(jnp.float32), blocks, axis=1)
        if bk < _BLOCK:  # x of the whole step in one load, split: a [16, 8] tile is one f16 a thread, too few
            x_all = jnp.split(xt_ref[pl.ds(step * STEP, STEP), :], blocks, axis=0)  # for an asynchronous copy
        for b in range(blocks):  # code b % per of tile b // per, loaded where first used
            if b % per == 0:
                words = q_ref[(*lead, rows, pl.ds(step * (STEP // per) + bk * (b // per), bk))]  # [rows, B] uint16
            x = x_all[b] if bk < _BLOCK else xt_ref[pl.ds(step * STEP + bk * b, bk), :]  # [B, x_rows]
            if high:  # the code's high bits from "qh": code b % 8 of its word
                if b % 8 == 0:
                    # [.., N, steps, STEP / 8]: a [rows, 1, B] load, not one of the code words' shape
                    high_words = qh_ref[(*lead, rows, pl.ds(step, 1), pl.ds(bk * (b // 8), bk))].reshape(t.rows, bk)
                    high_words = high_words.astype(jnp.uint16)
                codes = _with_high(words, high_words, b % per, b % 8, _HIGH[fmt], interpret=interpret)
            else:
                codes = _pairs(words, b % per, per, interpret=interpret)
            p = jnp.dot(codes, x, preferred_element_type=jnp.float32)
            if fmt == "Q8_K":
                step_sum = step_sum + p
            elif fmt in _SUPER:  # the sub-block's integer scale times its dot
                step_sum = fma(scales[b], p, step_sum, interpret=interpret)
            else:  # the block's scale times its dot
                acc = fma(scales[b], p, acc, interpret=interpret)
        return acc + d * step_sum if fmt in _SUPER or fmt == "Q8_K" else acc

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
    missing = {"q", *_PLANES[fmt], *(("qh",) if fmt in _HIGH else ())} - set(planes)
    if missing:
        raise ShapeMismatchError(f"blockdot: {fmt} block planes lack {sorted(missing)} (have {sorted(planes)})")
    q = planes["q"]
    n_pad, k_pad = q.shape[-2], q.shape[-1] * _PER_WORD[fmt]
    if not 1 <= m <= MAX_ROWS:
        raise ShapeMismatchError(f"blockdot: x {x.shape}: 1 to {MAX_ROWS} rows of x")
    if q.ndim != 2 + stacked:
        raise ShapeMismatchError(f"blockdot: planes q {q.shape} with layer={'a layer' if stacked else None}: "
                                 f"{'[L, N, K / w] (a stack)' if stacked else '[N, K / w]'} expected, w = "
                                 f"{_PER_WORD[fmt]} codes a uint16")
    if k_pad != _steps(k) * STEP or n_pad % ROW_ALIGN:
        raise ShapeMismatchError(f"blockdot: x {x.shape} against {fmt} block planes "
                                 f"{ {key: v.shape for key, v in planes.items()} }: K {k} padded to whole steps "
                                 f"of {STEP} and rows to {ROW_ALIGN}")
    t = tiling or tiling_for(fmt, n_pad, k, m)
    steps = k_pad // STEP
    if n_pad % t.rows or steps % t.splits or t.x_rows not in (8, 16) or t.x_rows < m:
        raise ShapeMismatchError(f"blockdot: {t} does not divide {n_pad} rows and {steps} steps for {m} rows of x")
    xt, b, scale = prepare_x(x, fmt, k_pad, t.x_rows)
    codes = (q, planes["qh"].reshape(*planes["qh"].shape[:-1], steps, -1)) if fmt in _HIGH else (q,)
    by_step = {name: planes[name].reshape(*planes[name].shape[:-1], steps, -1) for name in _BY_STEP.get(fmt, ())}
    args = (xt, b, *codes, *(by_step.get(name, planes[name]) for name in _PLANES[fmt]))
    if stacked:
        args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
    kernel = functools.partial(_kernel, fmt=fmt, t=t, steps=steps // t.splits, stacked=stacked, interpret=interpret)
    return launch(kernel, args, t, m, n_pad, scale, f"blockdot_{fmt.lower()}", interpret)


def launch(kernel, args, t, m: int, n: int, scale, name: str, interpret: bool) -> jax.Array:
    """Run a block-dot kernel (this module's, `lanesdot`'s) of tiling t (rows, splits, x_rows, num_warps) on
    whole arrays: grid (n / t.rows, t.splits), partial sums [splits, m, n] f32 (the rows of x past m not
    stored), summed over the splits and times each row of x's `scale` [M']: [m, n]."""
    part = pl.pallas_call(
        kernel,
        grid=(n // t.rows, t.splits),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.BlockSpec((1, t.x_rows, t.rows), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((t.splits, m, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=t.num_warps, num_stages=3),
        interpret=interpret,
        name=name,
    )(*args)
    y = part[0] if t.splits == 1 else jnp.sum(part, axis=0)
    return y * scale[:m, None]
