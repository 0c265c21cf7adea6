"""Text from outside, checked once where it enters: the Python API, the command line, chat input and, later,
the server all call `check_text` (and `check_messages` for chat messages) before anything else sees it; and
the paths files are written at (`check_output_path`).

Only valid Unicode strings pass. Python hands undecodable bytes through as lone surrogates (argv and
`surrogateescape` streams turn the byte 0xff into U+DCFF); the tokenizer and every encoder after it would
fail on them deep inside, so they end here in a `TextInputError` that names the argument and the position.
"""

from __future__ import annotations

import os
import pathlib
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

from realm_jax.errors import ArgumentError, ChatTemplateError, TextInputError, WriteError

__all__ = ["as_path", "check_messages", "check_output_path", "check_text", "decode_line", "shown"]


class _Shown(reprlib.Repr):
    # A huge int has no repr (Python refuses to print more than 4,300 digits) and would raise instead.
    def repr_int(self, x, level):
        return super().repr_int(x, level) if x.bit_length() <= 4096 else f"<int of {x.bit_length()} bits>"


_SHOWN = _Shown()
_SHOWN.maxstring = _SHOWN.maxother = 60


def shown(value: Any) -> str:
    """`value` as an error message shows it: a short repr whatever it is (a huge int, a long or deeply nested
    list, a string of gigabytes); a plain repr can recurse, raise, or take as much memory as the value."""
    return _SHOWN.repr(value)


def check_text(value: Any, what: str, *, max_chars: int | None = None) -> str:
    """`value` if it is a str of valid Unicode text of at most `max_chars` characters.

    Args:
      value: the text.
      what: what error messages call it ("prompt", "--stop", "stdin line 3").
      max_chars: the most characters that can be of use (None: no bound).

    Raises:
      TextInputError: not a str, a lone surrogate (an undecodable byte), or too long.
    """
    if not isinstance(value, str):
        raise TextInputError(f"{what} must be a str, got {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        raise TextInputError(f"{what} has {len(value)} characters, more than the {max_chars} that can be used")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            code = ord(value[e.start])
            if 0xDC80 <= code <= 0xDCFF:  # how surrogateescape carries an undecodable byte
                cause = f"the byte {code - 0xDC00:#04x}, which is not UTF-8,"
            else:
                cause = f"a lone surrogate U+{code:04X}"
            raise TextInputError(f"{what} is not valid Unicode text: it holds {cause} at character "
                                 f"{e.start}") from None
    return value


def check_messages(messages: Any, what: str = "messages") -> list[dict[str, str]]:
    """Chat messages as plain dicts, each role and content checked by `check_text`.

    Raises:
      ChatTemplateError: `messages` is not a list of {"role": str, "content": str} mappings.
      TextInputError: a role or content is not valid Unicode text.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise ChatTemplateError(f'{what} must be a list of {{"role": str, "content": str}} dicts, got '
                                f"{shown(messages)}")
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        for key in ("role", "content"):
            check_text(m[key], f"{what}[{i}][{key!r}]")
        out.append(m)
    return out


def decode_line(raw: bytes, what: str, *, max_chars: int | None = None) -> str:
    """One line of input bytes (chat stdin) as checked text: UTF-8, else a `TextInputError` naming the byte."""
    return check_text(raw.decode("utf-8", errors="surrogateescape"), what, max_chars=max_chars)


def as_path(path: Any, what: str) -> pathlib.Path:
    """`path` (a str, bytes or os.PathLike of either, not empty) as a Path; ArgumentError naming `what`
    otherwise. Bytes are decoded as `open` takes them (`os.fsdecode`: surrogateescape keeps every byte, so the
    Path names the same file); an empty path is refused, where pathlib would read it as ".", the working folder."""
    try:
        name = os.fsdecode(path)
    except TypeError:
        raise ArgumentError(f"{what}: path must be a str, bytes or os.PathLike, got {type(path).__name__} "
                            f"{shown(path)}") from None
    if not name:
        raise ArgumentError(f"{what}: path is empty")
    return pathlib.Path(name)


def check_output_path(path: Any, what: str) -> pathlib.Path:
    """`path` (`as_path`) as a place to write a file at: a regular file, or none yet, in a folder that exists
    (the writers write beside it and rename over it: a device or a folder there would be replaced).
    ArgumentError for what is no path; WriteError otherwise."""
    path = as_path(path, what)
    if path.exists() and not path.is_file():
        raise WriteError(f"{path}: exists and is not a regular file; the output must be a file path")
    if not path.parent.is_dir():
        raise WriteError(f"{path}: the folder {path.parent} does not exist")
    return path


def write_error(path: pathlib.Path, e: OSError) -> WriteError:
    """The WriteError for an OSError while `path` (or a file beside it) was written: the system's reason, or,
    for numpy's short write (which carries none: "N requested and M written"), that the disk took less than
    written; with the bytes free on the folder's file system, where it can say."""
    reason = e.strerror or (f"the file system took less than was written ({e})" if "requested and" in str(e)
                            else str(e) or type(e).__name__)
    try:
        st = os.statvfs(path.parent)
        reason += f"; {st.f_bavail * st.f_frsize:,} bytes free on its file system"
    except (OSError, AttributeError):  # no statvfs (not POSIX), or the folder cannot say: the reason alone
        pass
    return WriteError(f"{path}: cannot be written: {reason}")

