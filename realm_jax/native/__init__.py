"""realm-jax's native CPU kernels, reached from XLA as FFI custom calls: the decode matmul on the planes as
stored (qmatmul.cc) and prefill's bf16 gemm on weights packed in panels (gemm.cc).

On a CPU, XLA multiplies the one or few rows of a decode step by a 16-bit or 8-bit weight far below memory
bandwidth (BENCHMARKS.md: 6-20 GB/s against 40-80), and it can only read 4-bit planes by dequantizing the
whole weight on every call. `qmatmul.cc` streams a weight's planes (every format of the table: the
k-quants, the legacy block formats, the i-quants, MXFP4/NVFP4, the ternary and the plain types; the
formats beyond the first ones in a header per family, their codebooks generated from realm_jax.quant into
realm_tables.h at build) once per call, dequantizes 32 elements at a time in registers with
the format's own formulas, multiplies them by the rows of x in f32 and splits the weight's rows over XLA's
intra-op thread pool. `gemm` multiplies prefill's many rows in bf16 with f32 accumulation (vdpbf16ps,
6 x 64 register tiles) on a weight `pack_panels` laid out at load, reading layer i of the stacked layers
in place (XLA's dot reached 410-850 GFLOP/s on gemma3's prefill shapes and needed each layer's weight
copied out of the stack; the gemm runs at ~860), or on a CPU with AMX-BF16 with its tiles (TDPBF16PS, 16 x 64
outputs a block: `gemm_amx`). `qgemm` runs the gemm on the quantized planes, a panel at a time; with
``REALM_JAX_NATIVE_PREFILL=int8`` (gemm_i8.h, opt-in: see `int8_prefill`) in int8 against x quantized per
group of 32. `qgemm_f32` is its f32 product (gemm_f32.h: the f32 policy's prefill, no
AVX512_BF16 needed).

The C++ source is compiled at first use with the machine's C++ compiler (``$CXX``, else ``g++``/``c++``,
``-O3 -march=native``) into the realm-jax cache (``$REALM_JAX_CACHE/native``, keyed by the source, the
compiler, the flags, jax's version and the CPU) and registered as the XLA FFI targets ``realm_qmatmul``,
``realm_gemm_bf16``, ``realm_gemm_q`` and ``realm_gemm_q_f32`` (prefill's gemm on the planes) and
``realm_decode_attention`` (attention.cc: a decode step over the stacked KV cache in place).
``REALM_JAX_NATIVE_VARIANT`` forces one of the builds in `VARIANTS` (native, avx2, portable) for everything
that runs (another name is an ArgumentError). ``REALM_JAX_NATIVE=0`` turns them off; `available()` then says
False and `reason()` why, and impl "auto" stays on the XLA path. Asking for impl "native" where it cannot be built raises
`NativeBuildError`.

The weights these kernels read, and the choice between them by rows of x, belong to the linear layer's
native backend (`realm_jax.linear.native`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.errors import ArgumentError, NativeBuildError, ShapeMismatchError
from realm_jax.inputs import shown
from realm_jax.quant import QTensor

__all__ = ["FORMAT_IDS", "GLU_ACTS", "MAX_ROWS", "PANEL", "available", "build", "decode_attention",
           "exact_bf16_formats", "gemm", "gemm_amx", "gemm_available", "matmul", "int8_formats", "int8_prefill",
           "pack_panels", "qgemm", "qgemm_f32", "quantize_x8", "reason", "supports", "unpack_panels", "vector_path"]

_HERE = pathlib.Path(__file__).parent
_SOURCES = (_HERE / "qmatmul.cc", _HERE / "gemm.cc", _HERE / "attention.cc")  # one library; pool.h, numeric.h
# qmatmul.cc's per-family headers; realm_tables.h (the codebooks) is generated from realm_jax.quant at build.
_HEADERS = tuple(_HERE / h for h in ("pool.h", "numeric.h", "dequant.h", "planes.h", "kquants_low.h", "lut4.h", "ternary.h",
                                     "iquants.h", "plain.h", "gemm_i8.h", "gemm_f32.h"))
# The format ids planes.h's `Fmt` enum expects; planes are passed in the format's plane order.
FORMAT_IDS = {"F32": 0, "F16": 1, "BF16": 2, "I8": 3, "I16": 4, "I32": 5, "I64": 6, "F64": 7,
              "Q4_0": 10, "Q4_1": 11, "Q5_0": 12, "Q5_1": 13, "Q8_0": 14,
              "Q4_K": 20, "Q5_K": 21, "Q6_K": 22, "Q8_K": 23, "Q2_K": 24, "Q3_K": 25,
              "IQ4_NL": 30, "IQ4_XS": 31, "MXFP4": 32, "NVFP4": 33, "TQ1_0": 40, "TQ2_0": 41,
              "IQ1_S": 50, "IQ1_M": 51, "IQ2_XXS": 52, "IQ2_XS": 53, "IQ2_S": 54, "IQ3_XXS": 55, "IQ3_S": 56}
_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-w")
# The builds of the kernels, each forced with REALM_JAX_NATIVE_VARIANT (default "native"), so that tests can
# run every one on any x86-64 machine that can execute it:
#   native    -O3 -march=native: the AVX-512 paths where the CPU has AVX-512 (F, BW; the gemm AVX512_BF16)
#   avx2      -O3 -march=x86-64-v3: AVX2 and FMA, no AVX-512 (the portable loops, vectorized by the compiler)
#   portable  the portable loops at -O1, even where AVX-512 is present (for tests: small shapes only)
VARIANTS = {"native": ("-O3", "-march=native"), "avx2": ("-O3", "-march=x86-64-v3"),
            "portable": ("-O3", "-march=native", "-O1", "-DREALM_PORTABLE")}  # the last -O wins
_NEEDS = {"avx2": ("avx2", "fma", "f16c", "bmi2")}  # CPU flags a variant's code executes


def _variant(portable: bool = False) -> str:
    """The build a call uses: "portable" when asked for, else REALM_JAX_NATIVE_VARIANT's (default native).
    A name not in VARIANTS is an ArgumentError, not a build that fails: impl "auto" would go on without the
    kernels, ~4x slower, and say nothing."""
    if portable:
        return "portable"
    variant = os.environ.get("REALM_JAX_NATIVE_VARIANT", "native")
    if variant not in VARIANTS:
        raise ArgumentError(f"REALM_JAX_NATIVE_VARIANT={shown(variant)} must be one of {', '.join(VARIANTS)}")
    return variant


def _target(name: str, variant: str) -> str:
    """The XLA FFI target of kernel `name` in a build: the native build's under the plain name."""
    return name if variant == "native" else f"{name}_{variant}"
GLU_ACTS = {"silu": 1, "gelu_tanh": 2}  # gemm.cc's Act: the gated FFN activations its epilogue applies
PANEL = 64  # rows of W per panel of `pack_panels` (gemm.cc's kPanel)
# Up to this many rows of x the native kernel runs; past it the gemm on panels (or XLA's dot on a dense copy,
# where there are no panels) is faster. Measured
# on the 2-core AVX-512 CPU (4096 x 4096 Q4_K / Q6_K / Q8_0, bf16): native 0.3-0.7 ms at 1 row, ~1.8 at 8
# (even with the dot), 3.4-3.8 at 16 against the dot's ~2.1 (the kernel is bound by its FMAs from ~4 rows).
MAX_ROWS = 8


def _compiler() -> str:
    for cxx in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cxx and shutil.which(cxx):
            return cxx
    raise NativeBuildError("realm_jax.native: no C++ compiler found ($CXX, g++, c++, clang++); install one "
                           "(e.g. `apt install g++`) or use impl='xla'")


def _cpu_signature() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cache_root() -> pathlib.Path:
    from realm_jax.assets import cache_subdir

    return cache_subdir("native")


def _c_array(name: str, ctype: str, values: np.ndarray) -> str:
    body = ",".join(("{" + ",".join(map(str, row)) + "}") if values.ndim == 2 else str(row) for row in values.tolist())
    dims = "".join(f"[{d}]" for d in values.shape)
    return f"alignas(64) inline constexpr {ctype} {name}{dims} = {{{body}}};\n"


def tables_header() -> str:
    """realm_tables.h: the formats' constant tables (i-quant codebooks, sign table, 4-bit code tables, NVFP4's
    scale values) as C++ arrays, written from their one definition in realm_jax.quant's modules."""
    from realm_jax.quant import iq1, iq2, iq3, iq4, mxfp

    ue4m3 = ", ".join(f"{float(v)!r}f" for v in mxfp.UE4M3)  # exact: every value has at most 4 significant bits
    return ("// Generated by realm_jax/native/__init__.py from realm_jax.quant (iq1..iq4, mxfp): do not edit.\n"
            "#pragma once\n#include <cstdint>\nnamespace realm::tables {\n"
            + _c_array("kIq2xxsGrid", "uint8_t", iq2.GRID_XXS) + _c_array("kIq2xsGrid", "uint8_t", iq2.GRID_XS)
            + _c_array("kIq2sGrid", "uint8_t", iq2.GRID_S) + _c_array("kIq3xxsGrid", "uint8_t", iq3.GRID_XXS)
            + _c_array("kIq3sGrid", "uint8_t", iq3.GRID_S) + _c_array("kIq1sGrid", "int8_t", iq1.GRID)
            + _c_array("kKsigns", "uint8_t", iq2.KSIGNS) + _c_array("kIq4Values", "int8_t", iq4.KVALUES)
            + _c_array("kE2M1", "int8_t", mxfp.E2M1)
            + f"alignas(64) inline constexpr float kUe4m3[256] = {{{ue4m3}}};\n}}  // namespace realm::tables\n")


def build(portable: bool = False, variant: str | None = None) -> pathlib.Path:
    """Compile the native sources (qmatmul.cc, gemm.cc and attention.cc into one library, once per source,
    compiler, flags, jax version and CPU) and return the shared library's path. `variant` is one of VARIANTS
    (default: `_variant(portable)`); the portable one runs the scalar path even where AVX-512 is present (the
    tests check it), at -O1: it runs small test shapes only, and -O3 takes twice as long to build (26 s
    against 12 on the 2-core CPU, a format template instantiated per rows and rounding).
    Raises NativeBuildError with the compiler's output when it fails, or for a variant this CPU cannot run."""
    variant = _variant(portable) if variant is None else variant
    if variant not in VARIANTS:
        raise NativeBuildError(f"realm_jax.native: REALM_JAX_NATIVE_VARIANT={variant!r} must be one of {list(VARIANTS)}")
    missing = [f for f in _NEEDS.get(variant, ()) if f not in cpu_flags()]
    if missing:
        raise NativeBuildError(f"realm_jax.native: the {variant} build needs CPU flags this CPU lacks: {missing}")
    cxx = _compiler()
    flags = (*VARIANTS[variant], *_FLAGS)
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"realm_jax.native: cannot run {cxx} --version: {e}") from None
    tables = tables_header()
    texts = [f.read_text() for f in (*_SOURCES, *_HEADERS)] + [tables]
    key = hashlib.sha256("\0".join([*texts, cxx, version, " ".join(flags), jax.__version__,
                                    platform.machine(), _cpu_signature()]).encode()).hexdigest()[:16]
    name = f"librealm_{variant}.so"
    target = _cache_root() / key / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    generated = pathlib.Path(tempfile.mkdtemp(dir=target.parent))
    (generated / "realm_tables.h").write_text(tables)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    cmd = [cxx, *flags, f"-I{jax.ffi.include_dir()}", f"-I{generated}", *map(str, _SOURCES), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise NativeBuildError(f"realm_jax.native: building {', '.join(f.name for f in _SOURCES)} failed ({' '.join(cmd)}):\n"
                                   f"{done.stderr.strip()[-4000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"realm_jax.native: {' '.join(cmd)} ran past 600 s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        shutil.rmtree(generated, ignore_errors=True)
    return target


@functools.cache
def _outcome(variant: str) -> ctypes.CDLL | NativeBuildError:
    """Build, load and register the library, once per process: the library, or why not (kept, so that a
    machine without a working compiler does not retry the build on every trace that asks)."""
    if os.environ.get("REALM_JAX_NATIVE", "1") == "0":
        return NativeBuildError("realm_jax.native: turned off by REALM_JAX_NATIVE=0")
    try:
        path = build(variant=variant)
    except NativeBuildError as e:
        return e
    try:
        lib = ctypes.CDLL(str(path))
        handler, gemm, glu, qgemm = lib.RealmQMatmul, lib.RealmGemmBF16, lib.RealmGemmGluBF16, lib.RealmGemmQ
        attention, qgemm_f32 = lib.RealmDecodeAttention, lib.RealmGemmQF32
    except (OSError, AttributeError) as e:
        return NativeBuildError(f"realm_jax.native: cannot load {path}: {e}")
    for name, handler in (("realm_qmatmul", handler), ("realm_gemm_bf16", gemm), ("realm_gemm_glu_bf16", glu),
                          ("realm_gemm_q", qgemm), ("realm_gemm_q_f32", qgemm_f32),
                          ("realm_decode_attention", attention)):
        jax.ffi.register_ffi_target(_target(name, variant), jax.ffi.pycapsule(handler), platform="cpu")
    return lib


def _load(portable: bool = False) -> ctypes.CDLL:
    """The registered library of the build a call uses (`_variant`); NativeBuildError if it cannot be had."""
    outcome = _outcome(_variant(portable))
    if isinstance(outcome, NativeBuildError):
        raise outcome
    return outcome


def available() -> bool:
    """Whether the native matmul is built and registered here (building it on the first call)."""
    return not isinstance(_outcome(_variant()), NativeBuildError)


def reason() -> str | None:
    """Why `available()` is False, or None."""
    outcome = _outcome(_variant())
    return str(outcome) if isinstance(outcome, NativeBuildError) else None


def vector_path(portable: bool = False) -> bool:
    """Whether the loaded library runs the AVX-512 path (False: the portable scalar path)."""
    return bool(_load(portable).realm_native_vector_path())


def supports(w) -> bool:
    """Whether `matmul` takes this weight: a 2-D QTensor of a format above, K a multiple of 32."""
    return w.fmt in FORMAT_IDS and w.ndim == 2 and w.shape[1] % 32 == 0


_ROUND = {"float32": 0, "bfloat16": 1, "float16": 2}  # qmatmul.cc's Round



def _checked(w, layer, what: str):
    """w's planes checked (one layer's, when `layer` reads one of a stack), and w supported."""
    if layer is None:
        w.check(f"{what}: w")
    else:  # the planes of one layer must be right; the stack's depth is checked by the kernel
        QTensor(w.fmt, w.shape, {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in w.planes.items()}
                ).check(f"{what}: w (one layer of a stack)")
    if not supports(w):
        raise ShapeMismatchError(f"{what}: {w} is not supported (a 2-D weight of "
                                 f"{', '.join(FORMAT_IDS)} with cols a multiple of 32)")


def matmul(x: jax.Array, w, *, compute_dtype=None, out_dtype=None, weight_dtype=None, layer=None,
           portable: bool = False) -> jax.Array:
    """y = x @ dequant(w)^T on CPU with f32 accumulation, reading w's planes as they are.

    Args:
      x: [..., K] float array; it is rounded to `compute_dtype` (default x.dtype), then multiplied in f32
        (products of a 16-bit x and a dequantized weight are exact in f32, so a bf16 compute dtype gives
        the bf16 matmul's result). Q2_K and Q3_K at a 16-bit compute dtype and weight_dtype float32 (the
        AVX-512 build) multiply integer codes by x quantized to int16 per 256 elements instead: an error
        below 2^-16 of each block's largest |x|, within the 16-bit dtypes' tolerance, and per row of x.
      w: a 2-D `QTensor` (N, K) that `supports` accepts.
      out_dtype: y's dtype (default x.dtype).
      weight_dtype: float32 (default), bfloat16 or float16: each dequantized weight is rounded to it
        before the product, as converting the weight to that dtype would. bfloat16 with an x of bf16 values
        runs on vdpbf16ps where the CPU has AVX512_BF16 (the same exact products, summed in another order;
        its conversion per 32 weights makes it no faster than float32: the bf16 policy decodes exact
        weights, `realm_jax.linear.native.decode_weight_dtype`). float32 with a
        bf16 compute dtype, for the `exact_bf16_formats`, also runs on vdpbf16ps there: each code as a bf16
        value times x, the group's scale and offset applied to the group's sum (finite x below 2^64; else
        the f32 loop), within the f32 loop's tolerance.
      layer: None, or an int32 scalar (traced or not): w's planes carry a leading axis of stacked layers
        [L, ...] and layer `layer` is multiplied, read in place.
      portable: use the scalar build (for tests).

    Returns:
      [..., N] in out_dtype. Call it under `jax.jit` on the CPU backend.
    """
    _checked(w, layer, "realm_jax.native.matmul")
    if x.shape[-1] != w.shape[1]:
        raise ShapeMismatchError(f"realm_jax.native.matmul: x.shape={x.shape} must end in K={w.shape[1]}")
    _load(portable)
    compute_dtype = jnp.dtype(x.dtype if compute_dtype is None else compute_dtype)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    rows = x.reshape(-1, x.shape[-1]).astype(compute_dtype).astype(jnp.float32)
    planes = [w.planes[p.name] for p in w.format.planes]
    out = jax.ShapeDtypeStruct((rows.shape[0], w.shape[0]), jnp.float32)
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    weight_dtype = jnp.dtype(jnp.float32 if weight_dtype is None else weight_dtype).name
    if weight_dtype not in _ROUND:
        raise ShapeMismatchError(f"realm_jax.native.matmul: weight_dtype={weight_dtype} must be one of {list(_ROUND)}")
    x16 = np.int64(compute_dtype.itemsize == 2)  # bf16/f16 x: Q2_K/Q3_K may take qmatmul.cc's int16 path
    y = jax.ffi.ffi_call(_target("realm_qmatmul", _variant(portable)), out)(rows, index, *planes, fmt=np.int64(FORMAT_IDS[w.fmt]),
                                                 round=np.int64(_ROUND[weight_dtype]), x16=x16)
    return y.reshape(*x.shape[:-1], w.shape[0]).astype(out_dtype)


def gemm_available() -> bool:
    """Whether `gemm` runs its vector path here (AVX512_BF16); where it does not, `load` keeps a dense
    copy for XLA's dot instead of `pack_panels`' layout (the scalar path is for tests)."""
    return available() and bool(_load().realm_gemm_vector_path())


def gemm_amx() -> bool:
    """Whether `gemm`'s and `qgemm`'s bf16 product runs on AMX tiles here (TDPBF16PS: a CPU with AMX-BF16,
    whose kernel grants the process the tile state; ~5x the AVX512_BF16 tiles on a 2-core Xeon,
    BENCHMARKS.md), for weights whose K is a multiple of 32. ``REALM_JAX_NATIVE_AMX=0`` keeps the AVX512_BF16
    tiles (read at each call)."""
    return available() and bool(_load().realm_gemm_amx())


def exact_bf16_formats(portable: bool = False) -> frozenset[str]:
    """The formats for which `matmul` with a bf16 compute dtype and weight_dtype float32 multiplies the exact
    weights by x with vdpbf16ps in this build (qmatmul.cc's dot_codes: those of small unsigned codes, w = s *
    q + o per group of 32 or Q6_K's s per 16, where the CPU has AVX512_BF16; empty elsewhere). At one row
    1.2-2.0x as fast as rounding each weight to bf16 (weight_dtype bfloat16; 16384 rows, Zen 4), at eight
    rows 0.84-1.0x, so the bf16 policy's decode takes it (BENCHMARKS.md, "Issue 18: decode on the exact
    codes")."""
    return _exact_bf16_formats(_variant(portable))


@functools.cache
def _exact_bf16_formats(variant: str) -> frozenset[str]:  # asked when a decode is traced: once per build
    lib = _load(variant == "portable")
    return frozenset(f for f, i in FORMAT_IDS.items() if lib.realm_qmatmul_exact_codes(ctypes.c_int64(i)))


def int8_formats(portable: bool = False) -> frozenset[str]:
    """The formats `qgemm`'s int8 product serves in this build: those of integer codes of up to 8 bits with
    one scale and offset per group of 32, or Q6_K's scale per 16 (gemm_i8.h), where the CPU has AVX512_VNNI
    (and the gemm's AVX512_BF16); empty elsewhere."""
    return _int8_formats(_variant(portable))


@functools.cache
def _int8_formats(variant: str) -> frozenset[str]:  # asked once per weight at load: one query per build
    lib = _load(variant == "portable")
    return frozenset(f for f, i in FORMAT_IDS.items() if lib.realm_gemm_int8_format(ctypes.c_int64(i)))


def int8_prefill(fmt: str, portable: bool = False) -> bool:
    """Whether `qgemm` multiplies weights of format `fmt` in int8 when not told (its `int8=None`):
    ``REALM_JAX_NATIVE_PREFILL=int8`` asks for it, and `int8_formats` has the format. The default,
    ``REALM_JAX_NATIVE_PREFILL=bf16``, keeps every format on bf16 panels: quantizing x to int8 per group of
    32 costs ~10x the bf16 policy's divergence from f32 on the real models (mean KL 1.7e-3-2.1e-3 against
    1.1e-4-1.7e-4, over the precision table's bound on SmolLM2), and on models without outlier activations
    (the synthetic ones: ~3.2e-3, simulated) ~5x bf16's rounding error, which no outlier treatment helps
    (BENCHMARKS.md, sessions 24 and 44); for ~1.25x prefill."""
    choice = os.environ.get("REALM_JAX_NATIVE_PREFILL", "bf16")
    if choice not in ("int8", "bf16"):
        raise ArgumentError(f"REALM_JAX_NATIVE_PREFILL={shown(choice)}: expected 'bf16' (the default) or 'int8'")
    return choice == "int8" and fmt in int8_formats(portable)


def pack_panels(w: jax.Array) -> jax.Array:
    """A dense weight [N, K] (K even) laid out for `gemm`: bf16 [ceil(N/64), K/2, 64, 2], panel p holding
    the pairs (W[n, 2k], W[n, 2k+1]) of rows 64p..64p+63 (zero past N). Traceable; the values are w's
    rounded to bf16."""
    if w.ndim != 2 or w.shape[1] % 2:
        raise ShapeMismatchError(f"realm_jax.native.pack_panels: needs a weight [N, K] with K even, got {w.shape}")
    n, k = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(jnp.asarray(w, jnp.bfloat16), ((0, panels * PANEL - n), (0, 0)))
    return w.reshape(panels, PANEL, k // 2, 2).transpose(0, 2, 1, 3)


def unpack_panels(panels: jax.Array, n: int) -> jax.Array:
    """`pack_panels`' inverse: the bf16 weight [n, K]."""
    p, kp = panels.shape[0], panels.shape[1]
    return panels.transpose(0, 2, 1, 3).reshape(p * PANEL, 2 * kp)[:n]


def gemm(x: jax.Array, panels: jax.Array, n: int, *, out_dtype=None, layer=None, glu: str | None = None,
         portable: bool = False) -> jax.Array:
    """y = x @ W^T with x rounded to bf16, W given as `pack_panels(W)`, f32 accumulation (gemm.cc).

    Args:
      x: [..., K] float array.
      panels: `pack_panels` of W [n, K]; with `layer`, a stack of them [L, ...] of which layer `layer`
        (an int32 scalar, traced or not) is read in place.
      n: W's rows (N).
      out_dtype: y's dtype (default x.dtype).
      glu: None, or a gated FFN's activation (a key of GLU_ACTS): W is gate|up (rows [0, n/2) and
        [n/2, n), n/2 a multiple of PANEL) and y = act(x @ gate^T) * (x @ up^T) [..., n/2], computed in
        f32 and rounded to bf16 in the kernel (the down projection's input), then cast to out_dtype.
      portable: use the scalar build (for tests).

    Returns:
      [..., n] (or [..., n/2] with `glu`) in out_dtype. Call it under `jax.jit` on the CPU backend.
    """
    want = 3 if layer is None else 4
    k = x.shape[-1]
    if panels.ndim != want + 1 or panels.shape[-3:] != (k // 2, PANEL, 2) or panels.shape[-4] != -(-n // PANEL) \
            or k % 2 or panels.dtype != jnp.bfloat16:
        raise ShapeMismatchError(f"realm_jax.native.gemm: panels {panels.dtype}{list(panels.shape)} do not hold a "
                                 f"weight [{n}, {k}] for x.shape={x.shape}" + (" (one layer of a stack)" if layer is not None else ""))
    out_dtype, rows, index = _gemm_args("gemm", x, k, n, out_dtype, layer, glu, portable)
    if glu is None:
        out = jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32)
        y = jax.ffi.ffi_call(_target("realm_gemm_bf16", _variant(portable)), out)(rows, index, panels)
    else:
        n //= 2
        out = jax.ShapeDtypeStruct((rows.shape[0], n), jnp.bfloat16)
        y = jax.ffi.ffi_call(_target("realm_gemm_glu_bf16", _variant(portable)), out)(rows, index, panels, act=np.int64(GLU_ACTS[glu]))
    return y.reshape(*x.shape[:-1], n).astype(out_dtype)


def _gemm_args(name: str, x, k: int, n: int, out_dtype, layer, glu, portable: bool):
    """`gemm`'s and `qgemm`'s common checks and arguments: the GLU epilogue's, the library loaded, the out
    dtype, x as bf16 rows [R, K] and the layer index (0 for a weight of its own)."""
    if glu is not None and (glu not in GLU_ACTS or n % (2 * PANEL)):
        raise ShapeMismatchError(f"realm_jax.native.{name}: glu={glu!r} needs one of {list(GLU_ACTS)} and gate|up "
                                 f"halves of a multiple of {PANEL} rows, got n={n}")
    _load(portable)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    return out_dtype, x.reshape(-1, k).astype(jnp.bfloat16), index


def qgemm(x: jax.Array, w, *, out_dtype=None, layer=None, glu: str | None = None, portable: bool = False,
          int8: bool | None = None) -> jax.Array:
    """y = x @ W^T for many rows of x (prefill), with W read from its planes as stored, each panel of 64 of
    W's rows dequantized into a buffer of the thread that multiplies it, so that no copy of the weight
    exists. Two products, both with f32 sums:

    - bf16 (gemm.cc): `gemm`'s, the panel rounded to bf16 as `pack_panels` of the dense bf16 weight holds
      it. Results equal `gemm` on `pack_panels(to_dense(w, bf16))`.
    - int8 (gemm_i8.h; formats with one scale and offset per group of 32, and Q6_K's per 16, on a CPU with
      AVX512_VNNI): x quantized per group of 32 values of a row to int8 codes (d = max|x| / 127, like
      llama.cpp's q8_0) times the weight's integer codes, exactly, then scaled in f32: the f32 product of
      the exactly dequantized weight with `quantize_x8(x)`. Twice the multiply-adds an instruction of bf16's; x's
      rounding to int8 is llama.cpp's, and coarser than bf16's (`int8_prefill`).

    Args:
      x: [..., K] float array (rounded to bf16).
      w: a 2-D `QTensor` (N, K) that `supports` accepts; with `layer`, planes of a stack [L, ...] of which
        layer `layer` (an int32 scalar, traced or not) is read in place.
      out_dtype, glu, portable: as `gemm`'s (`glu`: W is gate|up, N/2 a multiple of PANEL).
      int8: the int8 product; None: `int8_prefill(w.fmt)`. True where it does not exist raises ValueError.

    Returns:
      [..., N] (or [..., N/2] with `glu`) in out_dtype. Call it under `jax.jit` on the CPU backend.
    """
    _checked(w, layer, "realm_jax.native.qgemm")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ShapeMismatchError(f"realm_jax.native.qgemm: x.shape={x.shape} must end in K={k}")
    out_dtype, rows, index = _gemm_args("qgemm", x, k, n, out_dtype, layer, glu, portable)
    planes = [w.planes[p.name] for p in w.format.planes]
    width, dtype = (n, jnp.float32) if glu is None else (n // 2, jnp.bfloat16)
    out = jax.ShapeDtypeStruct((rows.shape[0], width), dtype)
    has_int8 = int8_prefill(w.fmt, portable) if int8 is None else bool(int8)
    if has_int8 and w.fmt not in int8_formats(portable):
        raise ValueError(f"realm_jax.native.qgemm: no int8 product for {w.fmt} in this build (it needs AVX512_VNNI "
                         "and a format of one scale and offset per group of 32 or 16: Q4_0, Q4_1, Q5_0, Q5_1, "
                         "Q8_0, Q4_K, Q5_K, Q6_K)")
    y = jax.ffi.ffi_call(_target("realm_gemm_q", _variant(portable)), out)(
        rows, index, *planes, fmt=np.int64(FORMAT_IDS[w.fmt]), act=np.int64(0 if glu is None else GLU_ACTS[glu]),
        int8=np.int64(has_int8))
    return y.reshape(*x.shape[:-1], width).astype(out_dtype)


def qgemm_f32(x: jax.Array, w, *, out_dtype=None, layer=None, portable: bool = False) -> jax.Array:
    """y = x @ W^T in f32 for many rows of x (prefill under the f32 policy), with W read from its planes as
    stored (gemm_f32.h): each panel of 64 of W's rows dequantized exactly, as `to_dense(w, f32)` holds it,
    into an f32 buffer of the thread that multiplies it, f32 sums. So no dense f32 copy of the weight
    exists. AVX-512F register tiles, or the compiler's vectors of a loop over the panel's columns in the
    avx2 and portable builds; no AVX512_BF16 needed.

    Args:
      x: [..., K] float array (as f32).
      w: a 2-D `QTensor` (N, K) that `supports` accepts; with `layer`, planes of a stack [L, ...] of which
        layer `layer` (an int32 scalar, traced or not) is read in place.
      out_dtype: default x's dtype. portable: the portable build.

    Returns:
      [..., N] in out_dtype. Call it under `jax.jit` on the CPU backend.
    """
    _checked(w, layer, "realm_jax.native.qgemm_f32")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ShapeMismatchError(f"realm_jax.native.qgemm_f32: x.shape={x.shape} must end in K={k}")
    _load(portable)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    index = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(())
    rows = x.reshape(-1, k).astype(jnp.float32)
    planes = [w.planes[p.name] for p in w.format.planes]
    out = jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32)
    y = jax.ffi.ffi_call(_target("realm_gemm_q_f32", _variant(portable)), out)(
        rows, index, *planes, fmt=np.int64(FORMAT_IDS[w.fmt]))
    return y.reshape(*x.shape[:-1], n).astype(out_dtype)


def quantize_x8(x) -> np.ndarray:
    """x [..., K] (K a multiple of 32) as `qgemm`'s int8 product sees it, in f32: rounded to bf16, then per
    group of 32 values of a row d = max|x| / 127 and x = d * round(x * (1 / d)) (to nearest even; all zero
    where 1 / d is not finite, NaN where the group holds a NaN or an infinity). numpy, for tests and
    references."""
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    if x.shape[-1] % 32:
        raise ShapeMismatchError(f"realm_jax.native.quantize_x8: K={x.shape[-1]} must be a multiple of 32")
    g = x.reshape(*x.shape[:-1], -1, 32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        d = np.abs(g).max(-1, keepdims=True) / np.float32(127)
        finite = np.isfinite(g).all(-1, keepdims=True)
        inv = np.float32(1) / d  # inf where d is 0 or below ~3.7e-37: those groups' codes are 0
        inv = np.where(finite & np.isfinite(inv), inv, np.float32(0))
        q = np.clip(np.rint(g * inv.astype(np.float32)), -127, 127)
        out = np.where(finite, d, np.float32(np.nan)) * q
    return out.astype(np.float32).reshape(x.shape)


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, query_pos: jax.Array, local, *,
                     scale: float, window: int = 0, kv_len: int | None = None, portable: bool = False) -> jax.Array:
    """`realm_jax.ops.attention` for a decode step, over layer `layer` of the stacked KV cache read in place
    (attention.cc): f32 scores and softmax, the probabilities rounded to the cache's dtype, f32 sums; a long
    row in key ranges, each kv head's range read once for all its query heads, their softmaxes merged.

    Args:
      q: [B, T, N, H] queries in the compute dtype (few T: a decode step).
      k_cache: [L, Bc, S, K, H] and v_cache [L, Bc, S, K, Hv], both bf16 or both f32, Bc >= B: the stacked
        cache with this step's keys and values already written; sequences 0..B-1 are read.
      layer: int32 scalar (traced or not): the cache slot of this layer.
      query_pos: [B, T] int32, each query's position (< S): it attends to the keys at positions <= its own
        and below kv_len (with `local` true and a `window`, the last `window` of them).
      local: bool scalar (traced or not).

    Returns:
      [B, T, N, Hv] in q.dtype. Call it under `jax.jit` on the CPU backend.
    """
    b, t, n, h = q.shape
    if k_cache.ndim != 5 or v_cache.ndim != 5 or k_cache.shape[-1] != h or n % k_cache.shape[3] \
            or k_cache.dtype != v_cache.dtype or k_cache.dtype not in (jnp.bfloat16, jnp.float32):
        raise ShapeMismatchError(f"realm_jax.native.decode_attention: q{list(q.shape)} against caches "
                                 f"{k_cache.dtype}{list(k_cache.shape)} / {v_cache.dtype}{list(v_cache.shape)}")
    _load(portable)
    kv_len = k_cache.shape[2] if kv_len is None else kv_len
    out = jax.ShapeDtypeStruct((b, t, n, v_cache.shape[-1]), jnp.float32)
    y = jax.ffi.ffi_call(_target("realm_decode_attention", _variant(portable)), out)(
        q.astype(jnp.float32), jnp.asarray(query_pos, jnp.int32), jnp.asarray(layer, jnp.int32).reshape(()),
        jnp.asarray(local, jnp.int32).reshape(()), k_cache, v_cache, scale=np.float32(scale),
        window=np.int64(window), kv_len=np.int64(kv_len))
    return y.astype(q.dtype)
