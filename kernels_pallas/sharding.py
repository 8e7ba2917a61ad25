"""Kernels on a device mesh: logical activation names, the rules context, and shard-mapped calls.

Why this exists: a `pallas_call` has no partitioning rule. Under a sharded `jax.jit`, XLA therefore
all-gathers a kernel's operands and runs the whole problem on every device, which costs N times
the work and N times the activation memory, and nothing warns about it. So every kernel entry point
(`kernels_pallas.attention`, `kernels_pallas.halo.halo_attention`) runs its kernel per shard under
`jax.shard_map` whenever a mesh is active (`shard_kernel`).

No kernel names a mesh axis. Each operand dimension carries a *logical activation name*
(`ACTIVATION_AXES`, MaxText's `activation_*` names), and a rules table maps names to mesh axes,
with the same syntax and resolution as the parameter rules (`logical_axis_rules`):
  * per dimension, the rules for its name are tried in order, and the first rule wins if all its
    mesh axes exist, are still free in this array, have a product > 1 and divide the dimension;
  * a rule whose target is None stops the search (replicate);
  * a name without a fitting rule is replicated;
  * mesh axes of size 1 are dropped from a rule (they split nothing).
Names that the active table does not mention take their `DEFAULT_RULES` entry. So a rules table
written for parameters alone still shards activations: batch over the data-parallel axes, heads
and MLP hidden units over `tensor`.

Where the mesh and rules come from, in this order:
  1. inside a `shard_map` (axes already Manual): the current abstract mesh, and only the axes
     that are still automatic are split;
  2. `activation_sharding(mesh, rules)`, which the training loop enters while it traces its
     step;
  3. jax's own mesh context (`with jax.set_mesh(mesh):` around a jitted call), with
     `DEFAULT_RULES`.
Outside any mesh, `shard_kernel` calls the kernel directly and `constrain` returns its input.
Under the mesh, `shard_kernel` maps the kernel with `check_vma=False`: pallas_call has no
varying-manual-axes typing rule (tested with jax 0.10.2; not yet run on 0.11).

`per_shard` is the same shard-mapped call for XLA operations whose automatic partitioning is
wrong or wasteful (zoo/vsa.py's depthwise convolution). `record_kernel_calls` lists how each
kernel call of a traced function was split (the mesh tests read it).

Kernels read whole sequences and windows, so a kernel never splits a sequence, height or width
dimension. The one exception is attention whose sequence the rules split (`activation_length`
onto a `sequence` axis): `kernels_pallas.attention` then runs a context-parallel strategy
(kernels_pallas/context_parallel.py) per shard, chosen by `activation_sharding(...,
context_parallel=)`. Batch dimensions
follow the rules and fall back to replication when the batch does not divide. Heads are
strict: when the heads' mesh axes cannot divide the head count, the result is a `ShardingError`
(a ValueError) that names both numbers, not a silent replication.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH = "activation_batch"
LENGTH = "activation_length"
HEIGHT = "activation_height"
WIDTH = "activation_width"
EMBED = "activation_embed"
HEADS = "activation_heads"
KV = "activation_kv"
MLP = "activation_mlp"
VOCAB = "activation_vocab"

# The activation vocabulary (parameters have their own names, zoo/axes.py): the same width is
# sharded differently as a weight (FSDP splits "embed") and as an activation (batch is split).
ACTIVATION_AXES = {
        BATCH: "examples of a batch (windows / groups folded into it count as batch)",
        LENGTH: "tokens of a sequence (queries, keys, latents, rays)",
        HEIGHT: "rows of a 2-D feature map",
        WIDTH: "columns of a 2-D feature map",
        EMBED: "model width of the residual stream / channels of a feature map",
        HEADS: "attention heads",
        KV: "per-head query/key/value width",
        MLP: "hidden units of a feed-forward block",
        VOCAB: "logits over a vocabulary or classes",
}

# Data parallelism over every data axis (fsdp included: FSDP is data parallelism with sharded
# weights), then either one alone for a batch that only divides one of them; heads, MLP hidden
# units and vocabulary logits over `tensor` (Megatron); everything else whole.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
        (BATCH, ("data", "fsdp")),
        (BATCH, "data"),
        (BATCH, "fsdp"),
        (HEADS, "tensor"),
        (MLP, "tensor"),
        (VOCAB, "tensor"),
        (LENGTH, None),
        (HEIGHT, None),
        (WIDTH, None),
        (EMBED, None),
        (KV, None),
)


class ShardingError(ValueError):
    """An operand the mesh cannot split as the rules require (heads vs the tensor axis)."""


@dataclasses.dataclass(frozen=True)
class _Context:
    mesh: Mesh | None
    rules: tuple
    # How attention runs when the rules split its sequence (kernels_pallas/context_parallel.py).
    context_parallel: str = "ring"
    load_balance: bool = True


_ACTIVE: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(
        "kernels_pallas_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None = None, rules: Sequence | None = None, *,
                        context_parallel: str = "ring", load_balance: bool = True):
    """Within this context, kernels run shard-mapped over `mesh` and `constrain` applies `rules`.

    Enter it *inside* the function that `jax.jit` traces (the train step does), or around the
    first call that traces it: the context is read at trace time. `mesh=None` uses jax's mesh
    context (`jax.set_mesh`). `rules` are (logical name, mesh axis | tuple of axes | None) pairs;
    names they do not mention follow `DEFAULT_RULES`. When the rules split `activation_length`
    (context parallelism), attention runs with strategy `context_parallel` ("ring" or
    "all_to_all"); `load_balance` selects the zigzag layout for a causal ring.
    """
    table = tuple((str(name), target) for name, target in (rules or ())) + DEFAULT_RULES
    token = _ACTIVE.set(_Context(mesh, table, str(context_parallel), bool(load_balance)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@dataclasses.dataclass(frozen=True)
class KernelCall:
    """How one kernel call was partitioned (recorded at trace time by `record_kernel_calls`)."""
    what: str  # the entry point: "attention", "halo_attention"
    shapes: tuple[tuple[int, ...], ...]  # global shapes of the array operands (None left out)
    in_specs: tuple[PartitionSpec, ...]  # their PartitionSpecs (empty outside a mesh)
    out_spec: PartitionSpec
    axis_sizes: tuple[tuple[str, int], ...]  # the mesh axes that could be split, with sizes
    result_shape: tuple[int, ...]  # global shape of the result


_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar(
        "kernels_pallas_kernel_calls", default=None)


@contextlib.contextmanager
def record_kernel_calls():
    """Collects a `KernelCall` for every kernel call traced inside the context (under a mesh
    or not: outside one, the specs are empty). For tests and for checking a new model:

        with kernels_pallas.sharding.record_kernel_calls() as calls:
            train_step.lower(state, batch)
        for call in calls: print(call.what, call.in_specs[0])
    """
    calls: list[KernelCall] = []
    token = _RECORDING.set(calls)
    try:
        yield calls
    finally:
        _RECORDING.reset(token)


def _active_mesh() -> tuple[Any, dict[str, int], tuple]:
    """(mesh for shard_map / NamedSharding, sizes of the axes that may be split, rules).

    The mesh is None when no mesh is active; the sizes are then empty.
    """
    context = _ACTIVE.get()
    rules = context.rules if context is not None else DEFAULT_RULES
    abstract = jax.sharding.get_abstract_mesh()
    if not abstract.empty and abstract.manual_axes:
        # Inside a shard_map: nest over the axes that are still automatic.
        manual = set(abstract.manual_axes)
        free = {a: s for a, s in abstract.shape.items() if a not in manual}
        return (abstract if free else None), free, rules
    if context is not None and context.mesh is not None:
        return context.mesh, dict(context.mesh.shape), rules
    if not abstract.empty:
        return abstract, dict(abstract.shape), rules
    return None, {}, rules


def _rule_groups(rules) -> dict[str, list[tuple[str, ...]]]:
    """logical name -> candidate mesh-axis groups in rule order (() = an explicit None rule)."""
    table: dict[str, list[tuple[str, ...]]] = {}
    for logical, target in rules:
        if target is None:
            group: tuple[str, ...] = ()
        elif isinstance(target, str):
            group = (target,)
        else:
            group = tuple(target)
        table.setdefault(logical, []).append(group)
    return table


def resolve_axes(names: Sequence[str | None] | None, shape: Sequence[int],
                 axis_sizes: Mapping[str, int], rules, *,
                 require_divisible: bool = True) -> tuple[tuple[str, ...] | None, ...]:
    """The mesh axes splitting each dimension (None: replicated), by the rules (module doc).

    `require_divisible=False` ignores divisibility; `shard_kernel` uses it to tell "a rule
    asks for a split that this size does not allow" apart from "no rule applies".
    """
    if not names:
        return tuple(None for _ in shape)
    table = _rule_groups(rules)
    used: set[str] = set()
    chosen_axes: list[tuple[str, ...] | None] = []
    for name, dim in zip(names, shape):
        chosen = None
        for group in table.get(name, []) if name is not None else []:
            if not group:
                break  # an explicit None rule: replicate, look no further
            if any(a not in axis_sizes for a in group):
                continue
            group = tuple(a for a in group if axis_sizes[a] > 1)
            size = math.prod(axis_sizes[a] for a in group)
            if not group or used.intersection(group):
                continue
            if require_divisible and dim % size:
                continue
            chosen = group
            break
        if chosen is not None:
            used.update(chosen)
        chosen_axes.append(chosen)
    return tuple(chosen_axes)


def _spec(axes: Sequence[tuple[str, ...] | None]) -> PartitionSpec:
    return PartitionSpec(*(None if a is None else a[0] if len(a) == 1 else a for a in axes))


def partition_spec(names: Sequence[str | None] | None, shape: Sequence[int],
                   axis_sizes: Mapping[str, int], rules) -> PartitionSpec:
    """PartitionSpec of an array of `shape` whose dimensions carry logical `names`."""
    if not names:
        return PartitionSpec()
    return _spec(resolve_axes(names, shape, axis_sizes, rules))


def context_parallel_settings() -> tuple[str, bool]:
    """(strategy, load_balance) for attention whose sequence is split (module doc)."""
    context = _ACTIVE.get()
    if context is None:
        return "ring", True
    return context.context_parallel, context.load_balance


def sequence_split(names: Sequence[str | None], shape: Sequence[int],
                   dim: int) -> tuple[tuple[str, ...], int] | None:
    """(mesh axes, their total size) splitting dimension `dim` of an array with logical
    `names` under the rules in force, or None when it stays whole (or no mesh is active).
    The kernel entry points use it to tell a context-parallel call from an ordinary one."""
    mesh, sizes, rules = _active_mesh()
    if mesh is None:
        return None
    group = resolve_axes(names, shape, sizes, rules)[dim]
    if group is None:
        return None
    return group, math.prod(sizes[a] for a in group)


def check_sequence_divides(names: Sequence[str | None], shape: Sequence[int], dim: int, *,
                           what: str) -> None:
    """Raises a `ShardingError` when the rules ask to split dimension `dim` (a sequence) but
    its size does not divide: the sequence axis would silently repeat the work instead."""
    mesh, sizes, rules = _active_mesh()
    if mesh is None:
        return
    wanted = resolve_axes(names, shape, sizes, rules, require_divisible=False)[dim]
    if wanted is None or resolve_axes(names, shape, sizes, rules)[dim] is not None:
        return
    size = math.prod(sizes[a] for a in wanted)
    raise ShardingError(
            f"{what}: a sequence of {shape[dim]} tokens cannot be split over mesh axes "
            f"{wanted} of size {size} (rule {names[dim]} -> {wanted}); use a length divisible "
            f"by {size} (a ViT: pool='gap', no class token), or map {names[dim]} to None")


@contextlib.contextmanager
def groups_in_batch():
    """Within this context, the batch dimension of activations holds a sequence's groups
    folded in ([B * groups, tokens per group, ...], FIT's local and read/write layers), so the
    mesh axes that split the sequence (`activation_length`) split that batch instead, beside
    the data axes, and lengths stay whole, so each group's attention stays on one device.
    (XLA may still re-lay data out between the folded and the sequence-split forms; see
    zoo/fit_trunk.py.)
    Outside a mesh, or without a sequence split, it changes nothing."""
    context = _ACTIVE.get()
    rules = context.rules if context is not None else DEFAULT_RULES
    table = _rule_groups(rules)
    batch = next((g for g in table.get(BATCH, []) if g), None)
    length = next(iter(table.get(LENGTH, [])), ())
    if not batch or not length:
        yield
        return
    folded = ((BATCH, batch + tuple(a for a in length if a not in batch)), (LENGTH, None))
    token = _ACTIVE.set(dataclasses.replace(context, rules=folded + rules) if context
                        else _Context(None, folded + rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_rules() -> tuple:
    """The rules table in force (`DEFAULT_RULES` outside `activation_sharding`)."""
    return _active_mesh()[2]


def constrain(x, names: Sequence[str | None]):
    """`x` with a sharding constraint from its logical activation `names`; unchanged outside a
    mesh. Models call it at block boundaries, so every mesh partitions activations as the rules
    say instead of as the propagation happens to guess."""
    mesh, sizes, rules = _active_mesh()
    if mesh is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape "
                         f"{tuple(x.shape)}")
    spec = partition_spec(names, x.shape, sizes, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_kernel(kernel: Callable, operands: Sequence[Any],
                 names: Sequence[Sequence[str | None] | None], out_names: Sequence[str | None],
                 *, what: str):
    """`kernel(*operands)`, per shard under `jax.shard_map` when a mesh is active (see
    `per_shard`), recorded for `record_kernel_calls`."""
    result, in_specs, out_spec, sizes = _per_shard(kernel, operands, names, out_names, what)
    calls = _RECORDING.get()
    if calls is not None:
        calls.append(KernelCall(
                what, tuple(tuple(x.shape) for x in operands if x is not None), in_specs,
                out_spec, tuple(sorted(sizes.items())), tuple(result.shape)))
    return result


def per_shard(fn: Callable, operands: Sequence[Any],
              names: Sequence[Sequence[str | None] | None], out_names: Sequence[str | None],
              *, what: str):
    """`fn(*operands)`, per shard under `jax.shard_map` when a mesh is active.

    For kernels (which XLA cannot partition) and for the few XLA ops that its partitioner
    gets wrong (see zoo/vsa.py's depthwise convolution).

    Args:
        fn: a function of the operands (None operands are passed through as None) that
            returns one array.
        operands: arrays or None. The first one is the primary operand: its batch and head
            sizes fix how those names are split, and the other operands follow. A dimension of
            another operand that is 1 where the primary's is not (a broadcast bias) stays whole.
        names: per operand, one logical name (or None: never split) per dimension; None for
            an operand that stays whole.
        out_names: logical names of the result's dimensions.
        what: the caller's name, for error messages.
    """
    return _per_shard(fn, operands, names, out_names, what)[0]


def _per_shard(fn, operands, names, out_names, what):
    """(result, in_specs, out_spec, splittable axis sizes) of `per_shard`."""
    mesh, sizes, rules = _active_mesh()
    if mesh is None:
        return fn(*operands), (), PartitionSpec(), {}
    primary, primary_names = operands[0], names[0]
    axes = resolve_axes(primary_names, primary.shape, sizes, rules)
    wanted = resolve_axes(primary_names, primary.shape, sizes, rules, require_divisible=False)
    for name, dim, got, want in zip(primary_names, primary.shape, axes, wanted):
        if name == HEADS and want is not None and got != want:
            size = math.prod(sizes[a] for a in want)
            axes_text = want[0] if len(want) == 1 else want
            raise ShardingError(
                    f"{what}: {dim} attention heads cannot be split over mesh axis "
                    f"{axes_text!r} of size {size} (rule {HEADS} -> {axes_text!r}); use a head "
                    f"count divisible by {size}, a mesh whose {axes_text!r} size divides {dim}, "
                    f"or map {HEADS} to None in logical_axis_rules")
    assignment = {name: (dim, group) for name, dim, group in
                  zip(primary_names, primary.shape, axes) if name is not None}

    def spec_for(operand_names, shape):
        dims = []
        for name, dim in zip(operand_names or (None,) * len(shape), shape):
            size, group = assignment.get(name, (None, None))
            dims.append(group if group is not None and dim == size else None)
        return _spec(dims)

    present = [i for i, x in enumerate(operands) if x is not None]
    in_specs = tuple(spec_for(names[i], operands[i].shape) for i in present)
    # The result's batch and heads are the primary's, so they split the same way.
    out_spec = _spec([assignment.get(name, (None, None))[1] if name is not None else None
                      for name in out_names])

    def per_device(*arrays):
        full = [None] * len(operands)
        for i, array in zip(present, arrays):
            full[i] = array
        return fn(*full)

    # check_vma=False: pallas_call has no varying-manual-axes typing rule. Correctness does not
    # depend on it: every output dimension is split exactly as the operands it comes from, and
    # shard_map's transpose sums the cotangents of operands that are not split (a broadcast bias,
    # the relative tables) over the devices, which the tests compare with one device.
    result = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                           check_vma=False)(*[operands[i] for i in present])
    return result, in_specs, out_spec, sizes
