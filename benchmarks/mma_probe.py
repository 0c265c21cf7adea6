"""A shape probe, without a GPU, of one candidate design for the decode GEMM at 8-16 rows of x (issue 13).

The design: the weight is the wgmma's register-fed operand (A), dequantized element by element straight from
code words that Triton loads in the operand's own layout, so that no tile goes through a layout conversion
(`pallas_kernels.mma` converts its dequantized tile through shared memory, ~2 instructions a weight). The
codes are laid out so that no reshape is needed: plane element (n, 64 s + 32 t + w) holds in nibble j the
code of k = 256 s + 32 (4 t + j) + w, so nibble j of a [rows, 32] tile is the [rows, 32] operand of block
4 t + j, and each block is its own dot against the matching 32 rows of x^T.

Three variants of a Q4_0-like format (codes q - 8, one scale a block), at an 8B layer's 4096 x 4096:
- `f32`: exact, as the Triton GEMM dequantizes today: one lop3 puts the code into the mantissa of 2^23, an
  exact subtraction and a multiplication by the scale in f32, one rounding to bf16;
- `f16-a`: two codes at a time into an f16 pair (lop3 into 1024 + q, or 1024 + 16 q), `sub.f16x2` and
  `mul.f16x2` by the scale (inline asm), x in f16;
- `f16-acc`: the pair less its offset (lop3, `sub.f16x2`), the block's dot into fresh accumulators and the
  scale applied to them in f32 (one FFMA an output a block: M / 32 a weight);
- `f16-nosub`: as `f16-acc` without the `sub.f16x2`: the pair stays 1024 + q (or 1024 + 16 q), and the offset
  comes off the block's f32 dot as c x the block's sum of x (an FADD an output a block; the sums are an
  input [K / 32, M]). Exact enough in f32: 1032 x the sum of 32 values costs ~8 of the accumulator's 24 bits;
- `f16-nosub-x`: as `f16-nosub` with the offset left out of the kernel altogether, as if the caller took
  sum_b c s[n, b] X[b, m] (a [N, K / 32] x [K / 32, M] product) apart: the floor of the design.

And one of a Q4_K-like format (codes q, w = d sc_j q - dmin m_j, eight 32-element sub-blocks a 256-element
super-block), at the same shape:
- `kq-scq`: the sub-block's integer scale folded into the operand exactly: from the pair t = 1024 + q (lop3),
  `fma.rn.f16x2` t * sc - 1024 sc = sc * q, an integer up to 945, exact in f16 (nibbles 1 and 3: t * sc / 16
  - 64 sc); the eight sub-blocks' dots share one accumulator, which d scales once a super-block (M / 256 a
  weight); the mins, dmin m_j in f16 ([N, K / 32], made at load), come off as one [rows, 16] x [16, M] dot
  against the sub-blocks' sums of x every two super-blocks.

It prints the SASS instructions a weight element in the K loop, as `scripts/kernel_report.py` counts them
(pip's triton: `pip install triton==3.9.0`). It measures code shape only: these kernels are not on any
model's path and their numerics are not checked here (inline asm has no interpret mode).

    python benchmarks/mma_probe.py [--variants f32,f16-a,f16-acc,...] [--rows 64,128] [--m 8,16] [--warps 4]
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import struct
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import kernel_report  # noqa: E402

N = K = 4096
VARIANTS = ("f32", "f16-a", "f16-acc", "f16-nosub", "f16-nosub-x", "kq-scq")


def _f16x2(v: float) -> str:
    bits = struct.unpack("<H", np.float16(v).tobytes())[0]
    return f"0x{bits << 16 | bits:08x}"


def _pairs(u, j: int, scale=None, offset: bool = True):
    """Nibble j of each uint16 of u as f16 (q - 8), two at a time, times `scale` (f16, u's shape) if given;
    1024 + q without the offset's subtraction. Nibbles 1 and 3 stay in place (16 q), their offset and scale
    divided by 16."""
    place = 16 if j % 2 else 1
    shift = "shr.b32 t, $1, 8;" if j >= 2 else "mov.b32 t, $1;"
    mask = "0x00F000F0" if j % 2 else "0x000F000F"
    tail = " mul.f16x2 $0, t, $2;" if scale is not None else " mov.b32 $0, t;"
    sub = f" mov.b32 c, {_f16x2(1024 + 8 * place)}; sub.f16x2 t, t, c;" if offset else ""
    asm = f"{{.reg .b32 t, c; {shift} lop3.b32 t, t, {mask}, 0x64006400, 0xEA;{sub}{tail}}}"
    args = [u] if scale is None else [u, scale]
    [out] = pltriton.elementwise_inline_asm(asm, args=args, constraints="=r" + ",r" * len(args), pack=2,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(u.shape, jnp.float16)])
    return out


def _kernel(w_ref, s_ref, xt_ref, xs_ref, o_ref, *, variant: str, rows: int, m: int, steps: int):
    r0 = pl.program_id(0) * rows

    def body(step, acc):
        nibbles = 8 if variant == "f32" else 4  # codes an element: uint32 words or uint16
        for t in range(8 // nibbles):  # the step's [rows, 32] tiles of elements
            # step times a constant: `step * 256 // nibbles` hides the offset's alignment from Triton, which then
            # loads with LDG and STS instead of cp.async (3.3-7.1 instructions a weight instead of 2.6-6.8)
            words = w_ref[pl.ds(r0, rows), pl.ds(step * (256 // nibbles) + 32 * t, 32)]
            for j in range(nibbles):
                b = nibbles * t + j  # nibble j of the tile is block b's operand
                s = s_ref[pl.ds(r0, rows), pl.ds(step * 8 + b, 1)]
                xt = xt_ref[pl.ds(step * 256 + 32 * b, 32), :]
                if variant == "f32":
                    bits = (words & jnp.uint32(0xF << (4 * j))) | jnp.uint32(0x4B000000)
                    q = lax.bitcast_convert_type(bits, jnp.float32) - (8388608.0 + 8.0 * (1 << (4 * j)))
                    a = (q * (s * (1.0 / (1 << (4 * j))))).astype(jnp.bfloat16)
                    acc = acc + jnp.dot(a, xt, preferred_element_type=jnp.float32)
                elif variant == "f16-a":
                    a = _pairs(words, j, jnp.broadcast_to(s, words.shape))
                    acc = acc + jnp.dot(a, xt, preferred_element_type=jnp.float32)
                else:
                    p = jnp.dot(_pairs(words, j, offset=variant == "f16-acc"), xt, preferred_element_type=jnp.float32)
                    if variant == "f16-nosub":  # c x the block's sum of x, c = 1032 or 1152 (nibble j's place)
                        p = p - xs_ref[pl.ds(step * 8 + b, 1), :]
                    acc = acc + s.astype(jnp.float32) * p
        return acc

    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((rows, m), jnp.float32))


def _scaled_pairs(u, j: int, sc, neg):
    """sc * q of nibble j of each uint16 of u, two at a time in f16: the pair 1024 + q (or 1024 + 16 q) times
    sc (or sc / 16) plus neg = -1024 sc (or -64 sc) in one `fma.rn.f16x2`, exact (sc, neg: f16, u's shape)."""
    shift = "shr.b32 t, $1, 8;" if j >= 2 else "mov.b32 t, $1;"
    mask = "0x00F000F0" if j % 2 else "0x000F000F"
    asm = f"{{.reg .b32 t; {shift} lop3.b32 t, t, {mask}, 0x64006400, 0xEA; fma.rn.f16x2 $0, t, $2, $3;}}"
    [out] = pltriton.elementwise_inline_asm(asm, args=[u, sc, neg], constraints="=r,r,r,r", pack=2,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct(u.shape, jnp.float16)])
    return out


def _kq_kernel(w_ref, sc_ref, d_ref, mins_ref, xt_ref, xs_ref, o_ref, *, rows: int, m: int, steps: int):
    """`kq-scq`, a step of two super-blocks: sc [N, K / 32] f16 integers, d [N, K / 256] f32, mins
    [N, K / 32] f16 (dmin m_j), xs [K / 32, M] f16 the sub-blocks' sums of x."""
    r0 = pl.program_id(0) * rows

    def body(step, acc):
        mins = mins_ref[pl.ds(r0, rows), pl.ds(step * 16, 16)]
        acc = acc - jnp.dot(mins, xs_ref[pl.ds(step * 16, 16), :], preferred_element_type=jnp.float32)
        for h in range(2):  # super-block 2 step + h: tiles t = 0, 1 of 32 elements, nibble j sub-block 4 t + j
            sb = jnp.zeros((rows, m), jnp.float32)
            for t in range(2):
                words = w_ref[pl.ds(r0, rows), pl.ds(step * 128 + 64 * h + 32 * t, 32)]
                for j in range(4):
                    b = 8 * h + 4 * t + j
                    sc = sc_ref[pl.ds(r0, rows), pl.ds(step * 16 + b, 1)]
                    f, c = (1.0 / 16, -64.0) if j % 2 else (1.0, -1024.0)
                    a = _scaled_pairs(words, j, jnp.broadcast_to(sc * jnp.float16(f), words.shape),
                                      jnp.broadcast_to(sc * jnp.float16(c), words.shape))
                    xt = xt_ref[pl.ds(step * 512 + 256 * h + 32 * (4 * t + j), 32), :]
                    sb = sb + jnp.dot(a, xt, preferred_element_type=jnp.float32)
            acc = acc + d_ref[pl.ds(r0, rows), pl.ds(step * 2 + h, 1)] * sb
        return acc

    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((rows, m), jnp.float32))


def _kq_call(words, sc, d, mins, xt, xs, *, rows: int, m: int, warps: int):
    return pl.pallas_call(functools.partial(_kq_kernel, rows=rows, m=m, steps=K // 512),
                          grid=(N // rows,), out_specs=pl.BlockSpec((rows, m), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct((N, m), jnp.float32),
                          compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=3),
                          )(words, sc, d, mins, xt, xs)


def _call(words, scales, xt, xs, *, variant: str, rows: int, m: int, warps: int):
    return pl.pallas_call(functools.partial(_kernel, variant=variant, rows=rows, m=m, steps=K // 256),
                          grid=(N // rows,), out_specs=pl.BlockSpec((rows, m), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct((N, m), jnp.float32),
                          compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=3))(words, scales, xt, xs)


def probe(variant: str, rows: int, m: int, workdir: pathlib.Path, warps: int = 4) -> dict:
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype)

    step = 256
    if variant == "kq-scq":
        step, fn = 512, functools.partial(_kq_call, rows=rows, m=m, warps=warps)
        args = (sds((N, K // 4), jnp.uint16), sds((N, K // 32), jnp.float16), sds((N, K // 256), jnp.float32),
                sds((N, K // 32), jnp.float16), sds((K, m), jnp.float16), sds((K // 32, m), jnp.float16))
    else:
        exact = variant == "f32"  # f32 scales and bf16 x, as the Triton GEMM takes them; f16 for the others
        fn = functools.partial(_call, variant=variant, rows=rows, m=m, warps=warps)
        args = (sds((N, K // 8), jnp.uint32) if exact else sds((N, K // 4), jnp.uint16),
                sds((N, K // 32), jnp.float32 if exact else jnp.float16),
                sds((K, m), jnp.bfloat16 if exact else jnp.float16),
                sds((K // 32, m), jnp.float32))  # c x each block's sum of x (f16-nosub)
    [kernel] = kernel_report.capture_triton(fn, *args)
    cost = kernel_report._sass_cost(kernel, workdir, weights_per_step=rows * step, weights_per_program=rows * K,
                                    trips=1)
    top = ", ".join(f"{op} {n * 32 * warps / (rows * step):.2f}" for op, n in cost["ops"].most_common(6))
    return {"variant": variant, "rows": rows, "m": m, "warps": warps, "per_weight": round(cost["per_weight"], 3),
            "registers": cost["registers"], "spill_bytes": cost["spill_bytes"], "scope": cost["scope"], "top": top}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rows", default="64,128", help="weight rows a program")
    ap.add_argument("--m", default="8,16", help="rows of x")
    ap.add_argument("--warps", type=int, default=4, choices=(4, 8), help="warps a program (8: two warpgroups, "
                    "each its half of the rows)")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        ap.error("needs pip's triton (no GPU needed): pip install triton==3.9.0")
    try:
        rows_list, m_list = [int(v) for v in args.rows.split(",")], [int(v) for v in args.m.split(",")]
    except ValueError:
        ap.error("--rows and --m take comma-separated integers")
    if any(r not in (64, 128, 256, 512) for r in rows_list):
        ap.error(f"--rows {args.rows}: each must be 64, 128, 256 or 512 (a warpgroup's wgmma rows, a power of two)")
    if args.warps == 8 and min(rows_list) < 128:
        ap.error(f"--rows {args.rows} with --warps 8: each must be at least 128 (two warpgroups of 64 rows)")
    if any(m not in (8, 16, 32, 64) for m in m_list):
        ap.error(f"--m {args.m}: each must be 8, 16, 32 or 64 (a wgmma's columns, a power of two)")
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        ap.error(f"--variants: {unknown} not among {VARIANTS}")
    print("| variant | weight rows | warps | M | instructions a weight (K loop) | registers | spills "
          "| largest, a weight |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            for rows in rows_list:
                for m in m_list:
                    r = probe(variant, rows, m, pathlib.Path(tmp), args.warps)
                    print(f"| {variant} | {rows} | {args.warps} | {m} | {r['per_weight']} | {r['registers']} "
                          f"| {r['spill_bytes']} | {r['top']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
