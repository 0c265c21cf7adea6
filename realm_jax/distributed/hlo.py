"""Bytes moved by collectives, read from compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`).

Each collective counts the bytes of the array it moves per device: an all-reduce, collective-permute or
all-to-all its operand (= its result), an all-gather its gathered result, a reduce-scatter its operand.
An instruction inside a while loop runs once per iteration: counts multiply by the loop's trip count, which
XLA records as `known_trip_count` (a loop without one is an error: its traffic cannot be known statically).
Async pairs (`all-reduce-start` / `-done`) count once, at the start.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from realm_jax.errors import RealmError

__all__ = ["Collective", "collective_bytes", "collectives"]

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: its kind, bytes per execution, and executions per call of the program."""

    kind: str
    bytes: int
    executions: int
    computation: str

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.executions


def _shape_bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _BYTES:
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _moved_bytes(op: str, kind: str, shape: str, rest: str) -> int:
    arrays = [_shape_bytes(f"{d}[{dims}]") for d, dims in _ARRAY.findall(shape) if d in _BYTES]
    if op.endswith("-start") and kind in ("all-gather", "collective-permute") and len(arrays) >= 2:
        # GPU async starts return (operand, result, context...): the result for a gather, the operand for
        # a permute (its result has the same size).
        return arrays[1] if kind == "all-gather" else arrays[0]
    if kind == "reduce-scatter":
        operands = _ARRAY.findall(rest.split(")")[0])
        return sum(_shape_bytes(f"{d}[{dims}]") for d, dims in operands if d in _BYTES) or sum(arrays)
    return sum(arrays)


def _parse(hlo: str):
    comps: dict[str, list[tuple[str, str, str]]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        im = _INSTR.match(line)
        if im:
            comps[current].append((im.group(2), im.group(1), im.group(3)))
    if entry is None:
        raise RealmError("collectives: no ENTRY computation in the HLO text (pass compiled HLO, e.g. "
                         "jax.jit(f).lower(...).compile().as_text())")
    return comps, entry


def _callees(op: str, rest: str) -> list[tuple[str, int | None]]:
    """(computation, multiplier) called by one instruction; multiplier None for a loop of unknown trips."""
    out = []
    if op == "while":
        body = re.search(r"body=%?([\w.\-]+)", rest)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        if body:
            out.append((body.group(1), int(trips.group(1)) if trips else None))
        return out
    for attr in ("calls", "to_apply", "branch_computations", "true_computation", "false_computation"):
        for group in re.findall(attr + r"=(\{[^}]*\}|%?[\w.\-]+)", rest):
            out += [(name.strip().lstrip("%"), 1) for name in group.strip("{}").split(",") if name.strip()]
    return out


def collectives(hlo: str, *, unknown_trips: int | None = None) -> list[Collective]:
    """Every collective of a compiled program with how often one call of the program runs it.

    Args:
      hlo: compiled HLO text.
      unknown_trips: how many iterations to count for a while loop whose trip count XLA does not know
        (a decode loop that stops on EOS: 1 gives the bytes per step); None raises for such loops if they
        run collectives.
    """
    comps, entry = _parse(hlo)
    found: list[Collective] = []

    def visit(name: str, times: int, path: tuple[str, ...]):
        for op, shape, rest in comps.get(name, []):
            kind = op[:-6] if op.endswith("-start") else op
            if kind in KINDS:
                moved = _moved_bytes(op, kind, shape, rest)
                found.append(Collective(kind, moved, times, name))
            for callee, mult in _callees(op, rest):
                if callee in path or callee not in comps or kind in KINDS:
                    continue  # reductions applied by a collective are not collectives themselves
                if mult is None and unknown_trips is not None:
                    mult = unknown_trips
                if mult is None:
                    if _reachable(comps, callee):
                        raise RealmError(f"collectives: a while loop ({callee}) without a known trip count runs "
                                         f"collectives; their bytes cannot be counted statically")
                    continue
                visit(callee, times * mult, path + (callee,))

    visit(entry, 1, (entry,))
    return found


def _reachable(comps, start: str) -> list[str]:
    """The collective kinds reachable from a computation."""
    seen, stack, kinds = set(), [start], []
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        for op, _, rest in comps.get(name, []):
            kind = op[:-6] if op.endswith("-start") else op
            if kind in KINDS:
                kinds.append(kind)
            stack += [c for c, _ in _callees(op, rest)]
    return kinds


def collective_bytes(hlo: str, *, unknown_trips: int | None = None) -> dict[str, int]:
    """Bytes moved per call of the program, per collective kind (kinds that do not occur are absent);
    `unknown_trips` as in `collectives`."""
    totals: dict[str, int] = collections.Counter()
    for c in collectives(hlo, unknown_trips=unknown_trips):
        totals[c.kind] += c.total_bytes
    return dict(totals)
