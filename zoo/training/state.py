"""The train state and how it comes into existence already sharded.

The state is a plain dict `{"model": ..., "optimizer": ..., "step": ...}`:
  * "model": every variable of the model as a pure nested dict (parameters and non-parameter
    state such as BatchNorm statistics), so eval can restore this subtree alone;
  * "optimizer": the optax state over the trainable parameters only;
  * "step": int32 count of completed optimizer steps;
  * "ema" (only with `config.ema.decay` > 0): the moving average of "model"
    (zoo/training/ema.py), shaped and sharded like it.
Plain dicts keep the checkpoint layout independent of flax Variable classes and let the same
tree be an abstract shape, a sharding plan, a restore target or live arrays.

`ModelSkeleton` holds the model's graph (no arrays) and rebuilds modules from such dicts inside
jitted functions. The state is first described abstractly, its shardings derived from the
logical axis names, and then produced by a jit whose outputs have those shardings, so no full
unsharded copy ever exists on one device.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.sharding import Mesh

import zoo
from zoo.training import mesh as mesh_lib
from zoo.training.config import model_kwargs

Tree = Any


class ModelSkeleton:
    """A registered model's structure: graph definition, abstract variables and which of them
    are trainable parameters. Converts between modules and pure-dict model states."""

    def __init__(self, config, *, seed: int | None = None):
        kwargs = model_kwargs(config)
        name = config.model.name
        seed = config.seed if seed is None else seed
        # The builder runs inside eval_shape / jit, so the Rngs must be created inside it too.
        self._build_fresh: Callable[[], nnx.Module] = (
                lambda: zoo.create_model(name, rngs=nnx.Rngs(seed), **kwargs))
        abstract_model = nnx.eval_shape(self._build_fresh)
        self.graphdef, self.abstract_state = nnx.split(abstract_model)
        self.param_paths = frozenset(
                tuple(path) for path, _ in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)))

    def abstract_pure(self) -> dict:
        """The model state as a pure dict of ShapeDtypeStructs."""
        return nnx.to_pure_dict(self.abstract_state)

    def init_pure(self) -> dict:
        """Freshly initialised model state (call under jit to get it sharded)."""
        return nnx.to_pure_dict(nnx.state(self._build_fresh()))

    def build(self, model_state: dict) -> nnx.Module:
        """A module whose variables hold the arrays (or tracers) of `model_state`."""
        state = jax.tree.map(lambda leaf: leaf, self.abstract_state)  # fresh Variables
        nnx.replace_by_pure_dict(state, model_state)
        return nnx.merge(self.graphdef, state)

    @staticmethod
    def state_of(model: nnx.Module) -> dict:
        return nnx.to_pure_dict(nnx.state(model))

    def split(self, model_state: dict) -> tuple[dict, dict]:
        """(trainable parameters, other variables), both pure dicts."""
        flat = traverse_util.flatten_dict(model_state)
        params = {k: v for k, v in flat.items() if k in self.param_paths}
        rest = {k: v for k, v in flat.items() if k not in self.param_paths}
        return traverse_util.unflatten_dict(params), traverse_util.unflatten_dict(rest)

    @staticmethod
    def join(params: dict, rest: dict) -> dict:
        flat = traverse_util.flatten_dict(params)
        flat.update(traverse_util.flatten_dict(rest))
        return traverse_util.unflatten_dict(flat)


def abstract_train_state(skeleton: ModelSkeleton, tx: optax.GradientTransformation, *,
                         ema: bool = False) -> Tree:
    """The train state's shapes; `ema=True` adds "ema", a second copy of "model" holding the
    moving average of its variables (zoo/training/ema.py)."""
    model = skeleton.abstract_pure()
    params, _ = skeleton.split(model)
    state = {
            "model": model,
            "optimizer": jax.eval_shape(tx.init, params),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    if ema:
        state["ema"] = model
    return state


def train_state_shardings(skeleton: ModelSkeleton, abstract_state: Tree, mesh: Mesh,
                          rules) -> Tree:
    """NamedShardings for every leaf of the train state, from the logical axis rules."""
    model = mesh_lib.param_shardings(skeleton.abstract_state, mesh, rules)
    params, _ = skeleton.split(model)
    param_shapes, _ = skeleton.split(jax.tree.map(lambda a: a.shape, abstract_state["model"]))
    optimizer = mesh_lib.shardings_following_params(abstract_state["optimizer"], params,
                                                    param_shapes, mesh)
    shardings = {"model": model, "optimizer": optimizer, "step": mesh_lib.replicated(mesh)}
    if "ema" in abstract_state:
        shardings["ema"] = model  # sharded exactly like the variables it averages
    return shardings


def with_shardings(abstract: Tree, shardings: Tree) -> Tree:
    """ShapeDtypeStructs carrying shardings: restore targets and AOT-compile arguments."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def init_train_state(skeleton: ModelSkeleton, tx: optax.GradientTransformation,
                     shardings: Tree, pretrained: dict[str, Any] | None = None) -> Tree:
    """Initial train state, created directly in its shardings by one jitted function.

    `pretrained` ('/'-joined variable path -> host array in the variable's dtype, from
    zoo/training/init_from.py) replaces those variables of the fresh model before the optimizer
    and the EMA are initialised; the arrays enter the jit as arguments already laid out in their
    variables' shardings (never as compile-time constants)."""
    pretrained = dict(pretrained or {})
    flat_shardings = traverse_util.flatten_dict(shardings["model"])
    paths = {"/".join(map(str, path)): path for path in flat_shardings}

    def init(loaded):
        model = skeleton.init_pure()
        if loaded:
            flat = traverse_util.flatten_dict(model)
            flat.update({paths[name]: value for name, value in loaded.items()})
            model = traverse_util.unflatten_dict(flat)
        params, _ = skeleton.split(model)
        state = {"model": model, "optimizer": tx.init(params),
                 "step": jnp.zeros((), jnp.int32)}
        if "ema" in shardings:
            state["ema"] = jax.tree.map(jnp.copy, model)
        return state

    in_shardings = ({name: flat_shardings[paths[name]] for name in pretrained},)
    return jax.jit(init, in_shardings=in_shardings, out_shardings=shardings)(pretrained)
