"""The optimizer and learning-rate schedule named by a config (`optimizer.*`, `schedule.*`).

    clip_by_global_norm(grad_clip_norm)            when grad_clip_norm > 0
      -> adamw | lamb | sgd(momentum, nesterov)    weight decay masked (below)
    learning rate: linear warmup, then cosine | linear | constant down to end_factor * peak

Weight decay skips parameters with ndim <= 1 (biases, norm scales) and parameters whose
'/'-joined path (e.g. "blocks/0/attn/qkv/kernel") matches a regex of `optimizer.no_decay`
(position embeddings, class tokens, lookup tables): decaying those pulls them towards zero for
no regularisation benefit. The mask is computed from whatever tree optax is given at run time
(pure dicts or nnx.State), so it always has that tree's structure.

Parameter groups (`optimizer.groups`, a ConfigDict of named groups): each group has a regex
`pattern` on the parameter path and overrides any of the optimizer fields (`name`,
`learning_rate`, `weight_decay`, `b1`, `b2`, `eps`, `momentum`, `nesterov`), its own
`schedule` (`name`, `warmup_steps`, `end_factor`), or `freeze=True` (no update at all). A
parameter belongs to the first group, in name order, whose pattern it matches; the rest form
the default group (the top-level fields). Built with `optax.multi_transform`; gradient clipping
stays global. This expresses SSA's separate beta optimizer, frozen backbones and linear probes.

Layer-wise learning-rate decay (`optimizer.layer_decay` < 1, BEiT/MAE fine-tuning): a parameter
in block i (the first group of the regex `optimizer.layer_pattern` on its path) gets
lr x layer_decay^(L - i), L = number of blocks; parameters matching `optimizer.layer_zero`
(embeddings, tokens) get layer_decay^(L + 1); everything else (final norm, head) the full rate.

Gradient accumulation is the train step's job (it averages micro-batch gradients before one
update), so step counts and the schedule mean the same thing for every grad_accum_steps.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

OPTIMIZERS = ("adamw", "lamb", "sgd")
SCHEDULES = ("cosine", "linear", "constant")


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_variable(node) -> bool:
    return isinstance(node, nnx.Variable)


def param_path(key_path) -> str:
    """'/'-joined names of a jax key path ("blocks/0/attn/qkv/kernel"); the trailing "value"
    attribute of an nnx Variable is dropped so pure dicts and nnx.State give the same path."""
    names = [_key_name(k) for k in key_path]
    if names and names[-1] == "value" and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


def compile_patterns(patterns: Sequence[str],
                     field: str = "optimizer.no_decay") -> list[re.Pattern]:
    """The regexes of config field `field`; a ValueError naming the field and the entry for
    one that does not compile."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(f"config.{field} entry {pattern!r} is not a valid regex: "
                             f"{error}") from None
    return compiled


def weight_decay_mask(params: Any, no_decay: Sequence[str]) -> Any:
    """Tree of bools like `params` (True = decayed). Leaves may be arrays, ShapeDtypeStructs or
    nnx Variables; the mask has a bool where `params` has a Variable."""
    patterns = compile_patterns(no_decay)

    def decide(key_path, leaf) -> bool:
        shape = getattr(leaf, "shape", None)
        if shape is None or len(shape) <= 1:
            return False
        path = param_path(key_path)
        return not any(p.search(path) for p in patterns)

    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=_is_variable)


def make_schedule(config) -> Callable[[Any], jax.Array]:
    """lr(step) for step = number of updates already applied (0 for the first update).

    Warmup: peak * (step + 1) / warmup_steps for step < warmup_steps, so the first update is
    not wasted at lr 0 and update `warmup_steps` runs at the peak. Then cosine or linear decay
    from the peak (at step warmup_steps) to end_factor * peak (at step total_steps), held
    afterwards; "constant" stays at the peak (end_factor unused).
    """
    s, peak = config.schedule, float(config.optimizer.learning_rate)
    if s.name not in SCHEDULES:
        raise ValueError(f"config.schedule.name={s.name!r} is invalid; allowed: {SCHEDULES}")
    total, warmup, end_factor = int(config.total_steps), int(s.warmup_steps), float(s.end_factor)
    if total < 1:
        raise ValueError(f"config.total_steps={total!r} is invalid; allowed: an integer >= 1")
    if not 0 <= warmup <= total:
        raise ValueError(f"config.schedule.warmup_steps={warmup!r} is invalid; allowed: 0 <= "
                         f"warmup_steps <= total_steps={total}")
    if not (math.isfinite(end_factor) and end_factor >= 0):
        raise ValueError(f"config.schedule.end_factor={end_factor!r} is invalid; allowed: a "
                         f"finite number >= 0")
    end = end_factor * peak
    decay_steps = max(1, total - warmup)
    name = s.name

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if name == "cosine":
            decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif name == "linear":
            decayed = peak + (end - peak) * progress
        else:
            decayed = jnp.full_like(progress, peak)
        if warmup == 0:
            return decayed
        return jnp.where(step < warmup, peak * (step + 1.0) / warmup, decayed)

    return schedule


def _check_range(field: str, value: float, low: float, high: float, *, high_open: bool = True,
                 low_open: bool = False, where: str = "optimizer.") -> None:
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (math.isfinite(value) and ok_low and ok_high):
        interval = (("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]"))
        raise ValueError(f"config.{where}{field}={value!r} is invalid; allowed: a number in "
                         f"{interval}")


GROUP_FIELDS = ("pattern", "freeze", "name", "learning_rate", "weight_decay", "b1", "b2", "eps",
                "momentum", "nesterov", "schedule")
SCHEDULE_FIELDS = ("name", "warmup_steps", "end_factor")
DEFAULT_GROUP = "default"


class _Settings:
    """The fields one optimizer of a group reads: `optimizer`, `schedule`, `total_steps`."""

    def __init__(self, optimizer, schedule, total_steps):
        self.optimizer, self.schedule, self.total_steps = optimizer, schedule, total_steps


def _field(group, name, default):
    return group[name] if name in group else default


def _group_settings(config, name: str) -> _Settings:
    """The top-level optimizer/schedule settings with group `name`'s overrides applied."""
    o = ml_collections.ConfigDict(config.optimizer.to_dict())
    s = ml_collections.ConfigDict(config.schedule.to_dict())
    if name != DEFAULT_GROUP:
        group = config.optimizer.groups[name]
        for key in GROUP_FIELDS:
            if key in group and key not in ("pattern", "freeze", "schedule"):
                o[key] = group[key]
        for key, value in dict(_field(group, "schedule", {})).items():
            s[key] = value
    return _Settings(o, s, config.total_steps)


def _check_settings(settings: _Settings, where: str) -> None:
    o = settings.optimizer
    if o.name not in OPTIMIZERS:
        raise ValueError(f"config.{where}name={o.name!r} is invalid; allowed: {OPTIMIZERS}")
    _check_range("learning_rate", float(o.learning_rate), 0.0, math.inf, low_open=True,
                 where=where)
    _check_range("weight_decay", float(o.weight_decay), 0.0, math.inf, where=where)
    if o.name in ("adamw", "lamb"):
        _check_range("b1", float(o.b1), 0.0, 1.0, where=where)
        _check_range("b2", float(o.b2), 0.0, 1.0, where=where)
        _check_range("eps", float(o.eps), 0.0, math.inf, low_open=True, where=where)
    else:
        _check_range("momentum", float(o.momentum), 0.0, 1.0, where=where)
        if o.nesterov and not o.momentum:
            raise ValueError(f"config.{where}nesterov=True needs config.{where}momentum > 0")
    make_schedule(settings)


def _groups(config) -> list[tuple[str, re.Pattern, Any]]:
    """[(name, compiled pattern, group)] in name order, validated."""
    groups = config.optimizer.get("groups", None) or {}
    result = []
    for name in sorted(groups.keys()):
        group = groups[name]
        where = f"optimizer.groups.{name}"
        if name == DEFAULT_GROUP:
            raise ValueError(f"config.{where}: the name {DEFAULT_GROUP!r} is reserved for the "
                             f"parameters no group matches")
        if not isinstance(group, (ml_collections.ConfigDict, dict)):
            raise ValueError(f"config.{where}={group!r} is invalid; allowed: a ConfigDict with "
                             f"a 'pattern' and any of {GROUP_FIELDS[1:]}")
        unknown = sorted(set(group.keys()) - set(GROUP_FIELDS))
        if unknown:
            raise ValueError(f"config.{where}.{unknown[0]} is not a group field; allowed: "
                             f"{GROUP_FIELDS}")
        pattern = group.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"config.{where}.pattern={pattern!r} is invalid; allowed: a regex "
                             f"on parameter paths like 'blocks/0/attn/qkv/kernel'")
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"config.{where}.pattern={pattern!r} is not a valid regex: "
                             f"{error}") from None
        if not isinstance(_field(group, "freeze", False), bool):
            raise ValueError(f"config.{where}.freeze={group['freeze']!r} is invalid; allowed: "
                             f"True or False")
        schedule = _field(group, "schedule", {})
        bad = sorted(set(dict(schedule).keys()) - set(SCHEDULE_FIELDS))
        if bad:
            raise ValueError(f"config.{where}.schedule.{bad[0]} is not a schedule field; "
                             f"allowed: {SCHEDULE_FIELDS}")
        result.append((name, compiled, group))
    return result


def validate_optimizer_config(config) -> None:
    """Raises ValueError naming the field for any optimizer/schedule setting make_optimizer
    cannot use (call it during config validation, before building the model)."""
    o = config.optimizer
    _check_settings(_Settings(o, config.schedule, config.total_steps), "optimizer.")
    _check_range("grad_clip_norm", float(o.grad_clip_norm), 0.0, math.inf)
    compile_patterns(o.no_decay)
    for name, _, group in _groups(config):
        if not _field(group, "freeze", False):
            _check_settings(_group_settings(config, name), f"optimizer.groups.{name}.")
    _check_range("layer_decay", float(o.layer_decay), 0.0, 1.0, high_open=False, low_open=True)
    for field in ("layer_pattern", "layer_zero"):
        try:
            re.compile(o[field])
        except (re.error, TypeError) as error:
            raise ValueError(f"config.optimizer.{field}={o[field]!r} is not a valid regex: "
                             f"{error}") from None


def _base_transform(settings: _Settings, mask, lr_scale: float = 1.0):
    o = settings.optimizer
    schedule = make_schedule(settings)
    if lr_scale != 1.0:
        base = schedule

        def schedule(step):
            return base(step) * lr_scale
    weight_decay = float(o.weight_decay)
    if o.name == "adamw":
        return optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                           weight_decay=weight_decay, mask=mask)
    if o.name == "lamb":
        return optax.lamb(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                          weight_decay=weight_decay, mask=mask)
    sgd = optax.sgd(schedule, momentum=float(o.momentum) or None, nesterov=bool(o.nesterov))
    return (optax.chain(optax.add_decayed_weights(weight_decay, mask), sgd)
            if weight_decay else sgd)


def _layer_ids(config, paths: list[str]) -> tuple[dict[str, int], int]:
    """(path -> layer id, number of blocks L): blocks i -> i + 1, `layer_zero` matches -> 0,
    everything else -> L + 1."""
    o = config.optimizer
    block = re.compile(o.layer_pattern)
    zero = re.compile(o.layer_zero)
    found = {}
    for path in paths:
        match = block.search(path)
        if match:
            found[path] = int(match.group(1)) + 1
    if not found:
        raise ValueError(f"config.optimizer.layer_decay={o.layer_decay} but "
                         f"optimizer.layer_pattern={o.layer_pattern!r} matches no parameter "
                         f"(paths look like {paths[0]!r})")
    blocks = max(found.values())
    ids = {}
    for path in paths:
        ids[path] = found.get(path, 0 if zero.search(path) else blocks + 1)
    return ids, blocks


def param_labels(config, params: Any) -> Any:
    """Tree like `params` of optimizer labels: a group name (or "default"), with "@<layer>"
    appended under layer-wise decay."""
    groups = _groups(config)
    paths = [param_path(kp) for kp, _ in
             jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_variable)]
    decay = float(config.optimizer.layer_decay)
    layer_ids = _layer_ids(config, paths)[0] if decay != 1.0 else {}

    def label(key_path, _):
        path = param_path(key_path)
        name = next((n for n, pattern, _ in groups if pattern.search(path)), DEFAULT_GROUP)
        return f"{name}@{layer_ids[path]}" if layer_ids else name

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_variable)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """(optax transformation, learning-rate schedule) for config.optimizer / config.schedule.

    `params`: the trainable parameters (pure dict or nnx.State; arrays or ShapeDtypeStructs).
    Decoupled weight decay for adamw and lamb (optax: the decay is scaled by the learning
    rate); for sgd it is L2 added to the gradient before momentum. The returned schedule is
    the default group's (what the loop logs as `lr`).
    """
    validate_optimizer_config(config)
    o = config.optimizer
    schedule = make_schedule(config)
    no_decay = tuple(o.no_decay)
    decay_mask = weight_decay_mask(params, no_decay)
    if not any(jax.tree.leaves(decay_mask)) and float(o.weight_decay) > 0:
        # Not an error (a model of only vectors is legal), but worth knowing about.
        from absl import logging
        logging.warning("optimizer.weight_decay=%s applies to no parameter (all are 1-D or "
                        "match optimizer.no_decay=%s)", o.weight_decay, no_decay)

    def mask(tree):
        return weight_decay_mask(tree, no_decay)

    groups = _groups(config)
    decay = float(o.layer_decay)
    if not groups and decay == 1.0:
        optimizer = _base_transform(_Settings(o, config.schedule, config.total_steps), mask)
    else:
        labels = param_labels(config, params)
        used = sorted(set(jax.tree.leaves(labels)))
        for name, pattern, _ in groups:
            if not any(label.split("@")[0] == name for label in used):
                raise ValueError(f"config.optimizer.groups.{name}.pattern="
                                 f"{pattern.pattern!r} matches no parameter; parameter paths "
                                 f"look like {_example_path(params)!r}")
        blocks = 0
        if decay != 1.0:
            paths = [param_path(kp) for kp, _ in
                     jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_variable)]
            blocks = _layer_ids(config, paths)[1]
        transforms = {}
        for label in used:
            name, _, layer = label.partition("@")
            group = config.optimizer.groups[name] if name != DEFAULT_GROUP else {}
            if _field(group, "freeze", False):
                transforms[label] = optax.set_to_zero()
                continue
            scale = decay ** (blocks + 1 - int(layer)) if layer else 1.0
            transforms[label] = _base_transform(_group_settings(config, name), mask, scale)
        optimizer = optax.multi_transform(transforms, lambda tree: param_labels(config, tree))
    if float(o.grad_clip_norm) > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(float(o.grad_clip_norm)), optimizer)
    return optimizer, schedule


def _example_path(params) -> str:
    leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_variable)
    return param_path(leaves[0][0]) if leaves else ""
