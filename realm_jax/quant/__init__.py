"""Quantized tensors: GGUF block formats as struct-of-arrays `QTensor` pytrees.

One module per format family (`floats`, `plain`, `legacy`, `kquants`, `kquants_low`, `iq1`..`iq4`, `mxfp`,
`ternary`) holds the block layout with its bit diagram, the lossless repack to planes and back, the per-tile
dequantization that the XLA path and the Pallas kernels share, and the quantizer where realm-jax writes the
format. `table` collects them: the format table every other part reads.
`block` describes a format (`Format`), `qtensor` holds a tensor's planes (`QTensor`), `formats` the
operations every format shares, `checks` what those operations (and `qmatmul`) check of their arguments.
"""

from realm_jax.quant.block import Field, Format
from realm_jax.quant.formats import (
    DENSE_FORMATS,
    concat_rows,
    dequantize,
    dequantize_tile,
    quantize,
    repack,
    to_dense,
    unpack,
)
from realm_jax.quant.qtensor import QTensor
from realm_jax.quant.table import FORMATS, format_for_ggml_type, get_format

__all__ = [
    "DENSE_FORMATS",
    "FORMATS",
    "Field",
    "Format",
    "QTensor",
    "concat_rows",
    "dequantize",
    "dequantize_tile",
    "format_for_ggml_type",
    "get_format",
    "quantize",
    "repack",
    "to_dense",
    "unpack",
]
