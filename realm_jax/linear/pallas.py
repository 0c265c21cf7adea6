"""What the Pallas backends on the weight as stored (`mosaic_tpu`) share: the weight they prepare (the
QTensor itself), the formats their kernels implement, and running a kernel per shard of a weight split over
a mesh. (The GPU backends, `triton` and `mosaic_gpu`, lay their weights out for their kernels, in one
layout: `realm_jax.linear.triton`.)

The kernels (`pallas_kernels`) keep the weight quantized in device memory and dequantize a tile at a time
with the format's tile function; on a CPU they run in interpret mode (for checks: slowly).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from realm_jax.linear.base import Backend, QTensorWeight, local_shape
from realm_jax.precision import Policy
from realm_jax.quant import Format, QTensor

__all__ = ["KERNEL_FORMATS", "PallasBackend", "PallasWeight"]

# The formats the Pallas kernels implement (each kernel calls the format's tile function). A format of the
# table that is not here is multiplied by the XLA reference on GPU and TPU (`realm_jax.linear.api`).
KERNEL_FORMATS = frozenset({"Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"})


@functools.partial(jax.tree_util.register_dataclass, data_fields=["qt"], meta_fields=["backend"])
@dataclasses.dataclass(frozen=True, repr=False)
class PallasWeight(QTensorWeight):
    """A Pallas backend's weight: the QTensor as stored (its `axes` set once placed on a mesh)."""

    backend: str


class PallasBackend(Backend):
    """A Pallas kernel family on QTensors as stored; subclasses set `name` and `platforms` and implement
    `kernel`."""

    interprets = True
    formats = KERNEL_FORMATS

    def unsupported(self, fmt: Format, shape: tuple[int, ...]) -> str | None:
        if fmt.block_size == 1:
            return f"{self.name}: {fmt.name} is stored dense (XLA's dot multiplies it)"
        return super().unsupported(fmt, shape)

    def prepare(self, qt: QTensor, policy: Policy, *, many_rows: bool = True) -> PallasWeight:
        return PallasWeight(qt, self.name)

    def view(self, qt: QTensor, compute_dtype) -> PallasWeight:
        return PallasWeight(qt, self.name)

    def describe(self, w=None) -> str:
        return f"{self.name} (interpret mode)" if jax.default_backend() == "cpu" else self.name

    def kernel(self, x: jax.Array, w: QTensor, *, compute_dtype, out_dtype, interpret: bool) -> jax.Array:
        """x [M, K] @ dequant(w)^T -> [M, N] with this backend's kernels."""
        raise NotImplementedError

    def matmul(self, x, w: PallasWeight, *, compute_dtype, out_dtype, interpret: bool | None = None) -> jax.Array:
        interpret = jax.default_backend() == "cpu" if interpret is None else interpret
        if w.qt.axes is not None:
            return self._per_shard(x, w.qt, compute_dtype, out_dtype, interpret)
        return self.kernel(x, w.qt, compute_dtype=compute_dtype, out_dtype=out_dtype, interpret=interpret)

    def _per_shard(self, x, w: QTensor, compute_dtype, out_dtype, interpret: bool) -> jax.Array:
        """The kernel per shard of a weight split over mesh axes (w.axes): XLA cannot partition a kernel, so
        each device multiplies its own blocks inside shard_map. Rows split (column-parallel): each device
        computes its slice of the outputs. Columns split (row-parallel): x arrives split the same way and the
        partial products are summed with one psum (Megatron's all-reduce). Needs the mesh in context
        (`jax.set_mesh`), as `realm_jax.load` arranges."""
        rows_axis, cols_axis = w.axes
        n_rows, n_cols = local_shape(w.shape, w.axes, f"w={w}")

        def local(x, planes):
            y = self.kernel(x, QTensor(w.fmt, (n_rows, n_cols), planes), compute_dtype=compute_dtype,
                            out_dtype=jnp.float32 if cols_axis else out_dtype, interpret=interpret)
            return lax.psum(y, cols_axis).astype(out_dtype) if cols_axis else y

        split = PartitionSpec(rows_axis, cols_axis)
        return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                             in_specs=(PartitionSpec(None, cols_axis), {k: split for k in w.planes}),
                             out_specs=PartitionSpec(None, rows_axis), axis_names={a for a in w.axes if a},
                             check_vma=False)(x, w.planes)
