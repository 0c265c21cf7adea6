"""The persistent compilation cache (`realm_jax.compile_cache`): a second process with the same model and
shapes loads every program the first kept and gives the same tokens; a corrupt cache or an unusable
directory gives a warning and a working run; the cache is bounded in entries. Each run is a process of its
own (the cache is a process-wide JAX setting)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import warnings

import jax
import pytest

from realm_jax import compile_cache

MODEL = pathlib.Path(__file__).parent / "data" / "synthetic" / "llama-s-q2_k.gguf"

# Counts JAX's persistent-cache events (not jax_log_compiles, which logs cache hits too) around a load and
# a short greedy generation of the synthetic model.
PROBE = r"""
import json, sys, warnings
from jax._src import monitoring

counts = {"misses": 0, "hits": 0}


def listen(event, **kwargs):
    if event == "/jax/compilation_cache/cache_misses":
        counts["misses"] += 1
    elif event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1


monitoring.register_event_listener(listen)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import realm_jax

    model = realm_jax.load(sys.argv[1])
    ids = model.generate_ids([model.tokenizer.encode("Once upon a time")], max_new_tokens=6)
print(json.dumps({**counts, "ids": ids, "warnings": [str(w.message) for w in caught]}))
"""


def _run(cache: str) -> dict:
    env = {**os.environ, "REALM_JAX_COMPILE_CACHE": cache}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", PROBE, str(MODEL)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_compiles_only_the_fast_programs_and_a_corrupt_cache_recompiles(tmp_path):
    cache = tmp_path / "xla"
    cold = _run(str(cache))
    assert cold["misses"] > 0 and cold["hits"] == 0, cold
    entries = [p for p in cache.iterdir() if p.is_file() and not p.name.startswith(".")]
    kept = [p for p in entries if p.name.endswith("-cache")]
    assert kept, "nothing was written to the cache"

    # JAX counts a miss where it writes an entry: programs under MIN_COMPILE_SECS are neither (and one near it
    # may be kept by one run and not by the next)
    assert cold["misses"] == len(kept)
    warm = _run(str(cache))  # every program kept comes from the cache
    assert warm["hits"] == len(kept), warm
    assert warm["ids"] == cold["ids"]

    corrupt = b"not an executable" * 3
    for p in entries:  # every entry corrupt: JAX warns, compiles again, and the run is the same
        p.write_bytes(corrupt)
    broken = _run(str(cache))
    assert broken["ids"] == cold["ids"]
    # JAX leaves a corrupt entry as it is (it compiles and does not write over it), so a hit can only be on an
    # entry this run wrote itself: a program that crossed MIN_COMPILE_SECS only here, on a loaded machine
    # (seen once: 1 hit). Never on a corrupt one; where the run wrote none, no hit at all.
    rewritten = [p for p in cache.iterdir() if p.name.endswith("-cache") and p.read_bytes() != corrupt]
    assert broken["misses"] > 0 and broken["hits"] <= len(rewritten), (broken, len(rewritten))
    assert any("persistent compilation cache" in w for w in broken["warnings"]), broken["warnings"]


@pytest.fixture
def no_cache_dir():
    """This process's JAX without a cache directory for the test (another test's `load` may have set one;
    nothing compiles in between, so the cache JAX already opened is not affected)."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_an_unusable_directory_warns_and_leaves_jax_alone(tmp_path, monkeypatch, no_cache_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("REALM_JAX_COMPILE_CACHE", str(blocker / "xla"))  # under a regular file: no mkdir
    with pytest.warns(RuntimeWarning, match="cannot be used"):
        assert compile_cache._enable() is None
    assert jax.config.jax_compilation_cache_dir is None


def test_off_and_the_users_own_directory(tmp_path, monkeypatch, no_cache_dir):
    for off in ("0", "off", "False"):
        monkeypatch.setenv("REALM_JAX_COMPILE_CACHE", off)
        assert compile_cache.location() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert compile_cache._enable() is None
    monkeypatch.setenv("REALM_JAX_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache.location() == tmp_path / "mine"
    monkeypatch.delenv("REALM_JAX_COMPILE_CACHE")
    monkeypatch.setenv("REALM_JAX_CACHE", str(tmp_path / "root"))
    assert compile_cache.location() == tmp_path / "root" / "xla"
    own = str(tmp_path / "users")
    jax.config.update("jax_compilation_cache_dir", own)
    assert compile_cache._enable() == pathlib.Path(own)  # the user's own, untouched
    assert not (tmp_path / "root" / "xla").exists()


def test_off_in_one_of_several_processes(tmp_path, monkeypatch, no_cache_dir):
    """After `jax.distributed` joined processes, the cache stays off: JAX writes from process 0 only, the
    others' keys differ on the CPU, and under jax 0.12.1 a cached executable in one process against a fresh
    compile in another deadlocked their first collective (the launch test hung on a warm cache)."""
    monkeypatch.setenv("REALM_JAX_COMPILE_CACHE", str(tmp_path / "xla"))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compile_cache._enable() is None
    assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "xla").exists()


def _entry(path: pathlib.Path, key: str, used: int | None, modified: int) -> None:
    (path / f"{key}-cache").write_bytes(b"x" * 10)
    os.utime(path / f"{key}-cache", ns=(modified, modified))
    if used is not None:
        (path / f"{key}-atime").write_bytes(used.to_bytes(8, "little"))


def test_prune_keeps_the_most_recently_used_entries(tmp_path):
    """JAX's eviction bounds the bytes and reads every entry's time stamp at each write; `prune` bounds the
    count: the least recently used go (JAX's time stamp, else the file's modification time), with their
    time stamps; other files stay."""
    for i in range(8):  # last used at i seconds, every other one without JAX's time stamp
        _entry(tmp_path, f"jit_f-{i:02d}", i * 10**9 if i % 2 else None, i * 10**9)
    (tmp_path / ".lockfile").write_text("")
    (tmp_path / "notes.txt").write_text("not an entry")
    assert compile_cache.prune(tmp_path, max_entries=8) == 0
    assert compile_cache.prune(tmp_path, max_entries=3) == 5
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".lockfile", "jit_f-05-atime", "jit_f-05-cache", "jit_f-06-cache", "jit_f-07-atime",
                    "jit_f-07-cache", "notes.txt"]
    _entry(tmp_path, "jit_g", 1, 10**18)  # JAX's time stamp wins over a new file's modification time
    assert compile_cache.prune(tmp_path, max_entries=3) == 1 and not (tmp_path / "jit_g-cache").exists()


def test_enable_keeps_only_programs_that_take_time_to_compile(tmp_path, monkeypatch, no_cache_dir):
    monkeypatch.setenv("REALM_JAX_COMPILE_CACHE", str(tmp_path / "xla"))
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        assert compile_cache._enable() == tmp_path / "xla"
        assert jax.config.jax_persistent_cache_min_compile_time_secs == compile_cache.MIN_COMPILE_SECS > 0
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
