"""The `triton_blocks` backend (GPU): `pallas_kernels.blockdot`'s decode GEMM for Q4_0, Q4_1 and Q4_K, on the
weight's block planes (`blockdot.to_blocks`, made once at load), under a 16-bit compute dtype, for up to
`blockdot.MAX_ROWS` rows of x; more rows, f32 compute, and every other format go to the XLA reference
(from the block planes, or as `choose` routes a weight it does not support).

A candidate beside the `triton` backend's GEMV and tensor-core GEMM, chosen with `impl="triton_blocks"`:
one tensor-core dot per 32-element block with the codes fed to the wgmma from registers, 2.4-3.6
instructions a weight at 1-16 rows of x against the lanes GEMM's 6.1-6.7 (`scripts/kernel_report.py`).
Its block planes are a layout of their own (the codes of a row contiguous along K), so it is a backend and
not a path of `triton`, whose GEMV reads the lanes: which of the two serves these formats on a device is for
`benchmarks/kernels.py` to measure (no device has timed it yet; Q4_K_M files have Q6_K layers too, which
go to the reference here).

One device: its weights are not placed on a mesh (`resolve` refuses it for more than one device).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from realm_jax.errors import RoutesError, ShardingError
from realm_jax.linear import routes
from realm_jax.linear.base import Backend, Prepared, xla_matmul
from realm_jax.precision import Policy
from realm_jax.quant import QTensor

__all__ = ["BlocksWeight", "TRITON_BLOCKS", "TritonBlocks"]

_KERNEL_COMPUTE = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _blockdot():
    from pallas_kernels import blockdot

    return blockdot


@functools.partial(jax.tree_util.register_dataclass, data_fields=["planes", "layer"], meta_fields=["fmt", "shape"])
@dataclasses.dataclass(frozen=True)
class BlocksWeight(Prepared):
    """The `triton_blocks` backend's weight: its block planes (`blockdot.to_blocks`: rows padded to 128, K
    to whole steps of 256).

    Attributes:
      planes: "q" [N', K' / 4] uint16, "d" (and "m") [N', K' / 32] f16; with `layer`, stacks [L, ...].
      fmt, shape: the format and the logical (N, K).
      layer: None, or inside a scan over stacked layers the traced index of the layer (`unstack`).
    """

    backend: ClassVar[str] = "triton_blocks"
    planes: dict[str, jax.Array]
    fmt: str
    shape: tuple[int, int]
    layer: jax.Array | None = None

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
    formats = frozenset({"Q4_0", "Q4_1", "Q4_K"})  # blockdot.FORMATS (not imported here: the kernels load lazily)
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
        return self.matmul_path(x, w, self.path(w.fmt, x.shape[0], compute_dtype), compute_dtype=compute_dtype,
                                out_dtype=out_dtype, interpret=interpret)

    def matmul_path(self, x, w: BlocksWeight, path: str, *, compute_dtype, out_dtype,
                    interpret: bool | None = None) -> jax.Array:
        """`matmul` by the given path: what `benchmarks/kernels.py` times to measure the routes."""
        blockdot = _blockdot()
        if path == "xla" or x.shape[0] > blockdot.MAX_ROWS:
            return xla_matmul(x, blockdot.from_blocks(w.fmt, w.shape, w.layer_planes()), compute_dtype, out_dtype)
        interpret = jax.default_backend() == "cpu" if interpret is None else interpret
        y = blockdot.gemm(x.astype(compute_dtype), w.planes, fmt=w.fmt, layer=w.layer, interpret=interpret)
        return y[:, : w.shape[0]].astype(out_dtype)

    def concat(self, ws: list[BlocksWeight]) -> BlocksWeight | None:
        if len({(w.fmt, w.shape[1]) for w in ws}) != 1 or any(w.layer is not None for w in ws):
            return None
        n = sum(w.shape[0] for w in ws)
        align = _blockdot().ROW_ALIGN

        def join(*planes):  # the parts' real rows one after another, then one padding at the end
            a = jnp.concatenate([p[: w.shape[0]] for p, w in zip(planes, ws)])
            return jnp.pad(a, [(0, -n % align), (0, 0)])

        return BlocksWeight({name: join(*(w.planes[name] for w in ws)) for name in ws[0].planes}, ws[0].fmt,
                            (n, ws[0].shape[1]))

    def stacked(self, w: BlocksWeight) -> tuple[BlocksWeight, Any]:
        return dataclasses.replace(w, planes={}), w.planes

    def unstack(self, sliced: BlocksWeight, whole: Any, index: jax.Array) -> BlocksWeight:
        return dataclasses.replace(sliced, planes=whole, layer=index)

    def place(self, w: BlocksWeight, spec, mesh, what: str) -> BlocksWeight:
        raise ShardingError(f"{what}: the {self.name} backend runs on one device; its weights are not placed on a "
                            f"mesh (use impl='triton' or 'auto')")

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
