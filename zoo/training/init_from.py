"""Initial weights from a file for a run that starts fresh (`config.init_from`): fine-tuning.

  config.init_from.path       the weight file (zoo/weight_files.py: .safetensors, .npz,
                              .pth/.pt/.bin/.ckpt; nothing in it is ever executed)
  config.init_from.source     how its names map to ours: a key of zoo.registry.weight_sources()
                              ("hf:gpt2", "timm:swin_tiny_patch4_window7_224", ...), whose
                              converter does the mapping, or "zoo": the file already uses our
                              variable paths ("blocks/0/attn/qkv/kernel")
  config.init_from.dont_load  regexes on our variable paths that keep their fresh initialisation
                              (a classifier for a new number of classes)
  config.init_from.overrides  converter arguments the weights do not record (num_heads, ...)

What happens (big_vision's model_init + dont_load, timm's pretrained + reset_classifier):
  * only when the run starts from scratch: a workdir with a checkpoint always resumes from it;
  * every variable the file provides (parameters and statistics such as BatchNorm's) must exist
    in the run's model with the same shape unless a dont_load regex matches it: a mismatch is a
    ConfigError naming the variable and both shapes;
  * variables of ours that the file does not provide keep their initialisation and are listed
    in the log (SSA's temperatures on GPT-2 weights). A converter marks what came from the file
    (`zoo.converters.common.record_assignments`), so the variables it initialises itself are
    never mistaken for loaded ones;
  * values are cast to the variable's dtype on the host and placed straight into their
    shardings by the jit that initialises the rest of the train state (the EMA starts from
    them). Every process reads the file itself, so it must be visible to all hosts.
"""
from __future__ import annotations

import os
import re

import numpy as np
from absl import logging
from flax import nnx, traverse_util

from zoo import registry, weight_files
from zoo.converters import common as converter_common
from zoo.training import optim

ZOO_SOURCE = "zoo"


def enabled(config) -> bool:
    return bool(config.init_from.path)


def _dont_load(config) -> list[re.Pattern]:
    return optim.compile_patterns(config.init_from.dont_load, "init_from.dont_load")


def validate(config) -> None:
    """ValueError naming the field for an unusable `config.init_from` (before compilation)."""
    init = config.init_from
    _dont_load(config)
    if not init.path:
        extra = [f for f in ("source", "dont_load", "overrides") if init[f]]
        if extra:
            raise ValueError(f"config.init_from.{extra[0]} is set but config.init_from.path is "
                             f"empty; set the weight file to load, or clear it")
        return
    allowed = sorted(registry.weight_sources()) + [ZOO_SOURCE]
    if init.source not in allowed:
        raise ValueError(f"config.init_from.source={init.source!r} is invalid; allowed: "
                         f"{allowed} ('zoo' = names are our variable paths)")
    suffix = os.path.splitext(init.path)[1].lower()
    if suffix not in weight_files.SUFFIXES:
        raise ValueError(f"config.init_from.path={init.path!r} has suffix {suffix!r}; allowed: "
                         f"{list(weight_files.SUFFIXES)}")
    if not os.path.isfile(init.path):
        raise ValueError(f"config.init_from.path={init.path!r} is not a file")
    if init.source == ZOO_SOURCE and init.overrides:
        raise ValueError("config.init_from.overrides are converter arguments; source 'zoo' "
                         "has no converter")


def _path_name(path) -> str:
    return "/".join(str(p) for p in path)


def _arrays_from_file(config) -> dict[str, np.ndarray]:
    """Our variable path -> array, for every variable the file provides."""
    init = config.init_from
    state_dict = weight_files.load_state_dict(init.path)
    if init.source == ZOO_SOURCE:
        return state_dict
    overrides = dict(init.overrides)
    with converter_common.record_assignments() as assigned:
        model = registry.weight_converter(init.source)(state_dict, rngs=nnx.Rngs(config.seed),
                                                       **overrides)
    from_file = {id(a) for a in assigned}
    return {_path_name(path): np.asarray(variable.get_value())
            for path, variable in nnx.to_flat_state(nnx.state(model))
            if id(variable.get_value()) in from_file}


def load(config, abstract_model: dict) -> dict[str, np.ndarray]:
    """The arrays to place into a fresh train state: our variable path -> host array in the
    variable's dtype. `abstract_model` is the run's model state (pure dict of shapes).
    Raises ValueError for a file that does not fit the run's model."""
    init = config.init_from
    ours = {_path_name(k): v for k, v in traverse_util.flatten_dict(abstract_model).items()}
    dont_load = _dont_load(config)
    loaded, skipped, unknown, mismatched = {}, [], [], []
    for name, array in _arrays_from_file(config).items():
        if any(p.search(name) for p in dont_load):
            skipped.append(name)
        elif name not in ours:
            unknown.append(name)
        elif tuple(array.shape) != tuple(ours[name].shape):
            mismatched.append(f"{name} {tuple(array.shape)} vs ours "
                              f"{tuple(ours[name].shape)}")
        else:
            loaded[name] = np.asarray(array).astype(ours[name].dtype)
    where = f"config.init_from.path={init.path!r} (source {init.source!r})"
    if mismatched:
        raise ValueError(f"{where}: {len(mismatched)} variable(s) do not fit "
                         f"{config.model.name}: {mismatched[:5]}; give them fresh weights with "
                         f"a regex in config.init_from.dont_load (e.g. r'^head/')")
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} variable(s) are not in {config.model.name}: "
                         f"{unknown[:5]}; check config.model.overrides, or skip them with "
                         f"config.init_from.dont_load")
    if not loaded:
        raise ValueError(f"{where}: no variable of {config.model.name} was loaded")
    fresh = sorted(set(ours) - set(loaded))
    logging.info("init_from %s: loaded %d of %d variables; %d skipped by dont_load; fresh "
                 "initialisation kept for %d: %s", init.path, len(loaded), len(ours),
                 len(skipped), len(fresh), fresh[:20] + (["..."] if len(fresh) > 20 else []))
    return loaded
