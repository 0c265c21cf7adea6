"""JAX's persistent compilation cache, on by default under the realm-jax cache directory.

A second `realm-jax generate` (or `realm_jax.load` in a new process) with the same model, policy, mesh and
shapes then loads its executables from disk instead of compiling them: on the CPU the default model's
first token comes ~2-3x sooner (BENCHMARKS.md), and on a GPU it skips the kernels' compile.

- Where: ``$REALM_JAX_COMPILE_CACHE`` if set to a path; else ``$REALM_JAX_CACHE/xla`` (default
  ``~/.cache/realm-jax/xla``). ``REALM_JAX_COMPILE_CACHE=0`` (or ``off``, ``false``, ``no``) turns it off.
- What: every executable that took `MIN_COMPILE_SECS` or more to compile (JAX's default, 1 s, leaves out
  most of a small model's programs; the ops run one by one at load compile in milliseconds, and were ~95% of
  the entries), up to `MAX_BYTES` on disk and `MAX_ENTRIES` entries, least recently used first out (where
  the `filelock` package JAX's eviction needs is installed; without it the cache is unbounded). JAX's
  eviction bounds the bytes, and reads every entry's time stamp at each write: at 18,000 entries 0.8 s a
  compile, so a first run after a jax upgrade (whose keys are all new) crawled. `prune` keeps the count
  down, once a process, in a background thread.
- A cache directory set by the user (``jax.config.update("jax_compilation_cache_dir", ...)`` or
  ``JAX_COMPILATION_CACHE_DIR``) is kept as it is.
- Off in a process that `jax.distributed` joined to others (`realm-jax launch`): JAX writes entries from
  process 0 only, and on the CPU the other processes' keys differ from process 0's, so they compile anyway
  and the run waits for them; and under jax 0.12.1 an executable read from the cache in one process,
  against the same program compiled in another, deadlocks in their first collective (CPU, Gloo).
- A directory that cannot be created or written gives one warning and a run without the cache; an entry
  that cannot be read (corrupt, truncated) gives JAX's warning and is compiled again. Never an error.

The cache is trusted code: like JAX's, it must not be writable by anyone you do not trust (JAX's
`set_cache_dir` says why). It is created with mode 0700.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import tempfile
import threading
import warnings

import jax

from realm_jax.assets import cache_root

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "MIN_COMPILE_SECS", "enable", "location", "prune"]

MAX_BYTES = 4 << 30  # the cache's size on disk: least recently used entries are removed past it
MAX_ENTRIES = 1000  # and its entries (each write costs JAX's eviction ~40 us an entry)
MIN_COMPILE_SECS = 0.1  # programs that compile faster are not kept
_CACHE, _ATIME = "-cache", "-atime"  # JAX's entry files: the executable, and when it was last used (ns)
_OFF = ("0", "off", "false", "no")
_lock = threading.Lock()
_done: pathlib.Path | None | bool = False  # False: not tried yet; None: off; a path: on


def location() -> pathlib.Path | None:
    """Where realm-jax keeps compiled executables, or None when ``$REALM_JAX_COMPILE_CACHE`` turns it off."""
    value = os.environ.get("REALM_JAX_COMPILE_CACHE", "").strip()
    if value.lower() in _OFF:
        return None
    return pathlib.Path(value).expanduser() if value else cache_root() / "xla"


def _writable(path: pathlib.Path) -> str | None:
    """Why `path` cannot hold the cache, or None."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    if not path.is_dir():
        return "not a directory"
    return None


def enable() -> pathlib.Path | None:
    """Turn JAX's persistent compilation cache on at `location()` (once a process; later calls return the
    first answer). Returns the directory in use: the user's own where one was set, None where the cache is
    off, its directory unusable (with a warning) or this process one of several (after `jax.distributed`
    joined them: call this after that)."""
    global _done
    with _lock:
        if _done is not False:
            return _done
        _done = _enable()
        return _done


def _enable() -> pathlib.Path | None:
    own = jax.config.jax_compilation_cache_dir
    if own:  # the user's cache, with the user's settings
        return pathlib.Path(own)
    path = location()
    if path is None or jax.process_count() > 1:  # several processes: see the module's docstring
        return None
    why = _writable(path)
    if why is not None:
        warnings.warn(f"realm-jax: the compilation cache {path} cannot be used ({why}); compiling without it "
                      f"(set REALM_JAX_COMPILE_CACHE to another directory, or to 0 to turn it off)",
                      RuntimeWarning, stacklevel=3)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    if importlib.util.find_spec("filelock") is not None:  # JAX's eviction needs it (else: unbounded)
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
        threading.Thread(target=_prune_quietly, args=(path,), name="realm-jax-cache-prune", daemon=True).start()
    return path


def prune(path: pathlib.Path, max_entries: int = MAX_ENTRIES) -> int:
    """Remove the least recently used entries of the cache at `path` past `max_entries` (last used: JAX's
    time stamp beside the entry, else the entry's modification time), under JAX's lock on the directory, so
    that no process reads or writes an entry meanwhile. Returns how many were removed."""
    import filelock

    with os.scandir(path) as found:
        keys = [e.name[: -len(_CACHE)] for e in found if e.name.endswith(_CACHE)]
    if len(keys) <= max_entries:
        return 0

    def last_used(key: str) -> int:
        try:
            return int.from_bytes((path / f"{key}{_ATIME}").read_bytes(), "little")
        except OSError:
            try:
                return (path / f"{key}{_CACHE}").stat().st_mtime_ns
            except OSError:  # removed meanwhile
                return 0

    victims = sorted(keys, key=last_used)[: len(keys) - max_entries]
    lock = filelock.FileLock(path / ".lockfile")  # JAX's LRUCache takes the same
    for start in range(0, len(victims), 256):  # in batches: JAX's reads and writes wait at most 10 s for it
        with lock.acquire(timeout=10):
            for key in victims[start: start + 256]:
                for suffix in (_CACHE, _ATIME):
                    (path / f"{key}{suffix}").unlink(missing_ok=True)
    return len(victims)


def _prune_quietly(path: pathlib.Path) -> None:
    try:
        prune(path)
    except Exception as e:  # a cache that cannot be pruned is still a cache: JAX bounds its bytes
        warnings.warn(f"realm-jax: could not prune the compilation cache {path}: {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=1)
