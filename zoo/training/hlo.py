"""Collectives in compiled HLO: what a sharded step really communicates.

`jax.jit(...).lower(...).compile().as_text()` is the program XLA runs on each device after
partitioning. Its all-gathers, all-to-alls, all-reduces, reduce-scatters and
collective-permutes are the communication the shardings caused. Used by the mesh tests, which
check that no kernel operand is gathered, and by `bench/collectives.py`.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")

# "%name = <result type> <kind>(" and the async "<kind>-start(" form; the result type is an
# array type "f32[8,16]{1,0}" or a tuple of them.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.+?)\s+"
                          r"(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')
# Replica groups, in the three spellings XLA prints: explicit lists "{{0,1},{2,3}}", iota
# "[groups,size]<=[...]", and "mesh['axis_0'=4,...] {'axis_1'}" (the axes the groups span).
_GROUPS_LIST = re.compile(r"replica_groups=\{\{(?P<first>[0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(?P<groups>[0-9]+),(?P<size>[0-9]+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\] \{(?P<over>[^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    shapes: tuple[tuple[int, ...], ...]  # per-device result shape(s) (several when fused)
    dtypes: tuple[str, ...]
    op_name: str  # the jax operation it came from ("" when XLA gives none)
    group_size: int | None  # devices per replica group (None: not read from the HLO)

    @property
    def elements(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def __str__(self) -> str:
        arrays = ", ".join(f"{d}[{','.join(map(str, s))}]" for d, s in zip(self.dtypes,
                                                                         self.shapes))
        return f"{self.kind} {arrays}" + (f" ({self.op_name})" if self.op_name else "")


def _group_size(line: str) -> int | None:
    if match := _GROUPS_LIST.search(line):
        return len([d for d in match.group("first").split(",") if d])
    if match := _GROUPS_IOTA.search(line):
        return int(match.group("size"))
    if match := _GROUPS_MESH.search(line):
        sizes = dict(re.findall(r"'([^']+)'=([0-9]+)", match.group("axes")))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", match.group("over")))
    return None


def collectives(hlo_text: str, *, include_trivial: bool = False) -> list[Collective]:
    """Every collective instruction in compiled HLO text, in program order.

    The "-done" half of an async pair is not counted again. Collectives whose replica groups
    hold one device each move nothing (shard_map's transpose sums over mesh axes of size 1,
    for instance) and are left out unless `include_trivial`.
    """
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        kind = match.group("kind")
        arrays = _ARRAY.findall(match.group("type"))
        # GPU/TPU run these asynchronously: an all-gather-start returns (operands, results) and
        # a collective-permute-start (operand, result, contexts); keep the results.
        if f"{kind}-start(" in line and kind in ("all-gather", "collective-permute"):
            half = len(arrays) // 2 if kind == "all-gather" else 1
            arrays = arrays[half:half + max(1, half)]
        shapes = tuple(tuple(int(d) for d in dims.split(",") if d) for _, dims in arrays)
        dtypes = tuple(dtype for dtype, _ in arrays)
        op = _OP_NAME.search(line)
        group_size = _group_size(line)
        if group_size == 1 and not include_trivial:
            continue
        found.append(Collective(kind, shapes, dtypes, op.group("name") if op else "",
                                group_size))
    return found


def counts(found: list[Collective]) -> dict[str, int]:
    """Number of collectives of each kind (every kind present, zeros included)."""
    tally = collections.Counter(c.kind for c in found)
    return {kind: tally.get(kind, 0) for kind in KINDS}


def kernel_arrays(calls) -> list[tuple[int, ...]]:
    """Global shapes of every recorded kernel call's q, k, v and result
    (`kernels_pallas.sharding.record_kernel_calls`), each also with its last two dimensions
    merged: the [B, T, H*D] form the projections around attention use."""
    shapes = []
    for call in calls:
        for shape in (*call.shapes[:3], call.result_shape):
            shapes.append(tuple(shape))
            shapes.append(tuple(shape[:-2]) + (shape[-2] * shape[-1],))
    return shapes


def gathers_kernel_array(collective: Collective, arrays, param_shapes,
                         num_devices: int) -> bool:
    """Whether an all-gather / all-to-all result is (part of) a kernel operand or result.

    Matches when the result has the array's rank, each dimension divides the array's, and it
    holds more than one device's share; results with a parameter's shape (dimensions of size 1
    ignored, any order) are FSDP weight gathers and never match.
    """
    no_ones = lambda shape: tuple(sorted(d for d in shape if d != 1))  # noqa: E731
    params = {no_ones(s) for s in param_shapes}
    for shape in collective.shapes:
        if no_ones(shape) in params:
            continue
        for full in arrays:
            if (len(shape) == len(full) and all(g % d == 0 for d, g in zip(shape, full))
                    and math.prod(shape) * num_devices > math.prod(full)):
                return True
    return False
