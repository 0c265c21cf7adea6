"""Quantized tensors: GGUF block formats as struct-of-arrays `QTensor` pytrees.

One module per format family (`floats`, `legacy`, `kquants`) holds the block layout with its bit diagram,
the lossless repack to planes and back, the per-tile dequantization that the XLA path and the Pallas
kernels share, and the quantizer.
"""

from realm_jax.quant.formats import (
    DENSE_FORMATS,
    FORMATS,
    concat_rows,
    dequantize,
    dequantize_tile,
    format_for_ggml_type,
    get_format,
    quantize,
    repack,
    to_dense,
    unpack,
)
from realm_jax.quant.qtensor import Field, Format, QTensor

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
