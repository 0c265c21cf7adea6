"""The Pallas Triton backend (GPU): four paths on the weight in its lane layout
(`pallas_kernels.decode_layout`, made once at load), under a 16-bit compute dtype:

- "gemv": the GEMV of `pallas_kernels.decode`, with the activations quantized to int16 per 32 values and
  integer dot products (`dp2a`; the int16 activations err less than a bf16 product): half an instruction
  a weight for each row of x (not for Q2_K, Q3_K, IQ4_NL, IQ4_XS and MXFP4);
- "dot": the block-dot GEMM of `pallas_kernels.lanesdot` (Q4_K, Q5_K, Q6_K), up to 16 rows of x: the codes
  fed to the tensor cores from registers, one dot per 16 codes of a sub-block, the scales applied to the
  dots' outputs: at 8 / 16 rows on the device's compiler Q4_K 2.8 / 3.7 instructions a weight, Q6_K
  6.3 / 6.9, where the GEMV takes 9.3 / 18.6 and 13.3 / 26.6, the GEMM 21.8 and 20.4;
- "mma": the tensor-core GEMM of `pallas_kernels.mma`, which dequantizes each weight once (to the compute
  dtype, as the reference rounds it) for all the rows of x a program holds (every row up to 64, tiles of
  128 past them) and multiplies them by `mma` / `wgmma`;
- "xla": the XLA reference, which dequantizes from the lanes (XLA fuses the layout's inverse into its
  dequantization): per call it writes and reads back a dense copy of the weight, ~4.5 bytes a weight
  against the kernels' 0.3-1.1, and then runs at the dense product's speed. f32 compute always goes here.

Which path serves m rows of x is measured per device kind (`realm_jax.linear.routes`, written by
`benchmarks/kernels.py --write-routes` on the device). Without a measurement: the GEMV up to `GEMV_ROWS`
rows (`DOT_FROM` - 1 where the format has the block-dot GEMM, which takes the rows from there to 16), the
GEMM up to 64 (where it wins by instruction counts: ~1 and ~10 a weight against the dense copy's
traffic), XLA past them, where the GEMM's prefill tiles are not yet timed against XLA's dequantize+dot
(308 TFLOP/s at 512 rows on an H200). JAX has deprecated the Pallas Triton lowering (Mosaic GPU is the
maintained one); every lowering warns so, and `pallas_kernels` filters that one warning.

Inside a scan over stacked layers the kernel reads layer i of the stack where it lies (`stacked` /
`unstack`), so no step copies a layer's planes out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from pallas_kernels.decode_layout import GEMV_FORMATS, LAYOUTS, ROW_ALIGN, from_lanes, quantize_x, to_lanes
from realm_jax.errors import RoutesError, ShardingError
from realm_jax.linear import routes
from realm_jax.linear.base import Backend, Prepared, local_shape, xla_matmul
from realm_jax.precision import Policy
from realm_jax.quant import Format, QTensor

__all__ = ["DECODE_ROWS", "DOT_FROM", "GEMV_ROWS", "TRITON", "LanesWeight", "Triton", "multiply"]

DECODE_ROWS = 64  # rows of x up to which the kernels serve without a measurement (pallas_kernels.mma)
# Rows of x up to which the GEMV runs, the tensor-core GEMM past them: the GEMV's instructions a weight
# grow with the rows (the rows padded to a power of two), the GEMM's do not. A heuristic from instruction
# counts on the device's compiler (`scripts/kernel_report.py --compiler xla`, XLA's own Triton, 4096x4096,
# H100), for the device kinds the routes table does not cover: at 5-8 rows the GEMV takes 6.6-13.3 a
# weight, the GEMM (padded to 16 rows) 12.6-25.8, 1.5-2.3x more in every format; at 16 rows they are even
# (GEMV 13.1-26.6, GEMM 12.6-25.8; e.g. Q4_K 18.6 / 21.8, Q6_K 26.6 / 20.4).
GEMV_ROWS = 8
# Rows of x from which the block-dot GEMM serves the formats it has (up to its MAX_ROWS): at one row the GEMV
# takes 1.4-1.5 instructions a weight against its 2.8 (its eight rows of x, the mma's N, padded), at two
# 2.4, at three and four (padded to four) 4.8 (Q4_K, 4096x4096, XLA's Triton; Q6_K 1.9 / 6.7 at one / four
# rows against 6.3).
DOT_FROM = 3
_KERNEL_COMPUTE = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["lanes", "layer"],
                   meta_fields=["fmt", "shape", "axes"])
@dataclasses.dataclass(frozen=True)
class LanesWeight(Prepared):
    """The Triton backend's weight: its lane planes (N padded to a multiple of 128 rows).

    Attributes:
      lanes: plane name -> [K / unit, P, N'] or [K / unit, N'] (`decode_layout`); with `layer`, stacks [L, ...].
      fmt, shape: the format and the logical (N, K).
      layer: None, or inside a scan over stacked layers the traced index of the layer (`Triton.unstack`).
      axes: the mesh axes its (rows, K) are split over once placed on a mesh, or None.
    """

    backend: ClassVar[str] = "triton"
    lanes: dict[str, jax.Array]
    fmt: str
    shape: tuple[int, int]
    layer: jax.Array | None = None
    axes: tuple[str | None, str | None] | None = None

    def layer_lanes(self) -> dict[str, jax.Array]:
        """The lanes of this weight's one layer: sliced out of the stack (a copy) where it is a layer of one,
        for a path that cannot read the layer in place."""
        return self.lanes if self.layer is None else jax.tree.map(lambda a: a[self.layer], self.lanes)

    def __repr__(self) -> str:
        stack = ", one layer of a stack" if self.layer is not None else ""
        return f"{type(self).__name__}({self.fmt}, shape={self.shape}{stack})"


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else interpret


def multiply(x: jax.Array, w: LanesWeight, path: str, *, compute_dtype, interpret: bool,
             out_dtype=jnp.float32) -> jax.Array:
    """x [M, K] @ dequant(w)^T by the kernel of `path` ("gemv", "dot" or "mma"): [M, N'] (N' the lanes'
    padded rows), summed in f32; in out_dtype where the GEMM writes it (K not split), else f32."""
    if path == "dot":
        from pallas_kernels import lanesdot

        return lanesdot.gemm(x, w.lanes, fmt=w.fmt, layer=w.layer, interpret=interpret)
    if path == "gemv":
        from pallas_kernels import decode

        part = decode.gemv(*quantize_x(x, w.fmt), w.lanes, fmt=w.fmt, layer=w.layer, interpret=interpret)
    else:
        from pallas_kernels import mma

        part = mma.gemm(x, w.lanes, fmt=w.fmt, layer=w.layer, compute_dtype=compute_dtype, out_dtype=out_dtype,
                        interpret=interpret)
    return (part[0] if part.shape[0] == 1 else jnp.sum(part, axis=0))[: x.shape[0]]


class Triton(Backend):
    name = "triton"
    platforms = ("gpu",)
    interprets = True
    formats = frozenset(LAYOUTS)  # the formats with lanes: the GEMV's (GEMV_FORMATS), the others GEMM only
    max_rows = DECODE_ROWS
    paths = ("gemv", "dot", "mma", "xla")
    weight_type: ClassVar[type[LanesWeight]] = LanesWeight

    def unsupported(self, fmt: Format, shape: tuple[int, ...]) -> str | None:
        if fmt.block_size == 1:
            return f"{self.name}: {fmt.name} is stored dense (XLA's dot multiplies it)"
        return super().unsupported(fmt, shape)

    def path(self, fmt: str, m: int, compute_dtype, device_kind: str | None = None) -> str:
        """The path for m rows of x of a `fmt` weight: measured on this device kind (`routes`), else the
        heuristic; "xla" under f32 compute."""
        if jnp.dtype(compute_dtype) not in _KERNEL_COMPUTE:
            return "xla"
        chosen = self.measured_path(fmt, m, device_kind)
        if chosen is not None:
            return chosen
        dot = self.serves("dot", fmt, m)
        if m <= (DOT_FROM - 1 if dot else GEMV_ROWS) and fmt in GEMV_FORMATS:
            return "gemv"
        if dot:
            return "dot"
        return "mma" if m <= DECODE_ROWS else "xla"

    def serves(self, path: str, fmt: str, m: int | None = None) -> bool:
        """Whether `path` multiplies a `fmt` weight (by m rows of x, where given)."""
        from pallas_kernels import decode, lanesdot

        rows = {"gemv": decode.MAX_ROWS, "dot": lanesdot.MAX_ROWS}.get(path)
        if rows is not None and m is not None and m > rows:
            return False
        return {"gemv": fmt in GEMV_FORMATS, "dot": fmt in lanesdot.FORMATS}.get(path, path in self.paths)

    def measured_path(self, fmt: str, m: int, device_kind: str | None = None) -> str | None:
        """The path the routes table gives m rows of x of a `fmt` weight on this device kind, checked
        against this backend's paths, or None where the table has no entry or its path does not take m rows
        (the GEMV and the block-dot GEMM take up to 16)."""
        kind = device_kind or jax.devices()[0].device_kind
        chosen = routes.measured(self.name, kind, fmt, m)
        if chosen is not None and chosen not in self.paths:
            raise RoutesError(f"{routes.ROUTES_FILE}: {kind!r}/{self.name}/{fmt}: path {chosen!r} is not one of "
                              f"{', '.join(self.paths)}")
        if chosen is not None and not self.serves(chosen, fmt):
            raise RoutesError(f"{routes.ROUTES_FILE}: {kind!r}/{self.name}/{fmt}: routes {m} rows of x to the "
                              f"{chosen} path, which {fmt} does not have")
        return chosen if chosen is None or self.serves(chosen, fmt, m) else None

    def kernel_rows(self, m: int, compute_dtype, fmt: str | None = None) -> bool:
        """Whether m rows of x of a `fmt` weight (Q4_K where unsaid) go to a kernel: its path."""
        return self.path(fmt or "Q4_K", m, compute_dtype) != "xla"

    def prepare(self, qt: QTensor, policy: Policy, *, many_rows: bool = True) -> LanesWeight:
        return self.weight_type(to_lanes(qt), qt.fmt, tuple(qt.shape))

    def view(self, qt: QTensor, compute_dtype) -> LanesWeight:
        return self.weight_type(to_lanes(qt), qt.fmt, tuple(qt.shape))

    def matmul(self, x, w: LanesWeight, *, compute_dtype, out_dtype, interpret: bool | None = None) -> jax.Array:
        if w.axes is not None:
            return self._per_shard(x, w, compute_dtype, out_dtype, _interpret(interpret))
        return self.matmul_path(x, w, self.path(w.fmt, x.shape[0], compute_dtype), compute_dtype=compute_dtype,
                                out_dtype=out_dtype, interpret=interpret)

    def matmul_path(self, x, w: LanesWeight, path: str, *, compute_dtype, out_dtype,
                    interpret: bool | None = None) -> jax.Array:
        """`matmul` by the given path (one device's weight): what `benchmarks/kernels.py` times to measure
        the routes."""
        if path == "xla":
            return xla_matmul(x, from_lanes(w.fmt, w.shape, w.layer_lanes()), compute_dtype, out_dtype)
        y = multiply(x, w, path, compute_dtype=compute_dtype, interpret=_interpret(interpret), out_dtype=out_dtype)
        return y[:, : w.shape[0]].astype(out_dtype)

    def concat(self, ws: list[LanesWeight]) -> LanesWeight | None:
        if len({(w.fmt, w.shape[1]) for w in ws}) != 1 or any(w.layer is not None or w.axes for w in ws):
            return None
        n = sum(w.shape[0] for w in ws)

        def join(*planes):  # the parts' real rows side by side, then one padding at the end
            a = jnp.concatenate([p[..., : w.shape[0]] for p, w in zip(planes, ws)], axis=-1)
            return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, -n % ROW_ALIGN)])

        lanes = {name: join(*(w.lanes[name] for w in ws)) for name in ws[0].lanes}
        return self.weight_type(lanes, ws[0].fmt, (n, ws[0].shape[1]))

    def stacked(self, w: LanesWeight) -> tuple[LanesWeight, Any]:
        return dataclasses.replace(w, lanes={}), w.lanes

    def unstack(self, sliced: LanesWeight, whole: Any, index: jax.Array) -> LanesWeight:
        return dataclasses.replace(sliced, lanes=whole, layer=index)

    def place(self, w: LanesWeight, spec: PartitionSpec, mesh, what: str) -> LanesWeight:
        """Rows split over spec[-2], each shard's rows padded to whole 128-row tiles of their own (the
        lanes' last axis becomes shards x padded rows), K over spec[-1] in whole units."""
        lead, rows, cols = tuple(spec)[:-2], spec[-2], spec[-1]
        n = w.shape[0]
        units = w.shape[1] // LAYOUTS[w.fmt].unit
        lanes = w.lanes
        if rows is not None:
            shards = mesh.shape[rows]
            if n % shards:
                raise ShardingError(f"{what}: {n} rows cannot be split over {rows}={shards}")
            local = n // shards
            pad = -local % ROW_ALIGN

            def per_shard(a):
                a = a[..., :n].reshape(*a.shape[:-1], shards, local)
                a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
                return a.reshape(*a.shape[:-2], shards * (local + pad))

            lanes = {k: per_shard(a) for k, a in lanes.items()}
        if cols is not None and units % mesh.shape[cols]:
            raise ShardingError(f"{what}: {units} units of {w.fmt} along K cannot be split over "
                                f"{cols}={mesh.shape[cols]}")

        def put(a):
            a_spec = PartitionSpec(*lead, cols, *([None] * (a.ndim - len(lead) - 2)), rows)
            return jax.device_put(a, NamedSharding(mesh, a_spec))

        axes = (rows, cols) if rows or cols else None
        return dataclasses.replace(w, lanes={k: put(a) for k, a in lanes.items()}, axes=axes)

    def _per_shard(self, x, w: LanesWeight, compute_dtype, out_dtype, interpret: bool) -> jax.Array:
        """The kernel per shard inside shard_map (XLA cannot partition a kernel): rows split, each device
        computes its slice of the outputs; K split, partial products summed with one psum."""
        rows_axis, cols_axis = w.axes
        n_local, k_local = local_shape(w.shape, w.axes, w)

        def local(x, lanes):
            part = type(w)(lanes, w.fmt, (n_local, k_local), w.layer)
            y = self.matmul(x, part, compute_dtype=compute_dtype, out_dtype=jnp.float32 if cols_axis else out_dtype,
                            interpret=interpret)
            return lax.psum(y, cols_axis).astype(out_dtype) if cols_axis else y

        def lane_spec(a):  # [L?, units, P?, rows]
            stacked = w.layer is not None
            has_p = a.ndim - stacked == 3
            return PartitionSpec(*([None] if stacked else []), cols_axis, *([None] if has_p else []), rows_axis)

        return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                             in_specs=(PartitionSpec(None, cols_axis), {k: lane_spec(a) for k, a in w.lanes.items()}),
                             out_specs=PartitionSpec(None, rows_axis), axis_names={a for a in w.axes if a},
                             check_vma=False)(x, w.lanes)

    def decode_attention(self, q, k_cache, v_cache, scores_dtype):
        """Attention for a decode step on the stacked cache read in place (`pallas_kernels.attention`),
        where the scores are f32, q and the cache share a 16-bit dtype, the step's query rows a kv head fit
        one program and a block of keys divides the cache's length, on one device (XLA cannot split the
        kernel over a mesh); else None (XLA's path)."""
        from pallas_kernels import attention

        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1:
            return None

        _, t, n, _ = q.shape
        kv, length = k_cache.shape[3], k_cache.shape[2]
        if (jnp.dtype(scores_dtype) != jnp.float32 or not q.dtype == k_cache.dtype == v_cache.dtype
                or q.dtype not in _KERNEL_COMPUTE or n % kv or t * (n // kv) > attention.MAX_ROWS
                or attention.tiling_for(q.shape[0], kv, length) is None):
            return None
        return functools.partial(attention.decode_attention, interpret=_interpret(None))

    def describe(self, w: LanesWeight | None = None) -> str:
        mode = " (interpret mode)" if jax.default_backend() == "cpu" else ""
        kind = jax.devices()[0].device_kind
        if self.name in routes.table().get(kind, {}).get("backends", {}):
            return (f"triton{mode}: GEMV, block-dot GEMM, tensor-core GEMM or xla as measured on {kind} "
                    "(realm_jax/linear/routes.json)")
        if w is not None and self.serves("dot", w.fmt):
            return (f"triton decode GEMV{mode} (1-{DOT_FROM - 1} rows, 16-bit compute), block-dot GEMM "
                    f"({DOT_FROM}-16), tensor-core GEMM (17-{DECODE_ROWS}), xla (more)")
        return (f"triton decode GEMV{mode} (1-{GEMV_ROWS} rows, 16-bit compute), tensor-core GEMM "
                f"({GEMV_ROWS + 1}-{DECODE_ROWS}), xla (more)")


TRITON = Triton()
