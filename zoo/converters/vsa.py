"""Official Swin-T + VSA checkpoints (ViTAE-Transformer/QFormer `SwinTransformerVSA`) ->
zoo VSA-Swin (`zoo.vsa.vsa_swin`), and a stand-alone QFormer `VSAAttention` -> zoo
`VSAAttention`.

QFormer keeps the original Swin layout: the patch merging of stage i is `layers.<i>.downsample`
at the *end* of stage i, which is our `layers[i + 1].downsample`. Per block: `pos` (depth-wise
conv [C, 1, k, k]), `norm1`, `attn.{qkv, proj, transform.2, relative_position_bias_table}`,
`norm2`, `mlp.{fc1, fc2}`; `attn.relative_position_index` is a buffer, recomputed here.
Training checkpoints wrap the weights as {"model": state_dict, ...}; both forms are accepted.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo import vsa as vsa_lib
from zoo.converters.common import (StateDictReader, assign, build_abstract, check_all_set,
                                   check_overrides)
from zoo.converters.swin import _load_linear, _load_norm, load_patch_embed

_INFERRED = ("embed_dim", "depths", "num_heads", "patch_size", "in_chans", "num_classes",
             "mlp_ratio", "qkv_bias", "window_size")


def _reader(state_dict: Mapping[str, Any]) -> StateDictReader:
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    reader = StateDictReader(state_dict)
    reader.arrays = {k: v for k, v in reader.arrays.items()
                     if not k.endswith("relative_position_index")}
    return reader


def _load_attention(attn: vsa_lib.VSAAttention, reader: StateDictReader, prefix: str) -> None:
    _load_linear(attn.qkv, reader, f"{prefix}.qkv")
    _load_linear(attn.proj, reader, f"{prefix}.proj")
    # 1x1 conv [heads*4, C, 1, 1] -> (C, heads, 4); output channel = head * 4 + j.
    weight = reader.get(f"{prefix}.transform.2.weight")
    assign(attn.transform.kernel, weight[:, :, 0, 0].T.reshape(attn.transform.kernel.shape),
           f"{prefix}.transform.2.weight")
    assign(attn.transform.bias, reader.get(f"{prefix}.transform.2.bias").reshape(
            attn.transform.bias.shape), f"{prefix}.transform.2.bias")
    table = f"{prefix}.relative_position_bias_table"
    assign(attn.relative_position_bias_table, reader.get(table), table)


def _window_from_table(reader: StateDictReader, key: str) -> tuple[int, int]:
    rows, heads = reader.shape(key)
    side = (int(round(np.sqrt(rows))) + 1) // 2
    if (2 * side - 1) ** 2 != rows:
        raise ValueError(f"{key}: {rows} rows is not a square window's (2w-1)^2")
    return side, heads


def vsa_attention_from_qformer(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                               **overrides) -> vsa_lib.VSAAttention:
    """A stand-alone QFormer `VSAAttention(rpe="v1")` state_dict (keys `qkv.weight`, ...)."""
    reader = _reader(state_dict)
    window, heads = _window_from_table(reader, "relative_position_bias_table")
    dim = reader.shape("proj.weight")[0]
    model = build_abstract(lambda r: vsa_lib.VSAAttention(
            dim, heads, window, qkv_bias=reader.has("qkv.bias"), rngs=r, **overrides), rngs)
    prefixed = StateDictReader({f"attn.{k}": v for k, v in reader.arrays.items()})
    _load_attention(model, prefixed, "attn")
    prefixed.check_all_used("VSAAttention")
    check_all_set(model, "VSAAttention")
    return model


def vsa_from_qformer(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                     **overrides):
    """Any QFormer `SwinTransformerVSA` state_dict (sizes read from it) -> VSA-Swin.

    `image_size` defaults to 224 and may be overridden, as may `dtype`, `param_dtype`,
    `attn_impl`, `drop_rate`, `drop_path_rate`.
    """
    check_overrides(overrides, model_args=vsa_lib.MODEL_ARGS, inferred=_INFERRED,
                    model="VSA-Swin", entry_point="from_qformer_vsa")
    reader = _reader(state_dict)
    block_keys = sorted({(int(m.group(1)), int(m.group(2))) for key in reader.arrays
                         if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key))})
    if not block_keys or not reader.has("layers.0.blocks.0.attn.transform.2.weight"):
        raise ValueError("state_dict has no 'layers.<i>.blocks.<j>.attn.transform.2.weight': "
                         "not a QFormer SwinTransformerVSA checkpoint")
    num_stages = max(i for i, _ in block_keys) + 1
    depths = tuple(sum(1 for i, _ in block_keys if i == s) for s in range(num_stages))
    heads, windows = [], set()
    for stage in range(num_stages):
        window, stage_heads = _window_from_table(
                reader, f"layers.{stage}.blocks.0.attn.relative_position_bias_table")
        heads.append(stage_heads)
        windows.add(window)
    if len(windows) != 1:
        raise ValueError(f"stages have different window sizes {sorted(windows)}; VSA-Swin "
                         f"uses one window_size")
    proj_shape = reader.shape("patch_embed.proj.weight")
    embed_dim = proj_shape[0]
    hidden = reader.shape("layers.0.blocks.0.mlp.fc1.weight")[0]
    architecture = dict(
            embed_dim=embed_dim, depths=depths, num_heads=tuple(heads),
            patch_size=proj_shape[2], in_chans=proj_shape[1],
            num_classes=reader.shape("head.weight")[0] if reader.has("head.weight") else 0,
            window_size=windows.pop(), mlp_ratio=hidden / embed_dim,
            qkv_bias=reader.has("layers.0.blocks.0.attn.qkv.bias"), **overrides)
    model = build_abstract(lambda r: vsa_lib.vsa_swin(rngs=r, **architecture), rngs,
                           architecture=architecture)

    load_patch_embed(model.patch_embed, reader)
    for i, stage in enumerate(model.layers):
        if stage.downsample is not None:  # QFormer: the merge ending stage i - 1
            _load_norm(stage.downsample.norm, reader, f"layers.{i - 1}.downsample.norm")
            _load_linear(stage.downsample.reduction, reader,
                         f"layers.{i - 1}.downsample.reduction")
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}"
            # torch depth-wise [C, 1, k, k] -> [k, k, 1, C]
            assign(block.pos.kernel, reader.get(f"{prefix}.pos.weight").transpose(2, 3, 1, 0),
                   f"{prefix}.pos.weight")
            assign(block.pos.bias, reader.get(f"{prefix}.pos.bias"), f"{prefix}.pos.bias")
            _load_norm(block.norm1, reader, f"{prefix}.norm1")
            _load_attention(block.attn, reader, f"{prefix}.attn")
            _load_norm(block.norm2, reader, f"{prefix}.norm2")
            _load_linear(block.mlp.fc1, reader, f"{prefix}.mlp.fc1")
            _load_linear(block.mlp.fc2, reader, f"{prefix}.mlp.fc2")
    _load_norm(model.norm, reader, "norm")
    if model.head is not None:
        _load_linear(model.head, reader, "head")
    reader.check_all_used("QFormer VSA-Swin")
    check_all_set(model, "VSA-Swin")
    return model
