"""The decode GEMV on the Pallas Triton GPU backend: y = x @ dequant(w)^T for up to 16 rows of x, with the
weight in its lane layout (`pallas_kernels.decode_layout`) and integer dot products on its codes, as
llama.cpp's MMVQ kernels do, with the activations quantized to int16 per 32 values (llama.cpp's int8 makes
four times a bf16 product's error: `decode_layout.quantize_x`).

Every weight byte is read once. A program owns `rows` consecutive rows of the weight (four per thread: a
thread's 16-byte load holds the same word of four rows) and a contiguous range of K (the grid splits K where
the rows alone would not give every SM work several times over); it loops over that range a few units at a
time and accumulates [units, rows] tiles in f32, reducing them over the units once, at the end. Per unit:

- the code words of each 32-element sub-block come out of the stored words with one mask (and, for a fifth
  or sixth bit kept apart, a shift and a mask more, shared by the two code words of a stored word:
  `_paired_codes`), four codes to a 32-bit register;
- `dp2a` multiplies two codes by two int16 activations and adds: a chain of sixteen of them (eight for
  Q6_K's 16-element sub-blocks) gives the integer dot product of a sub-block with the activations;
- the sub-block's scale, the activations' scale and the format's offset turn it into f32: with
  w = a * q + b per sub-block (a the scale, b the offset or min), sum(w * x) = a * dx * sum(q * xq) +
  b * sum(x), sum(x) taken over the unquantized activations.

Partial results of the K splits [splits, M, N] are summed by the caller. On a CPU the kernel runs in
Pallas interpret mode with `dp2a` written in jnp (the same arithmetic, exactly).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.decode_layout import GEMV_FORMATS, LAYOUTS, ROW_ALIGN, X_MAX, Layout
from pallas_kernels.ptx import fma
from realm_jax.errors import ShapeMismatchError, UnsupportedFormatError

__all__ = ["MAX_ROWS", "DecodeTiling", "gemv", "tiling_for"]

MAX_ROWS = 16  # rows of x the decode GEMV takes
_SMS = 132  # H100 / H200
LO = 0x0F0F0F0F  # the low nibble of each byte
HI = 0xF0F0F0F0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeTiling:
    """Static tiling, chosen by `tiling_for`.

    Attributes:
      rows: weight rows per program (a multiple of 32 x `per_thread`; the lanes' last axis).
      per_thread: weight rows per thread (`rows_per_thread`: 4, one 16-byte load of a plane word, or 8).
      units: layout units (256 or 32 elements of K) per loop step.
      splits: programs along K; each sums its share of the units.
      parts: programs per unit (k-quants): each multiplies its share of the unit's four groups of activation
        blocks (1, 2 or 4; Q6_K also 8, half a group each: `_PARTS`), where the rows and the K splits alone
        give too few programs (an 8B llama's k/v projection).
    """

    rows: int
    per_thread: int
    units: int
    splits: int
    parts: int = 1

    @property
    def num_warps(self) -> int:
        return self.rows // (32 * self.per_thread)


# Programs a unit may be split over (`DecodeTiling.parts`): a k-quant's four groups of activation blocks, one
# to four a program; Q6_K's also in halves (eight parts), whose code words are apart (its fifth and sixth
# bits in H words of their own): at the k/v projection (1024 rows) its eight weight rows a thread then give
# 512 programs, where four groups a program would give 256.
_PARTS = {fmt: (1, 2, 4, 8) if fmt == "Q6_K" else (1, 2, 4) for fmt in GEMV_FORMATS if LAYOUTS[fmt].unit == 256}


def _pow2_divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and (n // d) & (n // d - 1) == 0]


def tiling_for(fmt: str, m: int, n: int, k: int) -> DecodeTiling:
    """The one heuristic: one warp a program (its tiles of every dtype then share one register layout),
    `rows_per_thread` weight rows per thread (four where eight would not divide N or give too few
    programs), one unit per loop step; then the fewest programs that give every SM at least two, counting
    the chunks of rows of x, and of those the one that splits K (a power-of-two number of units each)
    before a unit's blocks; else the most programs there can be."""
    lay = LAYOUTS[fmt]
    units = k // lay.unit
    chunks = max(1, (1 << max(m - 1, 0).bit_length()) // chunk_rows(fmt))
    programs = lambda t: chunks * (n // t.rows) * t.splits * t.parts  # noqa: E731
    options = [DecodeTiling(rows=32 * per_thread, per_thread=per_thread, units=1, splits=splits, parts=parts)
               for per_thread in sorted({rows_per_thread(fmt), 4}, reverse=True) if n % (32 * per_thread) == 0
               for splits in _pow2_divisors(units) for parts in _PARTS.get(fmt, (1,))]
    enough = [t for t in options if programs(t) >= 2 * _SMS]
    if enough:
        return min(enough, key=lambda t: (-t.per_thread, programs(t), t.parts))
    return max(options, key=lambda t: (programs(t), -t.parts))


def rows_per_thread(fmt: str) -> int:
    """Weight rows per thread: four (one 16-byte load of a plane word), or eight where the work per unit
    that does not depend on the rows (the activations' loads and their addresses) is too much of the loop
    spread over four: the formats with a fifth or sixth bit, whose codes take more instructions to assemble
    (kernel_report at M = 1: Q5_0/Q5_1 1.81-1.89 instructions a weight at four rows, 1.57-1.66 at eight;
    Q5_K/Q6_K 1.72-1.88 at eight, 1.98-1.99 at four where N = 1024 leaves too few programs for eight; no
    spills). Q6_K keeps eight there by splitting a unit over eight programs (`_PARTS`): on XLA's Triton, the
    device's compiler, 2.09 at four rows a thread, 1.87 at eight in halves of a group."""
    return 8 if fmt in ("Q5_0", "Q5_1", "Q5_K", "Q6_K") else 4


def chunk_rows(fmt: str) -> int:
    """Rows of x one program multiplies, each with its accumulators in registers: two, or one where two
    would spill (Q5_K's and Q6_K's code words take more registers). More rows take more programs, which
    read the same tile of the weight (from L2); the kernel's code, and its compile time, grow with the
    rows it unrolls (4 rows: 0.6 s to compile; 8: 45 s)."""
    return 1 if fmt in ("Q5_K", "Q6_K") else 2


# --- dp2a ---------------------------------------------------------------------------------------------
def _dp2a(a, b, c, *, high: bool, signed: bool, interpret: bool):
    """c + the dot product of a's two int16 halves with bytes 0 and 1 (or, `high`, 2 and 3) of b (unsigned
    0..255, or `signed`)."""
    if interpret:
        s = c
        for i in range(2):
            ai = (a << (16 - 16 * i)) >> 16  # sign-extended half i
            byte = 8 * (i + 2 * high)
            bi = ((b.astype(jnp.int32) << (24 - byte)) >> 24) if signed else ((b >> byte) & 0xFF).astype(jnp.int32)
            s = s + ai * bi
        return s
    op = f"dp2a.{'hi' if high else 'lo'}.s32.{'s32' if signed else 'u32'}"
    [out] = pltriton.elementwise_inline_asm(f"{op} $0, $1, $2, $3;", args=[a, b, c], constraints="=r,r,r,r",
                                            pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.int32)])
    return out


# --- each format: its activation blocks with the code words they meet, and its scales --------------------
# A code word is one 32-bit word of four codes for the program's rows and the step's units, a [units, 1,
# rows] uint32 tile (every tile of a step has that form, so all share one register layout), paired with one
# activation word of the block.
@dataclasses.dataclass
class _Chain:
    """One activation block of 32 and the codes it meets: `parts`, its sub-blocks: [(code words [(uint32
    [units, 1, rows], activation word 0..7 of the block)], the integer scale of the sub-block or None, an
    integer bias (factor, index of an integer activation sum in the unit) added to the dot product or None)],
    the exact power of two the codes carry (`shift`: high nibbles left in place carry 16), and its offset
    terms [(index of an f32 activation sum in the unit, its f32 factor or None for 1)]."""

    block: int
    parts: list[tuple[list[tuple[jax.Array, int]], jax.Array | None, tuple[int, int] | None]]
    shift: float = 1.0
    offsets: list[tuple[int, jax.Array | None]] = dataclasses.field(default_factory=list)


def _u32(v: int):
    return jnp.uint32(v)


def _nibbles(word, high: int):
    return ((word >> 4) if high else word) & _u32(LO)


def _rotl(v, n: int):
    return (v << n) | (v >> (32 - n)) if n % 32 else v


def _merge(a, b, mask: int, interpret: bool):
    """(a & mask) | (b & ~mask) of uint32 a and b, in one `lop3` (written in jnp, LLVM splits it into two
    masks and an OR, and folds any mask b carries into each)."""
    if interpret:
        return (a & _u32(mask)) | (b & _u32(~mask & 0xFFFFFFFF))
    [out] = pltriton.elementwise_inline_asm(f"lop3.b32 $0, $1, $2, {mask:#x}, 0xE4;", args=[a, b],
                                            constraints="=r,r,r", pack=1,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])
    return lax.bitcast_convert_type(out, jnp.uint32)  # Triton's IR has no unsigned result type


def _paired_codes(words, h_lo, h_hi, positions, width: int, interpret: bool):
    """The code words in the low and the high nibbles of stored words (two sub-blocks of a k-quant, the two
    halves of a Q5_0/Q5_1 block), each with its `width` high bits (1: the fifth bit; 2: Q6_K's two) from an
    H word (`h_lo`, `h_hi`: code j of word w at bit 8j + positions[w]): ([low code words], [high ones]).

    A code word taken alone costs a shift of its H word, a mask and an OR for the high bits, and a shift of
    the stored word for the high nibbles. Here the two H words are first merged (a rotation and one or two
    lop3) into words whose bytes hold both code words' bits (the low one's at bits 4.., the high one's at
    bits 0.. of the next byte), so one shift and one mask serve both code words of a stored word: the low
    code word is then one lop3, the high one a lop3 and a rotation by a nibble, which also brings its high
    bits from the next byte into place."""
    r = _rotl(h_hi, 4)  # h_hi's bits 8j + p at 8(j + 1) + p - 4 (p >= 4), or at 8j + p + 4 (p < 4)
    if any(p >= 4 for p in positions):  # h_lo's bits at 8j + p, h_hi's at 8(j + 1) + p - 4
        upper = _merge(h_lo, r, HI, interpret)
    if any(p < 4 for p in positions):  # h_lo's bits at 8j + p, h_hi's at 8j + 4 + p
        lower = _merge(h_lo, r, LO, interpret)
    mask = _u32(0x11111111 if width == 1 else 0x33333333)
    lows, highs = [], []
    for word, p in zip(words, positions):
        # both at bit 4 (the low code's) and bit 0 of the next byte (the high code's), masked
        m = ((upper >> (p - 4)) if p >= 4 else _rotl(lower, 4 - p)) & mask
        lows.append(_merge(word, m, LO, interpret))
        highs.append(_rotl(_merge(word, m, HI, interpret), 28))  # nibbles down, the high bits back a byte
    return lows, highs


def _legacy(fmt: str, get, groups=(0,), *, interpret: bool = False) -> tuple:
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one 32-element block per unit."""
    d = get("d").astype(jnp.float32)
    if fmt == "Q8_0":
        return d, None, [_Chain(0, [([(get("q", w), w) for w in range(8)], None, None)])], True
    words = [get("q", w) for w in range(4)]
    if fmt in ("Q5_0", "Q5_1"):  # the fifth bits of code word w at bit 8j + 4 + w, of code word 4 + w at 8j + w
        h = get("h")
        lows, highs = _paired_codes(words, h, _rotl(h, 4), (4, 5, 6, 7), 1, interpret)
        codes = list(zip(lows + highs, range(8)))
    else:  # activation words 0..3 meet the words' low nibbles, 4..7 their high nibbles
        codes = [(_nibbles(words[w % 4], w >= 4), w) for w in range(8)]
    offset = {"Q4_0": -8.0, "Q5_0": -16.0}.get(fmt)
    dm = d * offset if offset is not None else get("m").astype(jnp.float32)
    return d, dm, [_Chain(0, [(codes, None, None)], offsets=[(0, None)])], False


def _kquant(fmt: str, get, groups=(0, 1, 2, 3), halves=(0, 1), *, interpret: bool = False) -> tuple:
    """Q4_K, Q5_K, Q6_K, Q8_K: one 256-element super-block per unit, eight activation blocks of 32 in four
    groups of two that read the same code words (the low and the high nibbles of a word): `groups` are the
    groups to multiply, plain or traced ints (a program may take part of a unit: `DecodeTiling.parts`);
    Q6_K's `halves` the halves of each group's code words (a 16-element sub-block of each of its two blocks),
    plain or traced ints too."""
    d = get("d").astype(jnp.float32)
    chains = []
    for g in groups:
        if fmt == "Q8_K":
            for s in (2 * g, 2 * g + 1):
                chains.append(_Chain(s, [([(get("q", 8 * s + w), w) for w in range(8)], None, None)]))
        elif fmt == "Q6_K":  # group g: ql words 8g + w, in their low and high nibbles, meet activation blocks
            parts = ([], [])  # 2g and 2g + 1 (the layout's block order)
            for i in halves:  # H word 2s + i: code j of code word 4i + r at bits 8j + 2r
                pair = _paired_codes([get("q", 8 * g + 4 * i + r) for r in range(4)], get("h", 4 * g + i),
                                     get("h", 4 * g + 2 + i), (0, 2, 4, 6), 2, interpret)
                for high in (0, 1):
                    # a 16-element sub-block of four code words; codes q of 6 bits stand for q - 32: their dot
                    # product less 32 x the activations' sum
                    s = 2 * g + high
                    parts[high].append((list(zip(pair[high], [4 * i + r for r in range(4)])),
                                        get("sc", 2 * s + i).astype(jnp.int32), (-32, 2 * s + i)))
            for high in (0, 1):
                chains.append(_Chain(2 * g + high, parts[high]))
        else:  # Q4_K, Q5_K: group g is chunk g, whose words hold sub-block 2g (low nibbles) and 2g + 1 (high)
            words = [get("q", 8 * g + w) for w in range(8)]
            if fmt == "Q5_K":  # code j of code word w: its fifth bit at bit 8j + 4 + w (w < 4) or 8j + w - 4
                paired = _paired_codes(words, get("h", 2 * g), get("h", 2 * g + 1), [(w + 4) % 8 for w in range(8)],
                                       1, interpret)
            for high in (0, 1):
                s = 2 * g + high
                scm = 4 * g + high  # `decode_layout`: a chunk's two scales, then its two mins
                sc, mn = get("scm", scm).astype(jnp.int32), get("scm", scm + 2).astype(jnp.float32)
                if fmt == "Q4_K":  # high nibbles stay in place: 16x the codes, undone in f32
                    codes = [(word & _u32(HI if high else LO), w) for w, word in enumerate(words)]
                else:
                    codes = list(zip(paired[high], range(8)))
                chains.append(_Chain(s, [(codes, sc, None)], 1 / 16 if fmt == "Q4_K" and high else 1.0, [(s, mn)]))
    if fmt == "Q8_K":
        return d, None, chains, True
    if fmt == "Q6_K":
        return d, None, chains, False
    return d, -get("dmin").astype(jnp.float32), chains, False


# Formats whose sub-block dot products times their integer scales fit in an int32 (a sub-block of n codes
# c, activations |x| <= 32767, scales |s| <= S: n * max|c| * 32767 * S < 2^31): Q5_K 32 x 31 x 63, Q6_K 16 x
# 32 x 128 (codes less 32). Q4_K's high nibbles, kept in place (16x), would overflow.
_INT_SCALES = ("Q5_K", "Q6_K")
assert all(n * c * X_MAX * sc < 2**31 for n, c, sc in ((32, 31, 63), (16, 32, 128)))

_FORMATS: dict[str, Callable] = {f: functools.partial(_legacy if LAYOUTS[f].unit == 32 else _kquant, f)
                                 for f in GEMV_FORMATS}


# --- the kernel ---------------------------------------------------------------------------------------
def _kernel(*refs, fmt: str, names: tuple[str, ...], t: DecodeTiling, steps: int, m_rows: int, stacked: bool,
            interpret: bool):
    layer_ref, xw_ref, dx_ref, sx_ref, *plane_refs, o_ref = refs if stacked else (None, *refs)
    planes = dict(zip(names, plane_refs))
    bn = t.rows
    m0 = pl.program_id(0) * m_rows  # this program's rows of x
    r0 = pl.program_id(1) * t.rows
    split, part = pl.program_id(2) // t.parts, pl.program_id(2) % t.parts
    u0 = split * (steps * t.units)
    lead = (layer_ref[0],) if stacked else ()  # the layer of a stack, read where it lies

    def body(step, accs):
        units = pl.ds(u0 + step * t.units, t.units)

        def get(name, p=0):
            """Word p of plane `name` for the step's units and the program's rows: [units, 1, rows]."""
            return planes[name][(*lead, units, pl.ds(p, 1), pl.ds(r0, bn))]

        def multiply(which, accs):
            d, dm, chains, signed = _FORMATS[fmt](get, *which, interpret=interpret)
            out = []
            for m in range(m_rows):  # unrolled: each row of x keeps its accumulators in registers
                scaled = jnp.zeros((t.units, 1, bn), jnp.float32)
                offsets = jnp.zeros((t.units, 1, bn), jnp.float32)
                for chain in chains:
                    s = chain.block
                    dot = None
                    for codes, scale, bias in chain.parts:
                        piece = jnp.zeros(codes[0][0].shape, jnp.int32)
                        if bias is not None:  # the chain starts from it: one product per row of x, not per row
                            factor, sums = bias
                            bias_x = factor * sx_ref[pl.ds(m0 + m, 1), units, pl.ds(sums, 1)][0][..., None]
                            piece = jnp.broadcast_to(bias_x, piece.shape)
                        for code, w in codes:  # one chain through the sub-block's code words, two dp2a each
                            for high in (0, 1):
                                xw = xw_ref[high, pl.ds(m0 + m, 1), units, pl.ds(8 * s + w, 1)][0][..., None]
                                piece = _dp2a(jnp.broadcast_to(xw, code.shape), code, piece, high=bool(high),
                                              signed=signed, interpret=interpret)
                        if scale is not None and fmt in _INT_SCALES:  # exact in int32: one multiply
                            piece = piece * scale
                        piece = piece.astype(jnp.float32)  # [units, 1, rows]
                        if scale is not None and fmt not in _INT_SCALES:
                            piece = piece * scale.astype(jnp.float32)
                        dot = piece if dot is None else dot + piece
                    dx = dx_ref[pl.ds(m0 + m, 1), units, pl.ds(s, 1)][0][..., None]  # [units, 1, 1]
                    scaled = fma(dx * chain.shift if chain.shift != 1.0 else dx, dot, scaled, interpret=interpret)
                    for sums, factor in chain.offsets:
                        sx = sx_ref[pl.ds(m0 + m, 1), units, pl.ds(sums, 1)][0][..., None]
                        offsets = offsets + (sx if factor is None else sx * factor)
                acc = fma(d, scaled, accs[m], interpret=interpret)  # FFMAs, which XLA's Triton does not make
                out.append(fma(dm, offsets, acc, interpret=interpret) if dm is not None else acc)
            return tuple(out)

        if LAYOUTS[fmt].unit == 32:
            return multiply(((0,),), accs)
        # This program's groups of the unit's activation blocks (all four, or its part), one at a time in a
        # loop: the same code on other words. Unrolled, the kernel's Triton IR grows 4x and its compile time
        # ~15x (Q4_K: 29 s of CPU against 2 s; Q6_K: 47 against 3), for ~0.1-0.3 fewer instructions a weight.
        if t.parts == 8:  # Q6_K: half a group, the program's part of it
            return multiply(((part // 2,), (part % 2,)), accs)
        per = 4 // t.parts
        return lax.fori_loop(0, per, lambda j, accs: multiply(((part * per + j,),), accs), accs)

    acc = lax.fori_loop(0, steps, body, tuple(jnp.zeros((t.units, 1, bn), jnp.float32) for _ in range(m_rows)))
    for m in range(m_rows):  # the one reduction over the units
        o_ref[0, pl.ds(m, 1), :] = jnp.sum(acc[m], axis=0)


def gemv(xw, dx, sx, lanes: dict[str, jax.Array], *, fmt: str, layer=None, tiling: DecodeTiling | None = None,
         interpret: bool = False) -> jax.Array:
    """Partial products [splits x parts, M', N'] f32 of quantized activations with a weight in lanes; their sum over
    axis 0, cut to [M, N], is x @ dequant(w)^T (M' >= M: M rounded up to a power of two; N' = the lanes'
    padded rows).

    Args:
      xw, dx, sx: `decode_layout.quantize_x(x, fmt)` for x [M, K], M <= MAX_ROWS.
      lanes: the weight's lane planes (`decode_layout.to_lanes`); with `layer`, a stack of them [L, ...].
      fmt: the weight's format (a key of `decode_layout.LAYOUTS`).
      layer: None, or an int32 scalar (traced or not): the layer of the stacked lanes to multiply, read in
        place (a scan over stacked layers would otherwise copy each layer's planes out on every step).
      tiling: overrides `tiling_for`.
      interpret: run in Pallas interpret mode (CPU).
    """
    if fmt not in _FORMATS:
        raise UnsupportedFormatError(f"decode gemv: {fmt} has no kernel; formats: {', '.join(_FORMATS)}")
    lay: Layout = LAYOUTS[fmt]
    _, m, units, _ = xw.shape
    stacked = layer is not None
    q = lanes["q"]
    n = q.shape[-1]
    if m > MAX_ROWS or n % ROW_ALIGN or q.ndim != 3 + stacked or q.shape[stacked] != units:
        raise ShapeMismatchError(f"decode gemv: x of {m} rows and {units} units against lanes "
                                 f"{ {k: v.shape for k, v in lanes.items()} }" + (" (a stack)" if stacked else "")
                                 + f"; at most {MAX_ROWS} rows of x")
    m_pad = 1 << max(m - 1, 0).bit_length()  # Triton blocks have power-of-two sizes
    if m_pad != m:
        xw = jnp.pad(xw, ((0, 0), (0, m_pad - m), (0, 0), (0, 0)))
        dx, sx = (jnp.pad(a, ((0, m_pad - m), (0, 0), (0, 0))) for a in (dx, sx))
    chunk = min(m_pad, chunk_rows(fmt))
    t = tiling or tiling_for(fmt, m, n, units * lay.unit)
    if n % t.rows or units % (t.splits * t.units) or t.parts not in _PARTS.get(fmt, (1,)):
        raise ShapeMismatchError(f"decode gemv: {t} does not divide {n} rows and {units} units of {fmt}")
    names = tuple(lay.planes)
    kernel = functools.partial(_kernel, fmt=fmt, names=names, t=t, steps=units // t.splits // t.units,
                               m_rows=chunk, stacked=stacked, interpret=interpret)
    args = (xw, dx, sx, *(lanes[name] for name in names))
    if stacked:
        args = (jnp.asarray(layer, jnp.int32).reshape(1), *args)
    return pl.pallas_call(
        kernel,
        # The chunks of rows of x vary fastest: the programs that read one tile of the weight run together,
        # and all but the first find it in the L2 cache.
        grid=(m_pad // chunk, n // t.rows, t.splits * t.parts),
        in_specs=[pl.no_block_spec] * len(args),  # whole arrays: the kernel indexes its rows, units and layer
        out_specs=pl.BlockSpec((1, chunk, t.rows), lambda c, i, s: (s, c, i)),
        out_shape=jax.ShapeDtypeStruct((t.splits * t.parts, m_pad, n), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=t.num_warps, num_stages=2),
        interpret=interpret,
        name=f"decode_{fmt.lower()}",
    )(*args)
