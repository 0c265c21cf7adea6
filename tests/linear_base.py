"""The shared test base of the linear layer's backends (`realm_jax.linear`): every backend's test file
subclasses `LinearTests` (and, for the Pallas kernels, `LoweringTests`), so the same cases run on the
reference, the native CPU kernels and each Pallas backend in interpret mode.

Cases cover the formats the backend supports (from the format table and its declaration), rows of x around
each family's edges, compute dtypes, one block / a few / many along K, ragged N, the params and output
dtypes, x in f32 or the compute dtype, and both ways in (a weight prepared at load, a QTensor for one
call), chosen pairwise (every pair of values of any two factors appears in some case) rather than as a
full product. The reference is an f32 HIGHEST matmul of gguf-style dequantized weights; the tolerance is
the one table of `helpers.TOL` scaled by sqrt(K).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax import linear
from realm_jax.precision import Policy
from realm_jax.quant import FORMATS, QTensor, dequantize, get_format
from helpers import assert_matmul_close, matmul_tolerance, random_qtensor, rms

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


def pairwise(factors: dict[str, list]) -> list[dict]:
    """Rows of values, one per factor, in which every pair of values of any two factors appears at least
    once (a greedy in-parameter-order covering array: deterministic, about |A| x |B| rows for the two
    largest factors A and B)."""
    names = sorted(factors, key=lambda n: -len(factors[n]))
    rows = [dict(zip(names[:2], pair)) for pair in itertools.product(factors[names[0]], factors[names[1]])]
    for i, name in enumerate(names[2:], start=2):
        earlier = names[:i]
        missing = {(e, a, b) for e in earlier for a in factors[e] for b in factors[name]}
        for row in rows:  # horizontal: extend each row by the value covering most missing pairs
            best = max(factors[name], key=lambda b: sum((e, row[e], b) in missing for e in earlier))
            row[name] = best
            missing -= {(e, row[e], best) for e in earlier}
        while missing:  # vertical: new rows for what is left, other factors filled with their first value
            e, a, b = min(missing, key=lambda t: (names.index(t[0]), str(t[1]), str(t[2])))
            row = {n: factors[n][0] for n in earlier} | {e: a, name: b}
            for e2 in earlier:  # fill the free factors to cover more missing pairs
                if e2 != e:
                    row[e2] = max(factors[e2], key=lambda v: (e2, v, b) in missing)
            rows.append(row)
            missing -= {(e2, row[e2], b) for e2 in earlier}
    return rows


@dataclasses.dataclass(frozen=True)
class Case:
    fmt: str
    rows: int
    compute: jnp.dtype
    k_blocks: int
    params: jnp.dtype
    out: jnp.dtype
    x_dtype: jnp.dtype
    path: str  # "prepared" (at load) or "view" (a QTensor for one call)

    @property
    def id(self) -> str:
        return (f"{self.fmt}-m{self.rows}-{self.compute.name}-kb{self.k_blocks}-p{self.params.name}-"
                f"o{self.out.name}-x{self.x_dtype.name}-{self.path}")

    def k(self) -> int:
        """K: whole blocks of the format, at least 32 elements (the native kernel's step)."""
        block = get_format(self.fmt).block_size
        return max(block, 32) * self.k_blocks


def _supported(backend: str, fmt: str, k: int, n: int) -> bool:
    return linear.BACKENDS[backend].unsupported(get_format(fmt), (n, k)) is None


class LinearTests:
    """The cases every backend passes; a subclass sets BACKEND and ROWS (its families' edges)."""

    BACKEND: str
    ROWS: tuple[int, ...]
    DTYPES = (F32, BF16, F16)
    K_BLOCKS = (1, 2, 16)  # one block, a few, many (4096 for the k-quants)
    N = 200  # not a multiple of any tile
    PATHS = ("prepared", "view")
    DEVICE_ROWS = (1, 16, 17, 256)  # the device cases' rows of x

    def formats(self) -> list[str]:
        return [f for f in FORMATS if _supported(self.BACKEND, f, 256, self.N)]

    def cases(self) -> list[Case]:
        factors = {"fmt": self.formats(), "rows": list(self.ROWS), "compute": list(self.DTYPES),
                   "k_blocks": list(self.K_BLOCKS), "params": ["same", F32], "out": [F32, "compute"],
                   "x_dtype": [F32, "compute"], "path": list(self.PATHS)}
        cases = []
        for r in pairwise(factors):
            pick = lambda v: r["compute"] if v in ("same", "compute") else v  # noqa: E731
            cases.append(Case(r["fmt"], r["rows"], r["compute"], r["k_blocks"], pick(r["params"]), pick(r["out"]),
                              pick(r["x_dtype"]), r["path"]))
        return cases

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            cases = self.cases()
            metafunc.parametrize("case", cases, ids=[c.id for c in cases])
        if "device_case" in metafunc.fixturenames:  # few: a GPU compiles each kernel in 1-40 s; none on a CPU
            cases = [Case(r["fmt"], r["rows"], r["compute"], 16, r["compute"], F32, F32, "prepared")
                     for r in pairwise({"fmt": self.formats(), "rows": list(self.DEVICE_ROWS), "compute": [BF16, F32]})
                     if jax.default_backend() != "cpu"]
            metafunc.parametrize("device_case", cases, ids=[c.id for c in cases])

    @pytest.fixture(autouse=True)
    def _runs_here(self):
        backend = linear.BACKENDS[self.BACKEND]
        if not backend.runs_on(jax.default_backend()):
            pytest.skip(f"{self.BACKEND} runs on {', '.join(backend.platforms)}, not on {jax.default_backend()}")

    # --- helpers --------------------------------------------------------------------------------------
    def prepare(self, qt, params=F32, compute=F32):
        """qt prepared by this backend (`linear.prepare` under the backend's impl, asserted to keep it)."""
        assert linear.choose(qt.fmt, qt.shape, self.BACKEND).backend == self.BACKEND
        return linear.prepare(qt, Policy(params=params, compute=compute), impl=self.BACKEND)

    def multiply(self, x, w, case: Case):
        if case.path == "view":
            f = functools.partial(linear.qmatmul, impl=self.BACKEND)
        else:
            f = linear.matmul
            w = self.prepare(w, case.params, case.compute)
        return jax.jit(functools.partial(f, compute_dtype=case.compute, out_dtype=case.out))(x, w)

    # --- the cases ------------------------------------------------------------------------------------
    def test_matches_reference(self, case: Case, rng):
        k = case.k()
        w = random_qtensor(case.fmt, self.N, k, rng)
        x = jnp.asarray(rng.standard_normal((case.rows, k)), case.x_dtype)
        y = self.multiply(x, w, case)
        assert_matmul_close(y, x, dequantize(w), compute_dtype=case.compute, out_dtype=case.out)

    def test_compiled_on_device(self, device_case: Case, rng):
        """The kernels compiled (not interpreted) on the backend's own platform: the device script runs
        these (`scripts/device_checks.sh`); on a CPU they skip."""
        platform = jax.default_backend()
        if platform == "cpu" or platform not in linear.BACKENDS[self.BACKEND].platforms:
            pytest.skip(f"for a GPU or TPU the backend runs on (here {platform}: the cases above run compiled or "
                        f"interpreted)")
        self.test_matches_reference(device_case, rng)

    def test_one_block_and_leading_dims(self, rng):
        fmt = self.formats()[-1]
        k = max(get_format(fmt).block_size, 32)
        w = random_qtensor(fmt, 3, k, rng)
        x = jnp.asarray(rng.standard_normal((2, 5, k)), jnp.float32)
        y = jax.jit(linear.matmul)(x, self.prepare(w))
        assert y.shape == (2, 5, 3)
        assert_matmul_close(y.reshape(10, 3), x.reshape(10, k), dequantize(w), compute_dtype=F32, out_dtype=F32)

    @pytest.mark.parametrize("activation", list(linear.ACTIVATIONS))
    def test_glu(self, activation, rng):
        """The gated FFN's gate|up product with its activation, on both sides of the row families."""
        fmt, k, f = self.formats()[0], 256, 128
        w = random_qtensor(fmt, 2 * f, k, rng)
        prepared = self.prepare(w, BF16, BF16)
        wd = np.asarray(dequantize(w), np.float64)
        for rows in (1, max(self.ROWS)):
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16)
            y = jax.jit(functools.partial(linear.glu, activation=activation))(x, prepared)
            assert y.shape == (rows, f)
            gu = np.asarray(x, np.float64) @ wd.T
            gate, up = np.split(gu, 2, axis=-1)
            want = np.asarray(linear.gated(jnp.asarray(gate), jnp.asarray(up), activation), np.float64)
            # The bf16 matmul's error in gate and up (act's slope is below 1.2), then y's rounding to bf16.
            acc = matmul_tolerance(BF16, k, rms(x), rms(wd))
            tol = acc * (1.2 * np.abs(up) + np.abs(gate) + acc) + np.abs(want) * 2.0**-7
            err = np.abs(np.asarray(y, np.float64) - want)
            assert np.all(err <= tol), f"max excess {np.max(err - tol):.3g}"

    def test_fused_rows(self, rng):
        """Weights fused along their rows (q|k|v) multiply as the parts do; row counts off the tiles."""
        fmt, k = self.formats()[0], 256
        parts = [random_qtensor(fmt, n, k, rng) for n in (100, 30, 70)]
        fused = linear.concat([self.prepare(p, BF16, BF16) for p in parts])
        assert fused is not None and fused.shape == (200, k) and fused.backend == self.BACKEND
        for rows in (1, max(self.ROWS)):
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
            y = jax.jit(functools.partial(linear.matmul, compute_dtype=BF16, out_dtype=F32))(x, fused)
            want = jnp.concatenate([dequantize(p) for p in parts])
            assert_matmul_close(y, x, want, compute_dtype=BF16, out_dtype=F32)

    def test_layers_of_a_stack_in_a_scan(self, rng):
        """Weights of stacked layers inside `lax.scan` (what the model does): each step multiplies by its
        own layer, whatever the backend reads in place from the whole stack."""
        fmt, k = self.formats()[0], 256
        qts = [random_qtensor(fmt, 64, k, rng) for _ in range(3)]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *[self.prepare(q) for q in qts])

        @jax.jit
        def run(stacked, x):
            scanned, rejoin = linear.split_stacked(stacked)

            def body(_, xs):
                w, i = xs
                return None, linear.matmul(x, rejoin(w, i), compute_dtype=BF16, out_dtype=F32)

            return jax.lax.scan(body, None, (scanned, jnp.arange(3, dtype=jnp.int32)))[1]

        for rows in (1, max(self.ROWS)):
            x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
            for y, q in zip(run(stacked, x), qts):
                assert_matmul_close(y, x, dequantize(q), compute_dtype=BF16, out_dtype=F32)


def tiling_grid():
    """(format, block size, M, N, K) over the Pallas kernels' formats and the shapes their tiling heuristic
    must handle: rows on both sides of the decode edge, ragged and real N, K that 256 divides or not."""
    from realm_jax.linear.pallas import KERNEL_FORMATS

    for fmt, m, n, k in itertools.product(sorted(KERNEL_FORMATS), (1, 7, 16, 17, 512, 2048), (200, 4096, 14336),
                                          (256, 576, 640, 4096, 14336)):
        yield fmt, get_format(fmt).block_size, m, n, k


class LoweringTests:
    """The kernels lower for their platform at the shapes of an 8B llama, pairwise over formats, rows of
    x around the decode/prefill edge and shapes; a subclass sets BACKEND and implements `lower`."""

    BACKEND: str
    ROWS = (1, 16, 17, 512)
    # (N, K): q (4096, 4096), kv (1024, 4096), up/gate (14336, 4096), down (4096, 14336)
    SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))

    def cases(self):
        formats = [f for f in FORMATS if _supported(self.BACKEND, f, 4096, 4096)]
        return [(r["fmt"], r["rows"], r["shape"])
                for r in pairwise({"fmt": formats, "rows": list(self.ROWS), "shape": list(self.SHAPES)})]

    def pytest_generate_tests(self, metafunc):
        if "lowering" in metafunc.fixturenames:
            cases = self.cases()
            metafunc.parametrize("lowering", cases, ids=[f"{f}-m{m}-{n}x{k}" for f, m, (n, k) in cases])

    def lower(self, fn, x, w) -> str:
        """The lowered module's text of fn(x, w) for the backend's platform."""
        raise NotImplementedError

    CUSTOM_CALLS: tuple[str, ...]

    def test_lowers(self, lowering):
        """The backend's whole path (its wrapper and kernels, not interpreted) on a weight as it prepares it."""
        fmt, m, (n, k) = lowering
        f = get_format(fmt)
        planes = {p.name: jax.ShapeDtypeStruct((n, k // f.block_size * p.count), p.dtype) for p in f.planes}
        backend = linear.BACKENDS[self.BACKEND]
        w = jax.eval_shape(lambda qt: backend.prepare(qt, Policy(params=BF16, compute=BF16)),
                           QTensor(fmt, (n, k), planes))

        def fn(x, w):
            return backend.matmul(x, w, compute_dtype=BF16, out_dtype=BF16, interpret=False)

        text = self.lower(fn, jax.ShapeDtypeStruct((m, k), BF16), w)
        calls = set(re.findall(r"custom_call @([\w$.]+)", text))
        assert calls <= set(self.CUSTOM_CALLS), calls
        assert bool(calls) == backend.kernel_rows(m, BF16, fmt), f"{m} rows: kernels {calls or 'none'}"
