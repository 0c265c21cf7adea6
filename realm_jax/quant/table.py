"""The format table: every GGUF tensor type realm-jax reads, by name and by ggml type id.

It is the only list of formats: the repack, dequantize and quantize functions, the GGUF reader, the
linear layer's backends (each declares in its own module which of these formats its kernels implement)
and `realm-jax inspect` all read it. A format is added by defining it in its family's module (`floats`,
`legacy`, `kquants`, ...), which this table collects from `_FAMILIES`.
"""

from __future__ import annotations

from realm_jax.errors import UnsupportedFormatError
from realm_jax.quant import floats, iq1, iq2, iq3, iq4, kquants, kquants_low, legacy, mxfp, plain, ternary
from realm_jax.quant.block import Format

__all__ = ["FORMATS", "format_for_ggml_type", "get_format", "register"]

FORMATS: dict[str, Format] = {}
_BY_GGML_TYPE: dict[int, Format] = {}


def register(fmt: Format) -> Format:
    """Add a format to the table; its name and ggml type id must be new."""
    if fmt.name in FORMATS or fmt.ggml_type in _BY_GGML_TYPE:
        raise ValueError(f"register: a format named {fmt.name!r} or with ggml type {fmt.ggml_type} exists")
    FORMATS[fmt.name] = fmt
    _BY_GGML_TYPE[fmt.ggml_type] = fmt
    return fmt


_FAMILIES = (floats, plain, legacy, kquants, kquants_low, iq4, mxfp, ternary, iq1, iq2, iq3)
for _fmt in (f for family in _FAMILIES for f in family.FORMATS):
    register(_fmt)


def get_format(name: str) -> Format:
    """The `Format` named `name` ("Q4_K"); UnsupportedFormatError names the supported ones otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise UnsupportedFormatError(f"format {name!r} is not supported; supported: {', '.join(FORMATS)}") from None


def format_for_ggml_type(ggml_type: int, *, what: str = "tensor") -> Format:
    """The `Format` of a ggml type id, or UnsupportedFormatError naming `what` and the type."""
    if ggml_type not in _BY_GGML_TYPE:
        from gguf import GGMLQuantizationType

        try:
            name = GGMLQuantizationType(ggml_type).name
        except ValueError:
            name = f"unknown type id {ggml_type}"
        raise UnsupportedFormatError(f"{what}: ggml type {name} is not supported; supported: {', '.join(FORMATS)}")
    return _BY_GGML_TYPE[ggml_type]
