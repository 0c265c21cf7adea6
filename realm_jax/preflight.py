"""Does a run fit the machine? Checked before anything is allocated.

The memory a generation needs is estimated from the model's shapes (`step_bytes`: the KV cache, a prefill's
activations, the logits) and compared with what the devices have free (`free_bytes`: the host's available
memory for CPU devices, under a cgroup's limit and the address space `ulimit -v` leaves where there are
those; the accelerators' own free memory otherwise). `realm_jax.Model` checks each generation and
`Model.logits` call this way, and the command line checks its options with the same figures before it loads
the model, so a huge batch, prompt or process count ends in a `MemoryBudgetError` that names both figures
instead of in the kernel's OOM killer.
"""

from __future__ import annotations

from collections.abc import Sequence

from realm_jax.errors import MemoryBudgetError

__all__ = ["check_fits", "free_bytes", "host_free", "step_bytes"]

_SCORE_ROWS = 512  # queries attended at once (ops._QUERY_CHUNK): the scores are [B, rows, N, S] f32
_CGROUP_LIMITS = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def step_bytes(sizes: dict, *, batch: int, prompt_tokens: int, cache_tokens: int, logits_rows: int = 1) -> int:
    """Bytes a prefill of `batch` prompts of `prompt_tokens` tokens holds at its peak, with a KV cache of
    `cache_tokens` positions, besides the params (a lower bound of the truth, so that nothing real is refused).

    Args:
      sizes: the model's per-token sizes as `realm_jax.runtime.memory_plan` reports them
        (kv_bytes_per_token, prefill_bytes_per_token, n_heads, vocab_size).
      logits_rows: rows of f32 logits each prompt returns.
    """
    tokens = batch * prompt_tokens
    return (batch * cache_tokens * sizes["kv_bytes_per_token"] + tokens * sizes["prefill_bytes_per_token"]
            + batch * min(prompt_tokens, _SCORE_ROWS) * sizes["n_heads"] * cache_tokens * 4
            + batch * logits_rows * sizes["vocab_size"] * 4)


def free_bytes(devices: Sequence | None = None) -> int | None:
    """Bytes free for new arrays on `devices` (default: the first device): for CPU devices the host's
    available memory (all simulated CPU devices share it), else the sum of the devices' free memory; None
    when the platform does not say."""
    import jax

    devices = list(devices) if devices is not None else jax.devices()[:1]
    if all(d.platform == "cpu" for d in devices):
        return host_free()
    total = 0
    for d in devices:
        stats = d.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        total += stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return total


def check_fits(what: str, need: int, devices: Sequence | None = None, *, free: int | None = None) -> None:
    """MemoryBudgetError unless `need` bytes fit in what `devices` (or `free`, if given) have free."""
    free = free_bytes(devices) if free is None else free
    if free is not None and need > free:
        raise MemoryBudgetError(f"{what} needs at least {_gib(need)} of memory, more than the {_gib(free)} free "
                                "on this machine")


def _gib(n: int) -> str:
    if n >= 1 << 100:  # a size no machine nears (a hostile --batch): too large for a float or for its digits
        return f"2**{n.bit_length() - 1} bytes"
    return f"{n / 2**30:.2f} GiB ({n:,} bytes)"


def host_free() -> int | None:
    """MemAvailable from /proc/meminfo, or less where a cgroup (v2 or v1) limits this process."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    for limit_path, usage_path in _CGROUP_LIMITS:
        try:
            with open(limit_path) as f, open(usage_path) as g:
                limit, usage = f.read().strip(), int(g.read())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max" in v2, a huge number in v1, when there is no limit
            free = min(free, max(int(limit) - usage, 0))
    room = _address_space_left()
    return free if room is None else min(free, room)


def _address_space_left() -> int | None:
    """What `ulimit -v` (RLIMIT_AS) leaves this process to map: its limit less the address space mapped now
    (VmSize); None without a limit."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return max(limit - size, 0)
