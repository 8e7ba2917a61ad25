"""Models in and out of Python: portable artifacts, weight files, and train.py runs.

  zoo.save_pretrained(model, directory)         model.safetensors + config.json (the card)
  zoo.create_model(name, pretrained=path)       from such a directory, or from a timm, Hugging
                                                Face or official checkpoint file through the
                                                registered converter (`source=` picks one when
                                                the model has several)
  zoo.load(workdir, step=None)                  (model, config, step) of a train.py run, on
                                                this process's first device; the EMA weights
                                                when the run keeps them

The artifact is the timm / Hugging Face convention: a folder with `model.safetensors` (every
variable of the model, parameters and statistics, named by its '/'-joined path,
"blocks/0/attn/qkv/kernel") and `config.json`: the model name, the builder arguments that
rebuild it, the parameter count, where the weights came from, and the SHA-256 of the weights
file, which loading checks. Nothing is pickled and nothing from the files is executed
(zoo/weight_files.py). The folder is written next to its destination and renamed into place, so
an interrupted save never leaves half an artifact.

Which registered model built a module is remembered (weakly) by `create_model`, the converters'
callers here and `load`, so `save_pretrained(model, directory)` needs no name; a module built
otherwise needs `name=` and `overrides=`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, NamedTuple

import jax
import ml_collections
import numpy as np
from flax import nnx

from zoo import registry, weight_files

ARTIFACT_FORMAT = "attention-zoo/1"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "config.json"

remember = registry.remember  # which registered model (and arguments) built a module


def _jsonable(value: Any, where: str = "overrides") -> Any:
    """Builder arguments as JSON (dtypes by name); anything else is an error naming it."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    try:
        return str(np.dtype(value))
    except TypeError:
        raise ValueError(f"save_pretrained: {where}={value!r} cannot be written to "
                         f"{CARD_NAME}; builder arguments must be numbers, strings, dtypes or "
                         f"tuples of them") from None


def _tuples(value: Any) -> Any:
    """JSON arrays back to tuples (builder arguments such as depths are tuples)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _flat_variables(model: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(jax.device_get(variable.get_value()))
            for path, variable in nnx.to_flat_state(nnx.state(model))}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _preprocessing(name: str, overrides: dict) -> dict | None:
    """The card's input recipe (zoo/preprocessing.py), at the saved model's image size."""
    from zoo import preprocessing

    recipe = preprocessing.describe(name)
    if recipe is not None and isinstance(overrides.get("image_size"), int):
        size = overrides["image_size"]
        recipe = dict(recipe, size=size, resize=recipe["resize"].replace(
                f"{recipe['size']}x{recipe['size']}", f"{size}x{size}"))
    return recipe


def save_pretrained(model: nnx.Module, directory: str, *, name: str | None = None,
                    overrides: Mapping[str, Any] | None = None, source: str = "") -> str:
    """Writes `model` as a portable artifact folder (see the module docstring); returns it.

    Arrays are gathered from any devices or mesh to the host first. `name`/`overrides`
    default to what `create_model`/`load` recorded for this module; `source` is free text
    for the card (where the weights came from)."""
    origin = registry.origin(model)
    architecture = None  # complete constructor arguments, for a model a converter built
    if name is None:
        if origin is None:
            raise ValueError("save_pretrained: this module was not built by zoo.create_model "
                             "or zoo.load; pass name= (a registered model) and overrides= (its "
                             "builder arguments)")
        name, recorded = origin
        if overrides is None:
            overrides = recorded
            architecture = registry.architecture(model)
    if name not in registry.list_models():
        raise ValueError(f"save_pretrained: name={name!r} is not a registered model; allowed: "
                         f"{registry.list_models()}")
    overrides = dict(overrides or {})
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_pretrained: {directory} is an existing file; allowed: a folder")
    variables = _flat_variables(model)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        weights = os.path.join(staging, WEIGHTS_NAME)
        weight_files.save_safetensors(variables, weights,
                                      metadata={"format": ARTIFACT_FORMAT, "model": name})
        card = {
                "format": ARTIFACT_FORMAT,
                "name": name,
                "overrides": _jsonable(overrides),
                "architecture": (None if architecture is None
                                 else _jsonable(architecture, "architecture")),
                "params": registry.count_params(model),
                "variables": len(variables),
                "source": source,
                "weights": WEIGHTS_NAME,
                "sha256": _sha256(weights),
                "preprocessing": _preprocessing(name, {**overrides, **(architecture or {})}),
                "jax_version": jax.__version__,
        }
        with open(os.path.join(staging, CARD_NAME), "w") as f:
            json.dump(card, f, indent=2)
        if os.path.isdir(directory):  # replace an earlier artifact in one step
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_card(directory: str) -> dict:
    path = os.path.join(directory, CARD_NAME)
    try:
        with open(path) as f:
            card = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a zoo artifact card ({error})") from None
    if not isinstance(card, dict) or card.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: format {card.get('format') if isinstance(card, dict) else card!r}"
                         f" is not {ARTIFACT_FORMAT!r} (written by zoo.save_pretrained)")
    return card


def _assign_by_path(model: nnx.Module, arrays: Mapping[str, np.ndarray], where: str) -> None:
    """Every variable of `model` from `arrays` (our paths); missing, extra or misshapen
    entries are one ValueError naming them."""
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    ours = {"/".join(map(str, path)): path for path in flat}
    missing = sorted(set(ours) - set(arrays))
    extra = sorted(set(arrays) - set(ours))
    wrong = [f"{name} {tuple(arrays[name].shape)} vs the model's {tuple(flat[ours[name]].shape)}"
             for name in sorted(set(ours) & set(arrays))
             if tuple(arrays[name].shape) != tuple(flat[ours[name]].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} variable(s) {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} unknown variable(s) {extra[:5]}")
    if wrong:
        problems.append(f"{len(wrong)} of another shape {wrong[:5]}")
    if problems:
        raise ValueError(f"{where} does not fit this model: " + "; ".join(problems))
    for name, path in ours.items():  # the state's Variables are the model's own
        variable = flat[path]
        variable.set_value(jax.numpy.asarray(arrays[name], dtype=variable.dtype))


def _from_artifact(name: str, directory: str, rngs, overrides: dict) -> nnx.Module:
    card = read_card(directory)
    if card["name"] != name:
        raise ValueError(f"{directory} holds a {card['name']!r} model, not {name!r}; create it "
                         f"with zoo.create_model({card['name']!r}, pretrained=...)")
    weights = os.path.join(directory, card.get("weights", WEIGHTS_NAME))
    if card.get("sha256") and _sha256(weights) != card["sha256"]:
        raise ValueError(f"{weights}: SHA-256 differs from the one in {CARD_NAME}: the weights "
                         f"file was changed or damaged after saving")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if card.get("architecture") is not None:  # a converted model: its constructor arguments
        architecture = {**_tuples(card["architecture"]), **overrides}
        model = nnx.eval_shape(lambda r: registry.build_from_architecture(
                name, architecture, rngs=r), rngs)
        kwargs = {}
    else:
        architecture = None
        kwargs = {**_tuples(card.get("overrides", {})), **overrides}
        model = nnx.eval_shape(lambda r: registry.create_model(name, rngs=r, **kwargs), rngs)
    arrays, _ = weight_files.read_safetensors(weights)
    _assign_by_path(model, arrays, weights)
    return remember(model, name, kwargs, architecture=architecture)


def _from_checkpoint_file(name: str, path: str, source: str | None, rngs,
                          overrides: dict) -> nnx.Module:
    sources = sorted(s for s, owner in registry.weight_sources().items() if owner == name)
    if source is None:
        if len(sources) != 1:
            raise ValueError(f"{path}: {name} has {len(sources) or 'no'} weight converters "
                             f"({sources}); pass source= one of them" if sources else
                             f"{path}: {name} has no converter for checkpoint files; allowed: a "
                             f"zoo.save_pretrained folder")
        source = sources[0]
    elif source not in sources:
        raise ValueError(f"source={source!r} does not build {name}; allowed: {sources}")
    from zoo import convert

    # Remembered with the widths and depths the converter read from the file: they, not
    # overrides of the registered variant, rebuild the model (a small timm Swin is no swin_t).
    return convert.from_source(source, weight_files.load_state_dict(path), rngs=rngs,
                               **overrides)


def from_pretrained(name: str, pretrained: str, *, source: str | None = None,
                    rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
    """`create_model(name, pretrained=...)`: a save_pretrained folder, or a checkpoint file."""
    pretrained = os.fspath(pretrained)
    if os.path.isdir(pretrained):
        if source is not None:
            raise ValueError("source= is for checkpoint files; a save_pretrained folder says "
                             "what it holds")
        return _from_artifact(name, pretrained, rngs, overrides)
    if not os.path.exists(pretrained):
        raise FileNotFoundError(f"pretrained={pretrained!r} does not exist; allowed: a "
                                f"zoo.save_pretrained folder or a weight file "
                                f"({', '.join(weight_files.SUFFIXES)})")
    if pretrained.endswith(".safetensors"):
        _, metadata = weight_files.read_safetensors(pretrained)
        if metadata.get("format") == ARTIFACT_FORMAT:
            raise ValueError(f"{pretrained} is the weights file of a zoo artifact; pass its "
                             f"folder ({os.path.dirname(pretrained)}), which holds the card")
    return _from_checkpoint_file(name, pretrained, source, rngs, overrides)


class LoadedRun(NamedTuple):
    model: nnx.Module
    config: ml_collections.ConfigDict
    step: int

    def evaluate(self) -> dict:
        """The run's eval metrics for this model, computed as eval.py computes them (same eval
        mesh of the local devices, batches and metrics)."""
        from zoo.training.evaluate import evaluate_model
        return evaluate_model(self.config, self.model)


def load(workdir: str, step: int | None = None, *, ema: bool | None = None) -> LoadedRun:
    """The model of a train.py run at `step` (default: the newest checkpoint), its config and
    the step, restored onto this process's first device whatever mesh trained it. `ema`:
    the moving average of the weights (default: when the run keeps one)."""
    from zoo.training import checkpoint as ckpt_lib
    from zoo.training import state as state_lib
    from zoo.training.config import model_kwargs

    from zoo import storage

    path = storage.join(workdir, "config.json")  # a local folder or a bucket (gs://...)
    try:
        config = ml_collections.ConfigDict(_tuples(json.loads(storage.read_text(path))))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not the workdir of a "
                                f"train.py run") from None
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    use_ema = float(config.ema.decay) > 0 if ema is None else bool(ema)
    if use_ema and not float(config.ema.decay) > 0:
        raise ValueError(f"ema=True but the run in {workdir} keeps no EMA (config.ema.decay="
                         f"{config.ema.decay})")
    skeleton = state_lib.ModelSkeleton(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          skeleton.abstract_pure())
    step, state = ckpt_lib.restore_model_only(storage.join(workdir, "checkpoints"),
                                              target, step, subtree="ema" if use_ema else "model")
    model = skeleton.build(state)
    return LoadedRun(remember(model, config.model.name, model_kwargs(config)), config, step)


__all__ = ["save_pretrained", "from_pretrained", "load", "LoadedRun", "read_card"]
