"""The exceptions of realm-jax: one class per cause, all under `RealmError`.

Every message names what it is about: the file, the tensor, the shape or the host. Callers catch
`RealmError` to handle any of them; tests assert the precise subclass.
"""

from __future__ import annotations

__all__ = [
    "RealmError",
    "GGUFError",
    "MissingFileError",
    "UnreadableFileError",
    "NotGGUFError",
    "UnsupportedVersionError",
    "TruncatedFileError",
    "MetadataError",
    "UnknownTensorTypeError",
    "TensorShapeError",
    "TensorOutOfBoundsError",
    "TensorOverlapError",
    "DuplicateTensorError",
    "MisalignedTensorError",
    "ResourceLimitError",
    "FileChangedError",
    "UnsupportedFormatError",
    "QTensorError",
    "ShapeMismatchError",
    "DTypeError",
    "NativeBuildError",
    "RoutesError",
    "ModelUnavailableError",
    "UnsupportedArchitectureError",
    "MissingTensorError",
    "ContextLengthError",
    "SamplingError",
    "ChatTemplateError",
    "TemplateBudgetError",
    "TextInputError",
    "NonFiniteLogitsError",
    "ArgumentError",
    "WriteError",
    "MemoryBudgetError",
    "TokenIdError",
    "MeshError",
    "ShardingError",
    "CollectiveError",
    "CoordinatorError",
    "PeerError",
]


class RealmError(Exception):
    """Base class of every error realm-jax raises on purpose."""


# --- GGUF files -------------------------------------------------------------------------------
class GGUFError(RealmError):
    """A GGUF file cannot be used as it is. Subclasses name the cause."""


class MissingFileError(GGUFError, FileNotFoundError):
    """The path does not exist or is not a regular file."""


class UnreadableFileError(GGUFError):
    """The file exists but cannot be opened or mapped (permissions, a device or pipe, an I/O error)."""


class NotGGUFError(GGUFError):
    """The file does not start with the GGUF magic."""


class UnsupportedVersionError(GGUFError):
    """The GGUF version (or byte order) is not one this reader handles (v2 and v3, little-endian)."""


class TruncatedFileError(GGUFError):
    """The header or metadata runs past the end of the file."""


class MetadataError(GGUFError):
    """A metadata key/value is malformed: unknown value type, bad UTF-8, wrong type for a known key."""


class UnknownTensorTypeError(GGUFError):
    """A tensor's ggml type id is not a type realm-jax knows."""


class TensorShapeError(GGUFError):
    """A tensor's dimensions are invalid or disagree with its type's block size."""


class TensorOutOfBoundsError(GGUFError):
    """A tensor's data lies (partly) past the end of the file."""


class TensorOverlapError(GGUFError):
    """Two tensors' data regions overlap, so their byte sizes disagree with their offsets."""


class DuplicateTensorError(GGUFError):
    """Two tensors (or two metadata keys) share one name."""


class MisalignedTensorError(GGUFError):
    """A tensor's data offset is not a multiple of the file's alignment."""


class ResourceLimitError(GGUFError):
    """A count or size in the header (or a token of the vocabulary) is too large to honour: it would exceed
    what the file can hold or the reader's memory budget, or no real vocabulary has one so large."""


class FileChangedError(GGUFError):
    """The file was truncated, rewritten or replaced after it was opened (found before its tensors are read)."""


# --- quantized tensors and ops ----------------------------------------------------------------
class UnsupportedFormatError(RealmError):
    """A quant format realm-jax does not implement (it names the format and what is supported)."""


class QTensorError(RealmError):
    """A QTensor is malformed: missing planes, wrong plane shapes or dtypes, shape not block-aligned."""


class ShapeMismatchError(RealmError):
    """Operands of an op have incompatible shapes (e.g. x's last dim differs from the weight's cols)."""


class DTypeError(RealmError):
    """An operand has a dtype the op does not accept."""


class NativeBuildError(RealmError):
    """The native CPU matmul (realm_jax.native) cannot be built, loaded or used here (no compiler, a failed
    build: it names the command and its output; not a CPU)."""


# --- assets -----------------------------------------------------------------------------------
class RoutesError(RealmError):
    """The linear layer's routes table (`realm_jax/linear/routes.json`, or one a benchmark writes) is
    malformed."""


class ModelUnavailableError(RealmError):
    """A bundled model file cannot be found or fetched (it says how to install it)."""


# --- models and generation --------------------------------------------------------------------
class UnsupportedArchitectureError(RealmError):
    """The file's general.architecture (or a feature it uses, like a rope scaling type) is not supported."""


class MissingTensorError(GGUFError):
    """A tensor the architecture needs is absent from the file."""


class ContextLengthError(RealmError):
    """A prompt plus the tokens to generate do not fit in the model's context."""


class SamplingError(RealmError):
    """Invalid sampling or generation arguments (temperature, top_k, top_p, max_new_tokens, ...)."""


class ChatTemplateError(RealmError):
    """The file's chat template rejected the messages (its raise_exception), e.g. roles out of order."""


class TemplateBudgetError(MetadataError):
    """A chat template exceeded its budget while rendering: output size, memory (any intermediate string or
    list) or wall-clock time. The message names the template's source and the limit."""


class TextInputError(RealmError, ValueError):
    """Text from outside (a prompt, a message, a stop string, a command-line argument, a line of input) is
    not a valid Unicode string (a lone surrogate, an undecodable byte) or is longer than anything that fits."""


class NonFiniteLogitsError(RealmError):
    """The model produced NaN or infinite logits during generation; the message names the step and the row."""


class TokenIdError(RealmError, IndexError):
    """A token id outside the vocabulary (or not an int)."""


# --- the command line and the machine ---------------------------------------------------------
class ArgumentError(RealmError, ValueError):
    """A command-line option (or API argument) is empty, out of range or contradicts another; it is named."""


class WriteError(RealmError):
    """A file realm-jax writes (`quantize`'s output) cannot be written where it was asked: the path is not a
    regular file, its folder is missing, or the system refused the write (its reason given)."""


class MemoryBudgetError(RealmError):
    """What was asked for (a batch, a prompt length, processes) needs more memory than the machine has; found
    before anything is allocated. The message gives both figures."""


# --- distributed ------------------------------------------------------------------------------
class MeshError(RealmError):
    """An impossible mesh: its shape does not match the devices, or an axis is unknown."""


class ShardingError(RealmError):
    """A model cannot be split over a mesh as asked (e.g. fewer query heads than the tensor-parallel degree)."""


class CollectiveError(RealmError, ValueError):
    """A collective's arguments are invalid (an unknown reduction, for instance)."""


class CoordinatorError(RealmError, ValueError):
    """Processes cannot join as asked: a bad process count, id or coordinator address, or no cluster found."""


class PeerError(RealmError):
    """A peer process was lost: it failed to start or to join in time, or it died. The message names its rank
    (process id), and its host and pid where they are known."""
