"""timm HaloNet (`halonet_h1` layout: ByobNet with halo self-attention blocks) -> zoo HaloNet."""
from __future__ import annotations

import re
from typing import Any, Mapping

from flax import nnx

from zoo import halonet as halonet_lib, layers
from zoo.converters.common import (StateDictReader, assign, build_abstract, check_all_set,
                                   check_overrides)


def _load_conv(conv: layers.Conv2d, reader: StateDictReader, prefix: str) -> None:
    # torch [out, in, kh, kw] -> [kh, kw, in, out]
    assign(conv.kernel, reader.get(f"{prefix}.weight").transpose(2, 3, 1, 0), prefix)
    if conv.bias is not None:
        assign(conv.bias, reader.get(f"{prefix}.bias"), prefix)


def _load_batch_norm(bn: layers.BatchNorm, reader: StateDictReader, prefix: str) -> None:
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")):
        assign(getattr(bn, ours), reader.get(f"{prefix}.{theirs}"), f"{prefix}.{theirs}")


def _load_conv_bn(module: layers.ConvBN, reader: StateDictReader, prefix: str) -> None:
    _load_conv(module.conv, reader, f"{prefix}.conv")
    _load_batch_norm(module.bn, reader, f"{prefix}.bn")


_HALONET_INFERRED = ("depths", "stage_widths", "mid_widths", "value_widths", "num_heads",
                     "stem_width", "final_features", "num_classes", "in_chans",
                     "qkv_bias")


def halonet_from_timm(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None,
                       **overrides) -> halonet_lib.HaloNet:
    """timm `halonet_h1` (any widths/depths/heads; `ByobNet` with halo self-attn blocks).

    The state_dict fixes everything but the halo geometry and the image size, which default
    to the paper's H1 (block 8, halo 3, 256 px) and can be overridden (`block_size`,
    `halo_size`, `image_size`), as can options that leave no trace in the weights (`avg_down`,
    `scale_relative`, `dtype`, `param_dtype`, `attn_impl`, `drop_path_rate`, ...).
    """
    check_overrides(overrides, model_args=halonet_lib.MODEL_ARGS, inferred=_HALONET_INFERRED,
                    model="HaloNet", entry_point="from_timm")
    reader = StateDictReader(state_dict)
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
    model = build_abstract(lambda r: halonet_lib.HaloNet(**architecture, rngs=r), rngs,
                           architecture=architecture)

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
                assign(getattr(block.attn, table), reader.get(key), key)
            _load_batch_norm(block.post_attn, reader, f"{prefix}.post_attn")
            _load_conv_bn(block.conv3, reader, f"{prefix}.conv3_1x1")
    if model.final_conv is not None:
        _load_conv_bn(model.final_conv, reader, "final_conv")
    if model.head is not None:
        assign(model.head.kernel, reader.get("head.fc.weight").T, "head.fc.weight")
        assign(model.head.bias, reader.get("head.fc.bias"), "head.fc.bias")
    reader.check_all_used("halonet_h1")
    check_all_set(model, "halonet_h1")
    return model
