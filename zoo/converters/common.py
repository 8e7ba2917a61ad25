"""Shared machinery of the weight converters in this package.

A converter reads a `state_dict` (name -> array; torch tensors are accepted too, without
importing torch), builds the zoo model abstractly (shapes only, no random init for weights about
to be replaced), assigns every array with an explicit layout change, and then insists that
every array was used and every model variable was set: a partial import is a ValueError naming
the keys, never a silently half-random model.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def to_numpy(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.number):  # jnp's test knows ml_dtypes' bfloat16
        raise ValueError(f"state_dict[{name!r}] must be a numeric array, got dtype "
                         f"{array.dtype}")
    return array


class StateDictReader:
    """Hands out state_dict arrays by key and remembers which ones were used."""

    def __init__(self, state_dict: Mapping[str, Any]):
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a mapping of name -> array, got "
                             f"{type(state_dict).__name__}")
        # timm's BatchNorm step counters carry no weights.
        self.arrays = {k: v for k, v in state_dict.items()
                       if not k.endswith("num_batches_tracked")}
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.arrays

    def get(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise ValueError(f"state_dict has no {key!r}, which this architecture needs")
        self.used.add(key)
        return to_numpy(key, self.arrays[key])

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.arrays:
            raise ValueError(f"state_dict has no {key!r}, which this architecture needs")
        return tuple(np.shape(self.arrays[key]))

    def check_all_used(self, model_name: str) -> None:
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            raise ValueError(f"state_dict has {len(unused)} array(s) the {model_name} "
                             f"converter does not map: {unused[:10]}"
                             + (" ..." if len(unused) > 10 else ""))


def check_overrides(overrides: Mapping[str, Any], *, model_args: Sequence[str],
                    inferred: Sequence[str], model: str, entry_point: str,
                    fixed: Sequence[str] = ()) -> None:
    """Overrides a converter accepts: constructor arguments (`model_args`) that the state_dict
    does not fix. `inferred` are read from the arrays; `fixed` are set by the converter
    itself from other evidence."""
    clash = sorted(set(overrides) & set(inferred))
    if clash:
        raise ValueError(f"{clash} are read from the state_dict and cannot be overridden")
    allowed = sorted(set(model_args) - set(inferred) - set(fixed))
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {model} argument(s) {unknown} for {entry_point}; allowed: "
                         f"{allowed}")


# Arrays `assign` wrote while `record_assignments` is active (innermost recorder last).
_RECORDERS: list[list[jax.Array]] = []


@contextlib.contextmanager
def record_assignments():
    """Collects every array a converter assigns from its state_dict, so a caller can tell
    weights that came from the file from variables the converter initialised itself (SSA's
    new temperatures on GPT-2 weights). Yields the list, filled as the converter runs."""
    assigned: list[jax.Array] = []
    _RECORDERS.append(assigned)
    try:
        yield assigned
    finally:
        _RECORDERS.remove(assigned)


def assign(variable: nnx.Variable, value: np.ndarray, where: str) -> None:
    if tuple(variable.shape) != value.shape:
        raise ValueError(f"{where}: state_dict array of shape {value.shape} does not fit the "
                         f"model's {tuple(variable.shape)}")
    # The model is built abstractly (shapes only), so the value is replaced, not written into.
    array = jnp.asarray(value, dtype=variable.dtype)
    variable.set_value(array)
    for recorder in _RECORDERS:
        recorder.append(array)


# Constructor arguments of the models converters build while `record_architectures` is active.
_ARCHITECTURES: list[list[dict]] = []


@contextlib.contextmanager
def record_architectures():
    """Collects the constructor arguments (`note_architecture`) of the models a converter
    builds, so that `zoo.save_pretrained` can write what rebuilds a converted model: widths and
    depths read from a state_dict are not builder overrides of the registered variant."""
    built: list[dict] = []
    _ARCHITECTURES.append(built)
    try:
        yield built
    finally:
        _ARCHITECTURES.remove(built)


def note_architecture(architecture: Mapping[str, Any]) -> None:
    """Records the constructor arguments (without rngs) of the model a converter returns."""
    for recorder in _ARCHITECTURES:
        recorder.append(dict(architecture))


def build_abstract(build: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs | None, *,
                   architecture: Mapping[str, Any] | None = None):
    """Shapes-only model: no random initialisation is run for weights about to be replaced.
    `architecture`: the constructor arguments `build` passes (`note_architecture`), given for
    the model the converter returns."""
    if architecture is not None:
        note_architecture(architecture)
    return nnx.eval_shape(build, rngs if rngs is not None else nnx.Rngs(0))


def check_all_set(model: nnx.Module, model_name: str) -> None:
    missing = [".".join(map(str, path)) for path, value in nnx.to_flat_state(nnx.state(model))
               if isinstance(value.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"the state_dict leaves {len(missing)} {model_name} variable(s) "
                         f"unset: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
