"""realm-jax: GGUF-quantized language models on JAX.

Public API: `load` a GGUF model and use its `Model.generate`, `Model.logits` and `Model.tokenizer`;
`read_gguf` / `write_gguf` (files <-> `QTensor`s), `open_gguf` (metadata and tensor index only),
`quantize` / `dequantize` (every supported format), `qmatmul` (x @ dequant(w)^T; the linear layer's
backends are in `realm_jax.linear`), `Policy` (precision),
the errors under `RealmError`, and `default_model_path` (the embedded gemma3-270m Q4_K_M file).
"""

from realm_jax import errors
from realm_jax.assets import default_model_path
from realm_jax.checkpoint import read_gguf, write_gguf
from realm_jax.errors import RealmError
from realm_jax.gguf import GGUFFile, open_gguf
from realm_jax.linear import qmatmul
from realm_jax.precision import Policy, PrecisionMode
from realm_jax.quant import FORMATS, QTensor, dequantize, quantize
from realm_jax.runtime import Model, load
from realm_jax.tokenizer import Tokenizer

__all__ = [
    "FORMATS",
    "GGUFFile",
    "Model",
    "Policy",
    "PrecisionMode",
    "QTensor",
    "RealmError",
    "default_model_path",
    "dequantize",
    "errors",
    "load",
    "open_gguf",
    "qmatmul",
    "quantize",
    "read_gguf",
    "Tokenizer",
    "write_gguf",
]
