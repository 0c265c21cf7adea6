"""The `triton_blocks` backend (GPU): `pallas_kernels.blockdot`'s decode GEMM for Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K,
Q6_K, Q8_0 and Q8_K, on the weight's block planes (`blockdot.to_blocks`, made once at load), under a 16-bit compute
dtype, for up to `blockdot.MAX_ROWS` rows of x; more rows, f32 compute, and every other format go to the XLA
reference (from the block planes, or as `choose` routes a weight it does not support).

A candidate beside the `triton` backend's GEMV and tensor-core GEMM, chosen with `impl="triton_blocks"`:
one tensor-core dot per 32-element block (Q6_K: 16) with the codes fed to an `mma.sync` from registers,
1.1-2.7 instructions a weight at 1-16 rows of x (the five- and six-bit formats 2.8-4.4: `BENCHMARKS.md`)
against the lanes GEMM's 6.1-7.6 (`scripts/kernel_report.py`).
Its block planes are a layout of their own (the codes of a row contiguous along K), so it is a backend and
not a path of `triton`, whose GEMV reads the lanes: which of the two serves these formats on a device is for
`benchmarks/kernels.py` to measure (no device has timed it yet). Every format of the k-quant and legacy
files' matrices (Q4_K_M's and Q5_K_M's Q6_K layers included) runs on it; the others go to the reference.

On a mesh each device runs the kernel on its shard inside shard_map (rows split: its outputs; K split in
whole blocks, each shard's range padded to whole steps of 256: partial products and one psum), as the
`triton` backend does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from realm_jax.errors import RoutesError, ShardingError
from realm_jax.linear import routes
from realm_jax.linear.base import Backend, Prepared, local_shape, xla_matmul
from realm_jax.precision import Policy
from realm_jax.quant import QTensor, get_format

__all__ = ["BlocksWeight", "TRITON_BLOCKS", "TritonBlocks"]

_KERNEL_COMPUTE = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _blockdot():
    from pallas_kernels import blockdot

    return blockdot


@functools.partial(jax.tree_util.register_dataclass, data_fields=["planes", "layer"],
                   meta_fields=["fmt", "shape", "axes"])
@dataclasses.dataclass(frozen=True)
class BlocksWeight(Prepared):
    """The `triton_blocks` backend's weight: its block planes (`blockdot.to_blocks`: rows padded to 128, K
    to whole steps of 256).

    Attributes:
      planes: `blockdot.to_blocks`'s ("q" [N', K' / 4] uint16 and the scale planes); with `layer`, stacks
        [L, ...]; once placed on a mesh, each shard's rows padded to whole 128-row tiles of their own and the
        columns laid out per K range (`blockdot.split_columns`).
      fmt, shape: the format and the logical (N, K).
      layer: None, or inside a scan over stacked layers the traced index of the layer (`unstack`).
      axes: the mesh axes its (rows, K) are split over once placed on a mesh, or None.
    """

    backend: ClassVar[str] = "triton_blocks"
    planes: dict[str, jax.Array]
    fmt: str
    shape: tuple[int, int]
    layer: jax.Array | None = None
    axes: tuple[str | None, str | None] | None = None

    def layer_planes(self) -> dict[str, jax.Array]:
        """The planes of this weight's one layer: sliced out of the stack (a copy) where it is a layer of one,
        for the XLA path, which cannot read the layer in place."""
        return self.planes if self.layer is None else jax.tree.map(lambda a: a[self.layer], self.planes)

    def __repr__(self) -> str:
        stack = ", one layer of a stack" if self.layer is not None else ""
        return f"{type(self).__name__}({self.fmt}, shape={self.shape}{stack})"


class TritonBlocks(Backend):
    name = "triton_blocks"
    platforms = ("gpu",)
    interprets = True
    # blockdot.FORMATS (not imported here: the kernels load lazily)
    formats = frozenset({"Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_K"})
    max_rows = 16  # blockdot.MAX_ROWS
    paths = ("blockdot", "xla")

    def path(self, fmt: str, m: int, compute_dtype, device_kind: str | None = None) -> str:
        """"blockdot" for up to max_rows rows of x under a 16-bit compute dtype, else "xla"; a measured route
        (`routes`) wins where the table has one."""
        if jnp.dtype(compute_dtype) not in _KERNEL_COMPUTE or m > self.max_rows:
            return "xla"
        kind = device_kind or jax.devices()[0].device_kind
        chosen = routes.measured(self.name, kind, fmt, m)
        if chosen is not None and chosen not in self.paths:
            raise RoutesError(f"{routes.ROUTES_FILE}: {kind!r}/{self.name}/{fmt}: path {chosen!r} is not one of "
                              f"{', '.join(self.paths)}")
        return chosen or "blockdot"

    def kernel_rows(self, m: int, compute_dtype, fmt: str | None = None) -> bool:
        return self.path(fmt or "Q4_0", m, compute_dtype) != "xla"

    def prepare(self, qt: QTensor, policy: Policy, *, many_rows: bool = True) -> BlocksWeight:
        return BlocksWeight(_blockdot().to_blocks(qt), qt.fmt, tuple(qt.shape))

    def view(self, qt: QTensor, compute_dtype) -> BlocksWeight:
        return BlocksWeight(_blockdot().to_blocks(qt), qt.fmt, tuple(qt.shape))

    def matmul(self, x, w: BlocksWeight, *, compute_dtype, out_dtype, interpret: bool | None = None) -> jax.Array:
        if w.axes is not None:
            return self._per_shard(x, w, compute_dtype, out_dtype, interpret)
        return self.matmul_path(x, w, self.path(w.fmt, x.shape[0], compute_dtype), compute_dtype=compute_dtype,
                                out_dtype=out_dtype, interpret=interpret)

    def matmul_path(self, x, w: BlocksWeight, path: str, *, compute_dtype, out_dtype,
                    interpret: bool | None = None) -> jax.Array:
        """`matmul` by the given path: what `benchmarks/kernels.py` times to measure the routes."""
        blockdot = _blockdot()
        if path == "xla" or x.shape[0] > blockdot.MAX_ROWS:
            return xla_matmul(x, blockdot.from_blocks(w.fmt, w.shape, w.layer_planes()), compute_dtype, out_dtype)
        if x.shape[0] == 0:
            return jnp.zeros((0, w.shape[0]), out_dtype)
        interpret = jax.default_backend() == "cpu" if interpret is None else interpret
        # The kernel rounds x to f16 after a power-of-two scale a row: under f16 compute that is the cast,
        # without its overflow; under bf16 x is rounded to bf16 first, as the compute dtype asks.
        x = x if jnp.dtype(compute_dtype) == jnp.float16 else x.astype(compute_dtype)
        y = blockdot.gemm(x, w.planes, fmt=w.fmt, layer=w.layer, interpret=interpret)
        return y[:, : w.shape[0]].astype(out_dtype)

    def concat(self, ws: list[BlocksWeight]) -> BlocksWeight | None:
        if len({(w.fmt, w.shape[1]) for w in ws}) != 1 or any(w.layer is not None or w.axes for w in ws):
            return None
        n = sum(w.shape[0] for w in ws)
        align = _blockdot().ROW_ALIGN

        def join(*planes):  # the parts' real rows one after another, then one padding at the end
            a = jnp.concatenate([p[..., : w.shape[0], :] for p, w in zip(planes, ws)], axis=-2)
            return jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, -n % align), (0, 0)])

        return BlocksWeight({name: join(*(w.planes[name] for w in ws)) for name in ws[0].planes}, ws[0].fmt,
                            (n, ws[0].shape[1]))

    def stacked(self, w: BlocksWeight) -> tuple[BlocksWeight, Any]:
        return dataclasses.replace(w, planes={}), w.planes

    def unstack(self, sliced: BlocksWeight, whole: Any, index: jax.Array) -> BlocksWeight:
        return dataclasses.replace(sliced, planes=whole, layer=index)

    def place(self, w: BlocksWeight, spec: PartitionSpec, mesh, what: str) -> BlocksWeight:
        """Rows split over spec[-2], each shard's rows padded to whole 128-row tiles of their own; K over
        spec[-1] in whole blocks, each shard's range padded to whole steps of 256 (`blockdot.split_columns`)."""
        blockdot = _blockdot()
        lead, rows, cols = tuple(spec)[:-2], spec[-2], spec[-1]
        (n, k), planes = w.shape, w.planes
        if rows is not None:
            shards = mesh.shape[rows]
            if n % shards:
                raise ShardingError(f"{what}: {n} rows cannot be split over {rows}={shards}")
            local = n // shards
            pad = -local % blockdot.ROW_ALIGN

            def per_shard(a):  # [..., N', W] -> [..., shards * (local + pad), W]
                a = a[..., :n, :].reshape(*a.shape[:-2], shards, local, a.shape[-1])
                a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, 0)])
                return a.reshape(*a.shape[:-3], shards * (local + pad), a.shape[-1])

            planes = {name: per_shard(a) for name, a in planes.items()}
        if cols is not None:
            shards, unit = mesh.shape[cols], get_format(w.fmt).block_size
            if k % (shards * unit):
                raise ShardingError(f"{what}: K={k} of {w.fmt} cannot be split over {cols}={shards} in whole "
                                    f"blocks of {unit}")
            planes = blockdot.split_columns(w.fmt, (planes["q"].shape[-2], k), planes, shards)

        def put(a):
            return jax.device_put(a, NamedSharding(mesh, PartitionSpec(*lead, rows, cols)))

        axes = (rows, cols) if rows or cols else None
        return dataclasses.replace(w, planes={name: put(a) for name, a in planes.items()}, axes=axes)

    def _per_shard(self, x, w: BlocksWeight, compute_dtype, out_dtype, interpret) -> jax.Array:
        """The kernel per shard inside shard_map (XLA cannot partition a kernel): rows split, each device
        computes its slice of the outputs; K split, partial products summed with one psum."""
        rows_axis, cols_axis = w.axes
        n_local, k_local = local_shape(w.shape, w.axes, w)

        def local(x, planes):
            part = BlocksWeight(planes, w.fmt, (n_local, k_local), w.layer)
            y = self.matmul(x, part, compute_dtype=compute_dtype, out_dtype=jnp.float32 if cols_axis else out_dtype,
                            interpret=interpret)
            return lax.psum(y, cols_axis).astype(out_dtype) if cols_axis else y

        lead = [None] if w.layer is not None else []
        spec = PartitionSpec(*lead, rows_axis, cols_axis)
        return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                             in_specs=(PartitionSpec(None, cols_axis), {name: spec for name in w.planes}),
                             out_specs=PartitionSpec(None, rows_axis), axis_names={a for a in w.axes if a},
                             check_vma=False)(x, w.planes)

    def decode_attention(self, q, k_cache, v_cache, scores_dtype):
        """The `triton` backend's decode attention (`pallas_kernels.attention`, the stacked cache read in
        place), where it takes the operands; else None (XLA's)."""
        from realm_jax.linear.triton import TRITON

        return TRITON.decode_attention(q, k_cache, v_cache, scores_dtype)

    def describe(self, w: BlocksWeight | None = None) -> str:
        mode = " (interpret mode)" if jax.default_backend() == "cpu" else ""
        return (f"triton_blocks{mode}: block-dot GEMM on the block planes (1-{self.max_rows} rows, 16-bit "
                f"compute), xla (more)")


TRITON_BLOCKS = TritonBlocks()
