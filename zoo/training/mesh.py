"""Processes, devices and shardings: multi-host start-up, the device mesh, and the mapping from the
logical axis names on parameters (zoo/axes.py) to mesh axes.

Models never mention the mesh: every parameter carries logical names such as ("embed", "mlp"),
and `config.logical_axis_rules` (MaxText style) decides which mesh axis, if any, splits each
dimension. Optimizer-state leaves that mirror a parameter take that parameter's sharding, so the
whole train state is sharded from one rules table. The same table, with the batch following
`config.data_axes` (`activation_rules`), splits activations and kernel calls while the steps
trace (kernels_pallas/sharding.py).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import jax
from flax import nnx, traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kernels_pallas import sharding

# Environment variables whose presence (with more than one task) means the job was launched on
# several hosts by a scheduler that `jax.distributed.initialize()` can read by itself.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _cluster_detected() -> bool:
    # An explicit opt-in for environments that JAX recognises but whose size is not in an
    # environment variable: a Cloud TPU VM pod slice created with gcloud gives its worker list
    # through the VM metadata, which jax.distributed.initialize() reads itself
    # (tools/launch/launch.py tpu-vm sets it).
    if os.environ.get("ZOO_DISTRIBUTED", "") == "1":
        return True
    for var in _CLUSTER_SIZE_VARS:
        if int(os.environ.get(var, "1") or "1") > 1:
            return True
    # Cloud TPU VMs list every worker of the slice; one name means a single host.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def initialize_distributed(*, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts the JAX multi-process runtime when the job spans several processes.

    Explicit arguments (all three) take precedence; otherwise a SLURM / MPI / multi-host TPU
    environment is detected and left to `jax.distributed.initialize()` to read. Must run before
    anything touches a device. Returns True when the runtime was initialised.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id must be given together, "
            f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}")
    if not all(v is not None for v in explicit) and not _cluster_detected():
        return False
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return True


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills the one -1 in `mesh_shape` with the devices left over (shape checked elsewhere)."""
    shape = [int(s) for s in mesh_shape]
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = num_devices // known if known else 0
    return tuple(shape)


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The device mesh named by `config.mesh_axes`, over `devices` (default: all devices).

    Axis types are Auto on purpose: jax 0.10 defaults to Explicit, under which a
    tensor-parallel matmul demands an out_sharding on every op.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(config.mesh_shape, len(devices))
    axes = tuple(config.mesh_axes)
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def data_axes_size(mesh: Mesh, data_axes: Sequence[str]) -> int:
    """Number of batch shards: the product of the data axes' sizes."""
    return math.prod(mesh.shape[a] for a in data_axes)


def batch_sharding(mesh: Mesh, data_axes: Sequence[str]) -> NamedSharding:
    """Sharding of a [batch, ...] array: the batch split over all data axes."""
    return NamedSharding(mesh, PartitionSpec(tuple(data_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_to_partition_spec(logical_axes: Sequence[str | None] | None,
                              shape: Sequence[int], mesh: Mesh, rules) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions carry `logical_axes`.

    For each dimension, the rules for its logical name are tried in order; the first whose mesh
    axes all exist, are not yet used by another dimension of this array, have a product > 1 and
    divide the dimension wins. A rule mapping to None, an unknown name, or no fitting rule leaves
    the dimension replicated. Mesh axes of size 1 are dropped from a rule (they split nothing).
    Parameters and activations share this resolution (`kernels_pallas.sharding`).
    """
    return sharding.partition_spec(logical_axes, shape, dict(mesh.shape), rules)


def activation_rules(config) -> tuple:
    """The rules the train and eval steps trace under (`kernels_pallas.activation_sharding`):
    the batch over `config.data_axes` first, so activations and kernels split it as the input
    batch is split, then `config.logical_axis_rules` (its `activation_*` entries; names it does
    not mention follow `kernels_pallas.sharding.DEFAULT_RULES`)."""
    return ((sharding.BATCH, tuple(config.data_axes)),) + tuple(
            tuple(rule) for rule in config.logical_axis_rules)


def sequence_axis_size(config) -> int:
    """Devices on the config's `sequence` mesh axis (1 without one)."""
    return max(1, dict(zip(config.mesh_axes, config.mesh_shape)).get("sequence", 1))


def sequence_chunks(config) -> int:
    """How many equal pieces a context-parallel run cuts each sequence into: the sequence axis
    size, twice that for the load-balanced causal ring (two half-chunks per device; tasks whose
    attention is not causal may need only the axis size). Tasks check sequence lengths
    against it in `check_config`."""
    size = sequence_axis_size(config)
    cp = config.context_parallel
    return size * (2 if cp.strategy == "ring" and cp.load_balance and size > 1 else 1)


def context_parallel_options(config) -> dict:
    """Keyword arguments of `kernels_pallas.sharding.activation_sharding` for attention whose
    sequence the rules split: the strategy and the causal load balancing."""
    return dict(context_parallel=config.context_parallel.strategy,
                load_balance=bool(config.context_parallel.load_balance))


def param_shardings(abstract_state, mesh: Mesh, rules) -> dict:
    """Pure-dict tree of NamedShardings for an abstract `nnx.State` (Variables carry names).

    Variables without logical names (e.g. batch statistics created without partitioning
    metadata) are replicated.
    """
    flat = {}
    for path, variable in nnx.to_flat_state(abstract_state):
        metadata = variable.get_metadata()
        names = metadata.get("out_sharding") or metadata.get("sharding_names")
        flat[tuple(path)] = NamedSharding(
                mesh, logical_to_partition_spec(names, variable.shape, mesh, rules))
    return traverse_util.unflatten_dict(flat)


def _key_name(key) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def shardings_following_params(tree, params_shardings: Mapping, params_shapes: Mapping,
                               mesh: Mesh):
    """Shardings for an optimizer-state tree: a leaf whose key path ends with a parameter's path
    and has that parameter's shape gets the parameter's sharding (Adam moments, momentum); any
    other leaf (step counts, scalars) is replicated."""
    flat_shardings = traverse_util.flatten_dict(dict(params_shardings))
    flat_shapes = traverse_util.flatten_dict(dict(params_shapes))

    def pick(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in flat_shardings and tuple(flat_shapes[suffix]) == shape:
                return flat_shardings[suffix]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)
