"""The linear layer's contract (`Backend`, `Prepared`) and its reference backend (`Xla`).

y = x @ dequant(w)^T for x [M, K] and a weight w of logical shape (N, K) in any format of the table
(`realm_jax.quant.FORMATS`), accumulated in f32. A backend says what it supports (the formats of the
table its module declares, the platforms it runs on, the rows of x it serves), turns a QTensor into its
own device layout once, at load (`prepare`: a pytree, a subclass of `Prepared`), and multiplies x by
that prepared weight. The XLA backend is the reference: it dequantizes with the format's tile function
and calls XLA's dot; every other backend is tested against it, and a weight no other backend supports is
routed to it (`realm_jax.linear.api`).

Legend: M rows of x (its leading dims flattened), N outputs, K the contraction.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realm_jax.errors import ShardingError
from realm_jax.precision import Policy
from realm_jax.quant import Format, QTensor, concat_rows, dequantize_tile, to_dense

__all__ = ["ACTIVATIONS", "Backend", "Prepared", "QTensorWeight", "XLA", "Xla", "XlaWeight", "gated",
           "load_interpreter", "local_shape", "place_qtensor", "xla_matmul"]

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def gated(gate: jax.Array, up: jax.Array, activation: str) -> jax.Array:
    """act(gate) * up, `activation` "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"glu: activation={activation!r} must be one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[activation](gate) * up


class Prepared:
    """Base of every backend's prepared weight: a registered pytree dataclass of device arrays. `backend`
    (a class attribute, or a static field where one class serves several backends) names the backend
    that prepared it and multiplies by it; `fmt` and `shape` are the weight's format and logical (N, K)."""

    backend: ClassVar[str]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@functools.cache
def load_interpreter() -> None:
    """Import, before any jitted call runs a kernel in Pallas's interpret mode, the modules Pallas imports at
    its first interpreted lowering (`pallas_call`'s lowering rule: the Mosaic TPU and GPU interpreters). One
    of them registers a config that is part of JAX's tracing context (`pallas_fuser_disable_nested_fuse`),
    so a function traced before that import misses the trace cache at its next call and is traced, lowered
    and compiled again (in a fresh process: a model's first prefill, or a decode step, compiled twice).
    Called by `api.prepare` for a backend that will run interpreted."""
    for module in ("jax._src.pallas.mosaic.interpret.interpret_pallas_call",
                   "jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call"):
        try:
            importlib.import_module(module)
        except ImportError:  # as Pallas's lowering rule, which goes on without them
            pass


class Backend:
    """One way to multiply by a weight. Subclasses set the class attributes and implement `prepare`,
    `view` and `matmul`; the rest has defaults that suit a backend whose weight is one QTensor.

    Attributes:
      name: the registry key, also a value of `impl=` on `load` and the CLI.
      platforms: the JAX platforms it runs compiled on.
      interprets: whether it also runs on "cpu" in an interpreter (Pallas kernels: for checks, slowly).
      formats: the table's formats its kernels implement (its declaration), or None for every format.
      max_rows: the most rows of x it multiplies itself (None: any); past it the prepared weight carries a
        second layout for more rows (`prepare(..., many_rows=True)`).
      paths: where a backend has several ways to multiply (kernels for different rows of x, or the XLA
        reference on its layout), their names: `realm_jax.linear.routes` picks one per device kind,
        format and rows of x from measurements, the backend's heuristic elsewhere.
    """

    name: ClassVar[str]
    platforms: ClassVar[tuple[str, ...]]
    interprets: ClassVar[bool] = False
    formats: ClassVar[frozenset[str] | None] = None
    max_rows: ClassVar[int | None] = None
    paths: ClassVar[tuple[str, ...]] = ()

    def runs_on(self, platform: str) -> bool:
        return platform in self.platforms or (self.interprets and platform == "cpu")

    def serves(self, path: str, fmt: str, m: int | None = None) -> bool:
        """Whether `path` (one of `paths`) multiplies a `fmt` weight (by m rows of x, where given)."""
        return path in self.paths and (path == "xla" or m is None or self.max_rows is None or m <= self.max_rows)

    def unsupported(self, fmt: Format, shape: tuple[int, ...]) -> str | None:
        """Why this backend cannot multiply by a weight of this format and logical shape, or None."""
        if len(shape) != 2:
            return f"{self.name}: weights must be 2-D (N, K), got shape {shape}"
        if self.formats is not None and fmt.name not in self.formats:
            return f"{self.name}: no kernel for {fmt.name} (it has {', '.join(sorted(self.formats))})"
        return None

    def kernel_rows(self, m: int, compute_dtype, fmt: str | None = None) -> bool:
        """Whether m rows of x under `compute_dtype` (of a `fmt` weight, where that matters) run this
        backend's own kernels (else the XLA reference on its weight: e.g. a decode kernel past its rows)."""
        return True

    def prepare(self, qt: QTensor, policy: Policy, *, many_rows: bool = True) -> Prepared:
        """qt in this backend's device layout, made once at load. `many_rows`: the weight must also serve
        more than `max_rows` rows at speed (False for the output projection, which a prefill multiplies
        by its last positions only)."""
        raise NotImplementedError

    def view(self, qt: QTensor, compute_dtype) -> Prepared:
        """qt as this backend multiplies it for one call, without a load-time layout (`qmatmul` on a
        QTensor)."""
        raise NotImplementedError

    def matmul(self, x: jax.Array, w: Prepared, *, compute_dtype, out_dtype) -> jax.Array:
        """x [M, K] @ dequant(w)^T -> [M, N] in out_dtype (inputs validated by `realm_jax.linear.api`)."""
        raise NotImplementedError

    def glu(self, x: jax.Array, w: Prepared, activation: str, *, compute_dtype) -> jax.Array:
        """A gated FFN's act(x @ gate^T) * (x @ up^T) from w = gate|up [2F, K]: [M, F], f32 unless the
        backend's epilogue hands back its compute dtype."""
        gate, up = jnp.split(self.matmul(x, w, compute_dtype=compute_dtype, out_dtype=jnp.float32), 2, axis=-1)
        return gated(gate, up, activation)

    def concat(self, ws: list[Prepared]) -> Prepared | None:
        """Weights stacked along their rows (fused q|k|v, gate|up), or None where they cannot be fused."""
        if len({w.fmt for w in ws}) != 1:
            return None
        return dataclasses.replace(ws[0], qt=concat_rows([w.qt for w in ws]))

    def stacked(self, w: Prepared) -> tuple[Prepared, Any]:
        """A weight of stacked layers (leading axis L on every leaf) split for `lax.scan`: the part the scan
        slices per layer, and the part the kernels read in place from the whole stack (None: none)."""
        return w, None

    def unstack(self, sliced: Prepared, whole: Any, index: jax.Array) -> Prepared:
        """One layer's weight inside the scan, from `stacked`'s two parts and the layer's index."""
        return sliced

    def place(self, w: Prepared, spec: PartitionSpec, mesh: Mesh, what: str) -> Prepared:
        """w on `mesh`, split by `spec` over its logical axes ([layers,] rows, cols; the sharding rules')."""
        if not isinstance(w, QTensorWeight):
            raise ShardingError(f"{what}: the {self.name} backend's {w} cannot be placed on a mesh")
        return dataclasses.replace(w, qt=place_qtensor(w.qt, spec, mesh, what))

    def describe(self, w: Prepared | None = None) -> str:
        """How this backend serves a weight (its row families), for `realm-jax inspect` and the load log."""
        return self.name


def local_shape(shape: tuple[int, int], axes: tuple[str | None, str | None], what) -> tuple[int, int]:
    """The (rows, cols) of one shard of a weight of logical `shape` split over the mesh `axes` (rows, cols)
    of the mesh in context, for a kernel run per shard inside shard_map (XLA cannot partition a kernel)."""
    mesh = jax.sharding.get_abstract_mesh()
    missing = [a for a in axes if a is not None and a not in mesh.axis_names]
    if missing:
        raise ShardingError(f"qmatmul: {what} is split over mesh axes {missing}, which the mesh in context "
                            f"({dict(mesh.shape) or 'none'}) lacks: call it under jax.set_mesh(mesh)")
    return tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(shape, axes))


def place_qtensor(qt: QTensor, spec: PartitionSpec, mesh: Mesh, what: str) -> QTensor:
    """Each plane of qt on `mesh` with `spec` over its logical axes; the planes share the logical rows and
    their last axis counts blocks, so splitting it splits whole blocks (or is an error). The QTensor
    records the mesh axes its (rows, cols) are split over (`QTensor.axes`) for kernels run per shard."""
    fmt = qt.format
    blocks = qt.shape[-1] // fmt.block_size
    split = spec[-1] if len(spec) else None
    if split is not None and blocks % int(mesh.shape[split]):
        raise ShardingError(f"{what}: {blocks} blocks of {fmt.name} per row cannot be split over {split}="
                            f"{mesh.shape[split]} in whole blocks")
    axes = (spec[-2], spec[-1]) if len(spec) >= 2 and (spec[-2] or spec[-1]) else None
    return QTensor(qt.fmt, qt.shape, {k: jax.device_put(p, NamedSharding(mesh, spec)) for k, p in qt.planes.items()},
                   axes)


@dataclasses.dataclass(frozen=True)
class QTensorWeight(Prepared):
    """A prepared weight that is one QTensor (dense or quantized)."""

    qt: QTensor

    @property
    def fmt(self) -> str:
        return self.qt.fmt

    @property
    def shape(self) -> tuple[int, ...]:
        return self.qt.shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.qt.fmt}, shape={self.qt.shape})"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["qt"], meta_fields=[])
@dataclasses.dataclass(frozen=True, repr=False)
class XlaWeight(QTensorWeight):
    """The XLA backend's weight: at load, dense in the policy's params dtype (dequantized once, so no call
    dequantizes it again); for one call (`view`), the QTensor as stored."""

    backend: ClassVar[str] = "xla"


_FEW_ROWS = 16  # up to this many rows of x (decode), the weight goes on the left of the dot


@functools.partial(jax.jit, static_argnames=("compute_dtype", "out_dtype"))
def xla_matmul(x: jax.Array, w: QTensor, compute_dtype, out_dtype) -> jax.Array:
    """The reference: x [M, K] @ (w dequantized to compute_dtype)^T with f32 accumulation -> [M, N]."""
    wd = dequantize_tile(w.fmt, w.planes, dtype=compute_dtype).reshape(w.shape)  # [N, K]
    rows = x.astype(compute_dtype)  # [M, K]
    contract = (((1,), (1,)), ((), ()))
    # HIGHEST keeps f32 dots in f32 on GPU/TPU; for 16-bit inputs it means nothing but sends XLA:CPU off
    # its bf16 kernel onto a convert-to-f32 path (measured 165 ms against 12 ms).
    precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
    m = rows.shape[0]
    if m <= _FEW_ROWS and not (m == 1 and compute_dtype == jnp.float32):
        # XLA:CPU, measured on a (262144, 640) bf16 weight: x @ W^T with one row converts all of W to f32
        # on every call (166 ms); W @ x^T with x padded to two rows takes the fast kernel (12 ms). A single
        # f32 row is fastest as x @ W^T (XLA's own memory-bound matrix-vector kernel).
        padded = jnp.concatenate([rows, rows]) if m == 1 else rows
        y = lax.dot_general(wd, padded, contract, precision=precision, preferred_element_type=jnp.float32).T[:m]
    else:
        y = lax.dot_general(rows, wd, contract, precision=precision, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


class Xla(Backend):
    """The reference: every format of the table, every platform, any rows."""

    name = "xla"
    platforms = ("cpu", "gpu", "tpu")

    def prepare(self, qt: QTensor, policy: Policy, *, many_rows: bool = True) -> XlaWeight:
        return XlaWeight(to_dense(qt, policy.params))

    def view(self, qt: QTensor, compute_dtype) -> XlaWeight:
        return XlaWeight(qt)

    def matmul(self, x, w: XlaWeight, *, compute_dtype, out_dtype) -> jax.Array:
        return xla_matmul(x, w.qt, compute_dtype, out_dtype)

    def describe(self, w: Prepared | None = None) -> str:
        if w is not None and w.qt.format.block_size == 1:
            return f"xla (dense {w.qt.fmt})"
        return "xla"


XLA = Xla()
