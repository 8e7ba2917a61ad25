"""Weight import from PyTorch checkpoints: `from_timm(timm_model_name, state_dict)`.

A converter reads a timm `state_dict` (name -> array; torch tensors are accepted too), infers
the architecture it describes (widths, depths, heads, classes) from the array shapes, builds
the zoo model and copies every array into it, transposed from torch's layouts (conv weights
[out, in, kh, kw] -> [kh, kw, in, out], linear weights [out, in] -> [in, out]). Every array of
the state_dict must be used and every parameter and batch statistic of the model must be set;
anything else is a ValueError that names the keys. Nothing depends on torch.

Converters are looked up by timm model name in `TIMM_CONVERTERS`, so other families (Swin, ...)
are added as one function and one table row each.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo import halonet as halonet_lib


def _to_numpy(name: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"state_dict[{name!r}] must be a numeric array, got dtype "
                         f"{array.dtype}")
    return array


class _StateDictReader:
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
        return _to_numpy(key, self.arrays[key])

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


def _assign(variable: nnx.Variable, value: np.ndarray, where: str) -> None:
    if tuple(variable.shape) != value.shape:
        raise ValueError(f"{where}: state_dict array of shape {value.shape} does not fit the "
                         f"model's {tuple(variable.shape)}")
    # The model is built abstractly (shapes only), so the value is replaced, not written into.
    variable.set_value(jnp.asarray(value, dtype=variable.dtype))


def _build_abstract(build: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs | None):
    """Shapes-only model: no random initialisation is run for weights about to be replaced."""
    return nnx.eval_shape(build, rngs if rngs is not None else nnx.Rngs(0))


def _check_all_set(model: nnx.Module, model_name: str) -> None:
    missing = [".".join(map(str, path)) for path, value in nnx.to_flat_state(nnx.state(model))
               if isinstance(value.get_value(), jax.ShapeDtypeStruct)]
    if missing:
        raise ValueError(f"the state_dict leaves {len(missing)} {model_name} variable(s) "
                         f"unset: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))


def _load_conv(conv: halonet_lib.Conv2d, reader: _StateDictReader, prefix: str) -> None:
    # torch [out, in, kh, kw] -> [kh, kw, in, out]
    _assign(conv.kernel, reader.get(f"{prefix}.weight").transpose(2, 3, 1, 0), prefix)
    if conv.bias is not None:
        _assign(conv.bias, reader.get(f"{prefix}.bias"), prefix)


def _load_batch_norm(bn: halonet_lib.BatchNorm, reader: _StateDictReader, prefix: str) -> None:
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")):
        _assign(getattr(bn, ours), reader.get(f"{prefix}.{theirs}"), f"{prefix}.{theirs}")


def _load_conv_bn(module: halonet_lib.ConvBN, reader: _StateDictReader, prefix: str) -> None:
    _load_conv(module.conv, reader, f"{prefix}.conv")
    _load_batch_norm(module.bn, reader, f"{prefix}.bn")


_HALONET_INFERRED = ("depths", "stage_widths", "mid_widths", "value_widths", "num_heads",
                     "stem_width", "final_features", "num_classes", "in_chans",
                     "qkv_bias")


def _halonet_from_timm(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None,
                       **overrides) -> halonet_lib.HaloNet:
    """timm `halonet_h1` (any widths/depths/heads; `ByobNet` with halo self-attn blocks).

    The state_dict fixes everything but the halo geometry and the image size, which default
    to the paper's H1 (block 8, halo 3, 256 px) and can be overridden (`block_size`,
    `halo_size`, `image_size`), as can options that leave no trace in the weights (`avg_down`,
    `scale_relative`, `dtype`, `param_dtype`, `attn_impl`, `drop_path_rate`, ...).
    """
    clash = sorted(set(overrides) & set(_HALONET_INFERRED))
    if clash:
        raise ValueError(f"{clash} are read from the state_dict and cannot be overridden")
    allowed = sorted(set(halonet_lib.MODEL_ARGS) - set(_HALONET_INFERRED))
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown HaloNet argument(s) {unknown} for from_timm; allowed: "
                         f"{allowed}")
    reader = _StateDictReader(state_dict)
    stem_shape = reader.shape("stem.conv1.conv.weight")
    if stem_shape[2:] != (7, 7):
        raise ValueError(f"only timm's 7x7 stem is supported, stem.conv1.conv.weight has "
                         f"shape {stem_shape}")
    block_keys = sorted({tuple(int(n) for n in m.groups())
                         for key in reader.arrays
                         if (m := re.match(r"stages\.(\d+)\.(\d+)\.", key))})
    if not block_keys:
        raise ValueError("state_dict has no 'stages.<i>.<j>.' blocks: not a timm HaloNet")
    num_stages = max(i for i, _ in block_keys) + 1
    depths = tuple(sum(1 for i, _ in block_keys if i == stage) for stage in range(num_stages))
    stage_widths, mid_widths, value_widths, heads = [], [], [], []
    table_rows = set()
    for stage in range(num_stages):
        prefix = f"stages.{stage}.0"
        if not reader.has(f"{prefix}.self_attn.q.weight"):
            raise ValueError(f"{prefix} is not a halo self-attention block (no "
                             f"{prefix}.self_attn.q.weight): not a timm halonet_h1 layout")
        qk = reader.shape(f"{prefix}.self_attn.q.weight")[0]
        kv = reader.shape(f"{prefix}.self_attn.kv.weight")[0]
        rows, head_dim = reader.shape(f"{prefix}.self_attn.pos_embed.height_rel")
        table_rows.add(rows)
        stage_widths.append(reader.shape(f"{prefix}.conv3_1x1.conv.weight")[0])
        mid_widths.append(reader.shape(f"{prefix}.conv1_1x1.conv.weight")[0])
        if qk != mid_widths[-1]:
            raise ValueError(f"{prefix}: query width {qk} differs from the block's mid width "
                             f"{mid_widths[-1]} (timm qk_ratio/dim_head), which HaloNet does "
                             f"not model")
        value_widths.append(kv - qk)
        heads.append(qk // head_dim)
    halo_args = {k: overrides.pop(k, halonet_lib.VARIANTS["h1"][k])
                 for k in ("block_size", "halo_size", "image_size")}
    win = halo_args["block_size"] + 2 * halo_args["halo_size"]
    if table_rows != {2 * win - 1}:
        raise ValueError(f"relative-position tables have {sorted(table_rows)} rows but "
                         f"block_size={halo_args['block_size']} and "
                         f"halo_size={halo_args['halo_size']} need 2*(b+2h)-1 = {2 * win - 1}; "
                         f"pass the block_size/halo_size the checkpoint was trained with")
    final_features = (reader.shape("final_conv.conv.weight")[0]
                      if reader.has("final_conv.conv.weight") else 0)
    num_classes = reader.shape("head.fc.weight")[0] if reader.has("head.fc.weight") else 0

    architecture = dict(
            depths=depths, stage_widths=tuple(stage_widths), mid_widths=tuple(mid_widths),
            value_widths=tuple(value_widths), num_heads=tuple(heads),
            stem_width=stem_shape[0], final_features=final_features, num_classes=num_classes,
            in_chans=stem_shape[1], qkv_bias=reader.has("stages.0.0.self_attn.q.bias"),
            **halo_args, **overrides)
    model = _build_abstract(lambda r: halonet_lib.HaloNet(**architecture, rngs=r), rngs)

    _load_conv_bn(model.stem, reader, "stem.conv1")
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            prefix = f"stages.{i}.{j}"
            if block.shortcut is not None:
                _load_conv_bn(block.shortcut, reader, f"{prefix}.shortcut")
            _load_conv_bn(block.conv1, reader, f"{prefix}.conv1_1x1")
            _load_conv(block.attn.q, reader, f"{prefix}.self_attn.q")
            # kv channels stay in timm's per-head interleaved [k_h | v_h] order, which is the
            # order HaloAttention splits them in: no permutation.
            _load_conv(block.attn.kv, reader, f"{prefix}.self_attn.kv")
            for table in ("height_rel", "width_rel"):
                key = f"{prefix}.self_attn.pos_embed.{table}"
                _assign(getattr(block.attn, table), reader.get(key), key)
            _load_batch_norm(block.post_attn, reader, f"{prefix}.post_attn")
            _load_conv_bn(block.conv3, reader, f"{prefix}.conv3_1x1")
    if model.final_conv is not None:
        _load_conv_bn(model.final_conv, reader, "final_conv")
    if model.head is not None:
        _assign(model.head.kernel, reader.get("head.fc.weight").T, "head.fc.weight")
        _assign(model.head.bias, reader.get("head.fc.bias"), "head.fc.bias")
    reader.check_all_used("halonet_h1")
    _check_all_set(model, "halonet_h1")
    return model


TIMM_CONVERTERS: dict[str, Callable[..., nnx.Module]] = {
        "halonet_h1": _halonet_from_timm,
}


def from_timm(model_name: str, state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
              **overrides) -> nnx.Module:
    """Builds the zoo model for timm's `model_name` and loads `state_dict` into it.

    Args:
        model_name: a timm model name with a converter (`sorted(TIMM_CONVERTERS)`).
        state_dict: timm `model.state_dict()` as name -> array (numpy arrays or tensors).
        rngs: passed to the (shapes-only) model build; every weight comes from the
            state_dict, so it does not change the result.
        **overrides: architecture facts the weights do not record (see each converter).

    Returns:
        The model, in eval-ready form: call it with `train=False` for timm's eval outputs.
    """
    if model_name not in TIMM_CONVERTERS:
        raise ValueError(f"no timm converter for model_name={model_name!r}; available: "
                         f"{sorted(TIMM_CONVERTERS)}")
    return TIMM_CONVERTERS[model_name](state_dict, rngs=rngs, **overrides)
