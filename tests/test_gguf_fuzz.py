"""Seeded fuzz: thousands of mutated copies of a small valid GGUF either load or raise a RealmError subclass.

Mutations: byte flips, integer header fields overwritten with extreme values, truncation, deleted and
duplicated chunks, and stacks of these. Anything other than a RealmError (struct.error, IndexError,
MemoryError, a numpy error...) or a case slower than `CASE_LIMIT_S` fails with the seed and case number,
so it can be replayed: `_mutate(base, *_integer_fields(base), np.random.default_rng((SEED, case)))`.
`REALM_JAX_FUZZ_CASES` and `REALM_JAX_FUZZ_SEED` override the defaults for a longer local run.
"""

from __future__ import annotations

import collections
import os
import signal
import struct
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

import realm_jax
from realm_jax.errors import RealmError
from realm_jax.gguf import open_gguf

N_CASES = int(os.environ.get("REALM_JAX_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("REALM_JAX_FUZZ_SEED", "0"))
CASE_LIMIT_S = 2.0

_U32_EXTREMES = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
_U64_EXTREMES = [0, 1, 2, 31, 32, 33, 2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**62, 2**63 - 1, 2**63]
_U64_EXTREMES += [2**64 - 1]


def _write_base(path) -> bytes:
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(path, "llama")
    w.add_key_value("llama.block_count", 2, V.UINT32)
    w.add_key_value("llama.rope.freq_base", 10000.0, V.FLOAT32)
    w.add_key_value("x.i64", -5, V.INT64)
    w.add_key_value("x.f64", 2.5, V.FLOAT64)
    w.add_key_value("x.flag", True, V.BOOL)
    w.add_key_value("tokenizer.ggml.model", "gpt2", V.STRING)
    w.add_key_value("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "bc", "✓"], V.ARRAY)
    w.add_key_value("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0, -4.0], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("x.nested", [[1, 2], [3]], V.ARRAY)
    w.add_tensor("norm.weight", rng.standard_normal(64).astype(np.float32))
    w.add_tensor("emb.weight", rng.standard_normal((4, 32)).astype(np.float16))
    w.add_tensor("q8.weight", rng.integers(0, 256, (2, 2 * 34), dtype=np.uint8), raw_dtype=Q.Q8_0)
    w.add_tensor("q4k.weight", rng.integers(0, 256, (1, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)
    w.add_tensor("q6k.weight", rng.integers(0, 256, (2, 210), dtype=np.uint8), raw_dtype=Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _integer_fields(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of every u32/u64 field in the header of a valid file, and where the header ends."""
    fields = [(4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def take(width):
        nonlocal pos
        fields.append((pos, width))
        value = int.from_bytes(data[pos : pos + width], "little")
        pos += width
        return value

    def string():
        nonlocal pos
        n = take(8)
        pos += n

    def value(vtype):
        nonlocal pos
        if vtype == V.STRING:
            string()
        elif vtype == V.ARRAY:
            etype, count = take(4), take(8)
            for _ in range(count):
                value(etype)
        else:
            pos += {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2}.get(vtype, 0)
            if vtype in (V.UINT32, V.INT32, V.FLOAT32, V.UINT64, V.INT64, V.FLOAT64):
                take(8 if vtype in (V.UINT64, V.INT64, V.FLOAT64) else 4)

    for _ in range(n_kv):
        string()
        value(take(4))
    for _ in range(n_tensors):
        string()
        for _ in range(take(4)):
            take(8)
        take(4)
        take(8)
    return fields, pos


def _mutate(base: bytes, fields: list[tuple[int, int]], header_end: int, rng: np.random.Generator) -> bytes:
    data = bytearray(base)
    for _ in range(1 if rng.random() < 0.7 else int(rng.integers(2, 4))):
        # Most of the interest is in the header; the data region gets a share too.
        hi = header_end if rng.random() < 0.8 else len(data)
        hi = max(1, min(hi, len(data)))
        kind = rng.integers(5)
        if kind == 0:  # byte flips
            for _ in range(int(rng.integers(1, 9))):
                data[int(rng.integers(hi))] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # an integer field set to an extreme or random value
            pos, width = fields[int(rng.integers(len(fields)))]
            pool = _U32_EXTREMES if width == 4 else _U64_EXTREMES + [len(data) - 1, len(data), len(data) + 1]
            value = int(pool[rng.integers(len(pool))]) if rng.random() < 0.7 else int(rng.integers(0, 64))
            data[pos : pos + width] = value.to_bytes(width, "little")
        elif kind == 2:  # truncation
            del data[int(rng.integers(hi)) :]
        elif kind == 3:  # a chunk deleted
            start = int(rng.integers(hi))
            del data[start : start + int(rng.integers(1, 65))]
        else:  # a chunk duplicated in place
            start = int(rng.integers(hi))
            data[start:start] = data[start : start + int(rng.integers(1, 65))]
        if not data:
            break
    return bytes(data)


def _load(path) -> None:
    read_gguf = getattr(realm_jax, "read_gguf", None)
    if read_gguf is not None:
        read_gguf(path)
        return
    # Until realm_jax.read_gguf exists: the reader alone, touching every tensor's bytes.
    with open_gguf(path) as gf:
        for name in gf.tensors:
            int(gf.tensor_bytes(name).sum())


class _CaseHung(Exception):
    pass


def _on_alarm(signum, frame):
    raise _CaseHung


def test_mutated_files_load_or_raise_realm_error(tmp_path):
    base = _write_base(tmp_path / "base.gguf")
    fields, header_end = _integer_fields(base)
    assert header_end < len(base) and len(fields) > 40
    _load(tmp_path / "base.gguf")  # the valid file loads (and warms up any lazy imports)

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    outcomes: collections.Counter[str] = collections.Counter()
    try:
        for case in range(N_CASES):
            rng = np.random.default_rng((SEED, case))
            path = tmp_path / f"case{case}.gguf"
            path.write_bytes(_mutate(base, fields, header_end, rng))
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, 10 * CASE_LIMIT_S)
            try:
                _load(path)
                outcomes["loaded"] += 1
            except RealmError as e:
                outcomes[type(e).__name__] += 1
            except _CaseHung:
                pytest.fail(f"seed {SEED} case {case}: still running after {10 * CASE_LIMIT_S} s")
            except Exception as e:
                pytest.fail(f"seed {SEED} case {case}: {type(e).__name__}: {e}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - start
            assert elapsed < CASE_LIMIT_S, f"seed {SEED} case {case} took {elapsed:.2f} s"
            path.unlink()  # safe even while a map of it lives on
    finally:
        signal.signal(signal.SIGALRM, previous)
    # The mutations reach many distinct checks, and some mutated files are still valid.
    assert outcomes["loaded"] > 0, outcomes
    assert len(outcomes) >= 8, outcomes
