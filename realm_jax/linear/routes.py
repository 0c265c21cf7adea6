"""Which of a backend's paths multiplies m rows of x, per device kind and format: the path measured fastest
where a benchmark has measured it, else the backend's heuristic.

The table (`routes.json` next to this file) is written by `benchmarks/kernels.py --write-routes` on the
device and committed:

    {"NVIDIA H200": {"measured": {"commit": ..., "date": ..., "command": ...},
                     "backends": {"triton": {"Q4_K": [[1, "gemv"], [8, "mma"], [512, "xla"]], ...}}}}

Each format lists the rows of x it was timed at with the fastest path there; other row counts take the
path of the nearest measured one on a log scale (ties: the smaller). A device kind, backend or format
with no entry falls back to the backend's heuristic.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

from realm_jax.errors import RoutesError

__all__ = ["ROUTES_FILE", "measured", "table", "validate"]

ROUTES_FILE = pathlib.Path(__file__).with_name("routes.json")


def validate(data, paths: dict[str, tuple[str, ...]] | None, where: str) -> dict:
    """`data` checked against the table's shape and, where given, each backend's `paths` (else the backend
    checks the path it is routed to); raises RoutesError naming `where` and the key."""
    if not isinstance(data, dict):
        raise RoutesError(f"{where}: the routes table must be a JSON object of device kinds")
    for kind, entry in data.items():
        backends = entry.get("backends") if isinstance(entry, dict) else None
        if not isinstance(backends, dict):
            raise RoutesError(f"{where}: {kind!r} must hold a 'backends' object")
        for backend, formats in backends.items():
            if paths is not None and backend not in paths:
                raise RoutesError(f"{where}: {kind!r}: {backend!r} is not a backend with paths "
                                    f"({', '.join(sorted(paths))})")
            if not isinstance(formats, dict):
                raise RoutesError(f"{where}: {kind!r}/{backend}: must map formats to [rows, path] lists")
            for fmt, rows in formats.items():
                ok = isinstance(rows, list) and rows and all(
                    isinstance(r, list) and len(r) == 2 and isinstance(r[0], int) and not isinstance(r[0], bool)
                    and r[0] >= 1 and isinstance(r[1], str) and (paths is None or r[1] in paths[backend])
                    for r in rows)
                if not ok or len({r[0] for r in rows}) != len(rows):
                    known = f", path one of {', '.join(paths[backend])}" if paths is not None else ""
                    raise RoutesError(f"{where}: {kind!r}/{backend}/{fmt}: {rows!r} must be distinct "
                                      f"[rows >= 1, path] pairs{known}")
    return data


@functools.cache
def table() -> dict:
    """The committed table, read and checked once (each backend checks the path names it meets)."""
    try:
        data = json.loads(ROUTES_FILE.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RoutesError(f"{ROUTES_FILE}: unreadable routes table: {e}") from e
    return validate(data, None, str(ROUTES_FILE))


def measured(backend: str, device_kind: str, fmt: str, m: int, routes: dict | None = None) -> str | None:
    """The path measured fastest at the rows of x nearest m (on a log scale), or None where the table has no
    entry or m lies more than a factor of two outside the rows measured (a decode route does not serve
    prefill, nor a prefill route decode)."""
    entry = (table() if routes is None else routes).get(device_kind)
    rows = entry["backends"].get(backend, {}).get(fmt) if entry else None
    if not rows or not min(r[0] for r in rows) <= 2 * m <= 4 * max(r[0] for r in rows):
        return None
    return min(rows, key=lambda r: (abs(math.log2(r[0]) - math.log2(m)), r[0]))[1]
