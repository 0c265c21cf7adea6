"""The constant tables of the formats (i-quant lattice codebooks, the sign table, the 4-bit code tables, NVFP4's
scale values), each defined once in its format's module: against gguf-py's tables, against the C++ header the
native build generates from them, and (where llama-cpp-python is installed) the dequantizers of the formats that
use them against libggml's own."""

from __future__ import annotations

import ctypes
import re

import gguf.quants as gq
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from realm_jax import native
from realm_jax.quant import FORMATS, dequantize, iq1, iq2, iq3, iq4, mxfp, repack
from helpers import random_blocks
from test_kquantize import _libggml_base

CODEBOOKS = {"IQ2_XXS": iq2.GRID_XXS, "IQ2_XS": iq2.GRID_XS, "IQ2_S": iq2.GRID_S, "IQ3_XXS": iq3.GRID_XXS,
             "IQ3_S": iq3.GRID_S, "IQ1_S": iq1.GRID, "IQ1_M": iq1.GRID}


@pytest.mark.parametrize("fmt", CODEBOOKS)
def test_codebook_is_gguf_pys(fmt):
    cls = getattr(gq, fmt)
    cls.init_grid()
    want = cls.grid.reshape(cls.grid_shape)
    ours = CODEBOOKS[fmt]
    assert ours.shape == want.shape and ours.dtype in (np.uint8, np.int8)
    np.testing.assert_array_equal(ours.astype(np.float32), want)
    assert len({tuple(p) for p in ours}) == len(ours)  # distinct points


def test_sign_and_code_tables_are_gguf_pys():
    np.testing.assert_array_equal(iq2.KSIGNS, np.frombuffer(gq.IQ2_XXS.ksigns, np.uint8))
    assert all(int(s).bit_count() % 2 == 0 for s in iq2.KSIGNS)  # an even number of minus signs
    np.testing.assert_array_equal(iq4.KVALUES, np.array(gq.IQ4_NL.kvalues, np.int8))
    np.testing.assert_array_equal(mxfp.E2M1, np.array(gq.MXFP4.kvalues, np.int8))
    np.testing.assert_array_equal(mxfp.E2M1, np.array(gq.NVFP4.kvalues, np.int8))
    want = gq.NVFP4.ue4m3_to_fp32(np.arange(256, dtype=np.uint8)).astype(np.float32)
    np.testing.assert_array_equal(mxfp.UE4M3.view(np.uint32), want.view(np.uint32))


def _c_table(text: str, name: str) -> np.ndarray:
    body = re.search(rf"\b{name}\[[^=]*= \{{(.*?)\}};", text, re.DOTALL).group(1)
    return np.array([float(v.rstrip("f")) for v in re.findall(r"-?[\d.]+(?:e-?\d+)?f?", body)])


def test_generated_header_holds_the_modules_tables():
    """The native kernels' tables are written from these definitions (realm_tables.h), not typed again."""
    text = native.tables_header()
    for name, table in [("kIq2xxsGrid", iq2.GRID_XXS), ("kIq2xsGrid", iq2.GRID_XS), ("kIq2sGrid", iq2.GRID_S),
                        ("kIq3xxsGrid", iq3.GRID_XXS), ("kIq3sGrid", iq3.GRID_S), ("kIq1sGrid", iq1.GRID),
                        ("kKsigns", iq2.KSIGNS), ("kIq4Values", iq4.KVALUES), ("kE2M1", mxfp.E2M1),
                        ("kUe4m3", mxfp.UE4M3)]:
        np.testing.assert_array_equal(_c_table(text, name), table.reshape(-1).astype(np.float64), err_msg=name)


# --- gguf-py against libggml (optional) --------------------------------------------------------------------
NEW = ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "MXFP4", "NVFP4", "TQ1_0", "TQ2_0", "IQ1_S", "IQ1_M", "IQ2_XXS",
       "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]


@pytest.mark.parametrize("fmt", NEW)
def test_dequantize_equals_libggml(fmt, rng):
    """The oracle holds: realm-jax (bit-identical to gguf-py) equals llama.cpp's dequantize_row_* on random
    blocks with finite scales, so a file llama.cpp writes means the same numbers here."""
    fn = getattr(_libggml_base(), f"dequantize_row_{fmt.lower().replace('_k', '_K')}")
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    f = FORMATS[fmt]
    raw = np.ascontiguousarray(random_blocks(fmt, 4, 2048 // f.block_size, rng))
    k = raw.shape[1] // f.type_size * f.block_size
    want = np.zeros((4, k), np.float32)
    fn(raw.ctypes.data, want.ctypes.data, want.size)
    got = np.asarray(dequantize(repack(raw, fmt, (4, k))))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(got, gq.dequantize(raw, GGMLQuantizationType[fmt]))


def test_lookup16_is_the_table_read_by_index():
    """`lookup16` (the select tree the kernels use instead of a gather) gives table[code] for every code,
    bit for bit, signed zeros included."""
    import jax.numpy as jnp
    import numpy as np

    from realm_jax.quant.common import lookup16

    table = np.array([-0.0, 0.0, 1.5, -2.25, 3e-38, -7e37, 5, 6, 7, 8, 9, 10, 11, 12, 13, np.inf], np.float32)
    codes = jnp.asarray(np.arange(64) % 16, jnp.uint8).reshape(4, 16)
    got = np.asarray(lookup16(codes, table))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), table[np.asarray(codes)].view(np.uint32))
