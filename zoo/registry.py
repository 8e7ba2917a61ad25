"""Model registry: `@register_model` in each model file, `create_model`, `list_models`,
`model_card` (timm's pattern, NNX modules).

A builder is a function `builder(*, rngs: nnx.Rngs, **overrides) -> nnx.Module`. Registration
records the paper facts the card reports; the parameter count is measured (abstract build, no
memory) the first time a card is asked for.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib
import inspect
import weakref
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from zoo import fast_init


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nnx.Module]
    paper: str
    reference: str
    default_input: dict[str, tuple[tuple[int, ...], str]]  # input name -> (shape w/o batch, dtype)
    config: str  # e.g. "configs/vit.py:ti16"
    tiny: dict[str, Any]  # overrides giving a CPU-sized instance, for the all-models test
    tiny_input: dict[str, tuple[tuple[int, ...], str]]  # that instance's input (default_input)
    paper_params: float | None  # millions, as published (None if the paper gives none)
    paper_params_tolerance: float  # relative; published counts are rounded (5.5M, 86M)
    notes: str
    # Weight sources this model imports: source -> "module:function" of its converter, e.g.
    # "timm:halonet_h1" -> "zoo.converters.halonet:halonet_from_timm" (timm keeps its
    # checkpoint_filter_fn beside default_cfgs the same way). Imported on first use.
    weights: dict[str, str] = dataclasses.field(default_factory=dict)
    # Resampling of the eval resize (config.data.interpolation of its config file); what
    # `zoo.preprocess` and the card's "preprocessing" use for image classifiers.
    eval_interpolation: str = "bilinear"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str | None = None, *, paper: str, reference: str,
                   default_input: dict[str, tuple[tuple[int, ...], str]], config: str,
                   tiny: dict[str, Any] | None = None, paper_params: float | None = None,
                   paper_params_tolerance: float = 0.02, notes: str = "",
                   tiny_input: dict[str, tuple[tuple[int, ...], str]] | None = None,
                   weights: Mapping[str, str] | None = None,
                   eval_interpolation: str = "bilinear"):
    """Decorator registering `builder` under `name` (default: the function name).

    `weights` maps each checkpoint source the model imports ("<format>:<their model name>" or
    "<format>") to its converter, "module:function" with the signature
    `converter(state_dict, *, rngs=None, **overrides) -> model`.
    """

    def decorator(builder):
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        for source, target in (weights or {}).items():
            owner = next((e.name for e in _REGISTRY.values() if source in e.weights), None)
            if owner is not None:
                raise ValueError(f"weight source {source!r} of {key!r} already belongs to "
                                 f"{owner!r}")
            if target.count(":") != 1:
                raise ValueError(f"weights[{source!r}]={target!r} must be 'module:function'")
        _REGISTRY[key] = ModelEntry(key, builder, paper, reference, dict(default_input), config,
                                    dict(tiny or {}), dict(tiny_input or default_input),
                                    paper_params, paper_params_tolerance, notes,
                                    dict(weights or {}), eval_interpolation)
        return builder

    return decorator


def model_arguments(model_class: type) -> tuple[str, ...]:
    """The keyword arguments of `model_class`'s constructor a config may set (all but rngs)."""
    return tuple(name for name in inspect.signature(model_class.__init__).parameters
                 if name not in ("self", "rngs"))


def variant_builder(name: str, model_class: type, defaults: Mapping[str, Any] | None = None,
                    *, fixed: Mapping[str, Any] | None = None, extra: Sequence[str] = (),
                    exclude: Sequence[str] = (), prepare: Callable[[dict], dict] | None = None,
                    doc: str = "") -> Callable[..., nnx.Module]:
    """`builder(*, rngs, **overrides)` -> `model_class` built from `defaults` updated by the
    overrides: the one place where override names are checked, in one line.

    Args:
        fixed: constructor arguments the builder sets and overrides may not (VSA's block).
        extra: builder-only arguments, turned into constructor arguments by `prepare(args)`
            (HaloNet's rv/rb width multipliers).
        exclude: constructor arguments only `prepare` sets (HaloNet's per-stage widths).
    """
    fixed = dict(fixed or {})
    allowed = tuple(a for a in model_arguments(model_class)
                    if a not in fixed and a not in exclude) + tuple(extra)
    base = dict(defaults or {})

    def builder(*, rngs: nnx.Rngs, **overrides):
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {name} argument(s) {unknown}; allowed: {list(allowed)}")
        args = {**base, **overrides}
        if prepare is not None:
            args = prepare(args)
        return model_class(**args, **fixed, rngs=rngs)

    def from_architecture(*, rngs: nnx.Rngs, **architecture):
        """The model class from complete constructor arguments (what a weight converter read
        from a state_dict), with this variant's fixed ones; no defaults, no `prepare`."""
        return model_class(**architecture, **fixed, rngs=rngs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{model_class.__name__} {name}. {doc}".strip()
    builder.arguments = allowed
    builder.from_architecture = from_architecture
    return builder


def register_variant(name: str, model_class: type, defaults: Mapping[str, Any] | None = None,
                     *, fixed: Mapping[str, Any] | None = None, extra: Sequence[str] = (),
                     exclude: Sequence[str] = (), prepare: Callable[[dict], dict] | None = None,
                     **card) -> Callable[..., nnx.Module]:
    """Registers `name` with a `variant_builder` (same arguments) and returns the builder;
    `card` holds the `register_model` facts (paper, reference, default_input, config, tiny,
    paper_params, notes, ...)."""
    builder = variant_builder(name, model_class, defaults, fixed=fixed, extra=extra,
                              exclude=exclude, prepare=prepare, doc=card.get("notes", ""))
    register_model(name, **card)(builder)
    return builder


def _entry(name: str) -> ModelEntry:
    _import_model_files()
    if name not in _REGISTRY:
        close = fnmatch.filter(sorted(_REGISTRY), f"*{name.split('_')[0]}*")
        raise ValueError(f"unknown model {name!r}; registered: {sorted(_REGISTRY)}"
                         + (f" (did you mean one of {close}?)" if close else ""))
    return _REGISTRY[name]


# module -> (registered name, builder keyword arguments, constructor arguments or None): what
# zoo.save_pretrained writes in the card. Weak, so the registry never keeps a model alive.
_ORIGINS: "weakref.WeakKeyDictionary[nnx.Module, tuple[str, dict, dict | None]]" = (
        weakref.WeakKeyDictionary())


def remember(model: nnx.Module, name: str, overrides: Mapping[str, Any], *,
             architecture: Mapping[str, Any] | None = None) -> nnx.Module:
    """Records that registered model `name` with builder arguments `overrides` is `model`;
    or, for a model a weight converter built, with complete constructor `architecture`
    (`build_from_architecture`)."""
    _ORIGINS[model] = (name, dict(overrides), None if architecture is None
                       else dict(architecture))
    return model


def origin(model: nnx.Module) -> tuple[str, dict] | None:
    """(registered name, builder arguments) of a module built through the registry."""
    found = _ORIGINS.get(model)
    return None if found is None else found[:2]


def architecture(model: nnx.Module) -> dict | None:
    """The complete constructor arguments of a module a weight converter built, else None."""
    found = _ORIGINS.get(model)
    return None if found is None else found[2]


def build_from_architecture(name: str, architecture: Mapping[str, Any], *,
                            rngs: nnx.Rngs) -> nnx.Module:
    """Registered model `name`'s class built from complete constructor arguments (as recorded
    by `architecture`), with the variant's fixed arguments."""
    build = getattr(_entry(name).builder, "from_architecture", None)
    if build is None:
        raise ValueError(f"{name} was not registered with register_variant; it cannot be "
                         "rebuilt from constructor arguments")
    return build(rngs=rngs, **architecture)


def create_model(name: str, *, rngs: nnx.Rngs | None = None, abstract: bool = False,
                 pretrained: str | None = None, source: str | None = None,
                 **overrides) -> nnx.Module:
    """Builds registered model `name`.

    Args:
        name: a name from `list_models()`.
        rngs: parameter rngs; default `nnx.Rngs(0)`.
        abstract: build shapes only (`nnx.eval_shape`): parameters are `jax.ShapeDtypeStruct`s
            carrying their logical axis names, nothing is allocated. Used for param counts,
            sharding plans and restoring checkpoints.
        pretrained: weights to load (zoo/pretrained.py): a `zoo.save_pretrained` folder, or a
            timm / Hugging Face / official checkpoint file (.safetensors, .pth/.bin, .npz) that
            the model's registered converter reads; nothing in a file is ever executed.
        source: which converter reads a checkpoint file, when the model has several
            (`weights_from` in its card).
        **overrides: passed to the builder (width, depth, num_classes, dtype, ...).
    """
    entry = _entry(name)
    if pretrained is not None:
        if abstract:
            raise ValueError("create_model: abstract=True builds shapes only; it cannot load "
                             "pretrained= weights")
        from zoo import pretrained as pretrained_lib
        return pretrained_lib.from_pretrained(name, pretrained, source=source, rngs=rngs,
                                              **overrides)
    if source is not None:
        raise ValueError("create_model: source= only applies with pretrained=")
    if rngs is None:
        rngs = nnx.Rngs(0)
    if abstract:
        # rngs goes in as an argument: nnx.eval_shape traces it, a closure would mutate it
        # from another trace level.
        return nnx.eval_shape(lambda r: entry.builder(rngs=r, **overrides), rngs)
    # Draws come from a few shared, bucketed programs as host arrays (zoo/fast_init.py): the
    # same bits as plain eager initialisation, without one compilation per parameter shape.
    with fast_init.host_random():
        model = entry.builder(rngs=rngs, **overrides)
    return remember(fast_init.to_device(model), name, overrides)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _import_model_files()
    return sorted(fnmatch.filter(_REGISTRY, pattern))


def weight_sources(pattern: str = "*") -> dict[str, str]:
    """Checkpoint sources with a converter (matching a shell-style pattern) -> model name."""
    _import_model_files()
    return {source: entry.name for entry in sorted(_REGISTRY.values(), key=lambda e: e.name)
            for source in entry.weights if fnmatch.fnmatch(source, pattern)}


def weight_converter(source: str) -> Callable[..., nnx.Module]:
    """The converter registered for checkpoint `source` (a key of `weight_sources()`)."""
    owner = weight_sources().get(source)
    if owner is None:
        raise ValueError(f"no converter for weight source {source!r}; available: "
                         f"{sorted(weight_sources())}")
    module, _, function = _REGISTRY[owner].weights[source].partition(":")
    return getattr(importlib.import_module(module), function)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (works on abstract models)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(np.prod(x.shape) for x in leaves))


@functools.lru_cache(maxsize=None)
def _measured_params(name: str) -> int:
    return count_params(create_model(name, abstract=True))


def model_card(name: str) -> dict[str, Any]:
    """Paper, reference code, parameter count (measured), default input, its preprocessing (image
    classifiers; None otherwise, see zoo/preprocessing.py) and config file."""
    entry = _entry(name)
    from zoo import preprocessing
    return {
            "name": entry.name,
            "paper": entry.paper,
            "reference": entry.reference,
            "params": _measured_params(name),
            "paper_params_millions": entry.paper_params,
            "paper_params_tolerance": entry.paper_params_tolerance,
            "default_input": {k: {"shape": list(s), "dtype": d}
                              for k, (s, d) in entry.default_input.items()},
            "preprocessing": preprocessing.describe(name),
            "config": entry.config,
            "weights_from": sorted(entry.weights),
            "notes": entry.notes,
    }


def tiny_overrides(name: str) -> dict[str, Any]:
    """Overrides that make `name` CPU-test sized (used by the all-models test)."""
    return dict(_entry(name).tiny)


def tiny_input(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Input of the `tiny_overrides` instance (a smaller image where the model allows it)."""
    return dict(_entry(name).tiny_input)


def default_input(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    return dict(_entry(name).default_input)


# Model files register themselves on import. Listed here (not discovered) so that importing
# `zoo` stays cheap and a broken model file fails loudly by name.
_MODEL_MODULES: tuple[str, ...] = (
        "zoo.vit",
        "zoo.halonet",
        "zoo.ssa",
        "zoo.swin",
        "zoo.vsa",
        "zoo.fit",
        "zoo.mae",
        "zoo.nvist",
)


@functools.lru_cache(maxsize=None)
def _import_model_files() -> None:
    for module in _MODEL_MODULES:
        importlib.import_module(module)
