"""timm Swin Transformer (`swin_tiny_patch4_window7_224` layout, timm >= 0.9) -> zoo Swin.

timm >= 0.9 names: `patch_embed.{proj,norm}`, `layers.<i>.downsample.{norm,reduction}` (stage
i > 0), `layers.<i>.blocks.<j>.{norm1,attn.{qkv,proj,relative_position_bias_table},norm2,
mlp.{fc1,fc2}}`, `norm`, `head.fc`. The buffers `relative_position_index` and `attn_mask` are
recomputed by the model, so when present (older checkpoints saved them) they are skipped.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo import layers
from zoo import swin as swin_lib
from zoo.converters.common import (StateDictReader, assign, build_abstract, check_all_set,
                                   check_overrides)

# Derived from the weights, so they cannot be overridden.
_SWIN_INFERRED = ("embed_dim", "depths", "num_heads", "patch_size", "in_chans", "num_classes",
                  "mlp_ratio", "qkv_bias", "block_factory")
_RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")


def _load_linear(linear: layers.Linear, reader: StateDictReader, prefix: str) -> None:
    # torch [out, in] -> [in, *out]
    weight = reader.get(f"{prefix}.weight")
    assign(linear.kernel, weight.T.reshape(linear.kernel.shape), f"{prefix}.weight")
    if linear.bias is not None:
        assign(linear.bias, reader.get(f"{prefix}.bias").reshape(linear.bias.shape),
               f"{prefix}.bias")


def _load_norm(norm: layers.LayerNorm, reader: StateDictReader, prefix: str) -> None:
    assign(norm.scale, reader.get(f"{prefix}.weight"), f"{prefix}.weight")
    assign(norm.bias, reader.get(f"{prefix}.bias"), f"{prefix}.bias")


def load_patch_embed(stem: swin_lib.PatchEmbed, reader: StateDictReader) -> None:
    """`patch_embed.proj` (torch conv [out, in, p, p] -> [p, p, in, out]) and `.norm`."""
    assign(stem.proj.kernel, reader.get("patch_embed.proj.weight").transpose(2, 3, 1, 0),
           "patch_embed.proj.weight")
    assign(stem.proj.bias, reader.get("patch_embed.proj.bias"), "patch_embed.proj.bias")
    _load_norm(stem.norm, reader, "patch_embed.norm")


def swin_from_timm(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                   **overrides) -> swin_lib.SwinTransformer:
    """Any timm `SwinTransformer` state_dict (widths, depths, heads, window read from it).

    The window size comes from the relative position tables ((2w-1)^2 rows, square windows);
    `image_size` defaults to 224 and may be overridden, as may options that leave no trace in
    the weights (`dtype`, `param_dtype`, `attn_impl`, `drop_rate`, `drop_path_rate`).
    """
    check_overrides(overrides, model_args=swin_lib.MODEL_ARGS, inferred=_SWIN_INFERRED,
                    fixed=("window_size",), model="Swin", entry_point="swin_from_timm")
    reader = StateDictReader(state_dict)
    reader.arrays = {k: v for k, v in reader.arrays.items()
                     if not k.endswith(_RECOMPUTED_BUFFERS)}
    proj_shape = reader.shape("patch_embed.proj.weight")  # [embed, in_chans, p, p]
    if len(proj_shape) != 4 or proj_shape[2] != proj_shape[3]:
        raise ValueError(f"patch_embed.proj.weight must be [embed, in_chans, p, p], got "
                         f"{proj_shape}")
    block_keys = sorted({(int(m.group(1)), int(m.group(2))) for key in reader.arrays
                         if (m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", key))})
    if not block_keys:
        raise ValueError("state_dict has no 'layers.<i>.blocks.<j>.' keys: not a timm >= 0.9 "
                         "Swin Transformer")
    num_stages = max(i for i, _ in block_keys) + 1
    depths = tuple(sum(1 for i, _ in block_keys if i == stage) for stage in range(num_stages))
    heads, windows = [], set()
    for stage in range(num_stages):
        rows, stage_heads = reader.shape(
                f"layers.{stage}.blocks.0.attn.relative_position_bias_table")
        heads.append(stage_heads)
        side = (int(round(np.sqrt(rows))) + 1) // 2
        if (2 * side - 1) ** 2 != rows:
            raise ValueError(f"layers.{stage}: relative position table with {rows} rows is "
                             f"not a square window's (2w-1)^2")
        windows.add(side)
    embed_dim = proj_shape[0]
    hidden = reader.shape("layers.0.blocks.0.mlp.fc1.weight")[0]
    num_classes = reader.shape("head.fc.weight")[0] if reader.has("head.fc.weight") else 0
    # Stages whose map is no larger than the window have a clamped (smaller) table; the
    # configured window is the largest one seen.
    architecture = dict(
            embed_dim=embed_dim, depths=depths, num_heads=tuple(heads),
            patch_size=proj_shape[2], in_chans=proj_shape[1], num_classes=num_classes,
            window_size=max(windows), mlp_ratio=hidden / embed_dim,
            qkv_bias=reader.has("layers.0.blocks.0.attn.qkv.bias"), **overrides)
    model = build_abstract(lambda r: swin_lib.SwinTransformer(**architecture, rngs=r), rngs,
                           architecture=architecture)

    load_patch_embed(model.patch_embed, reader)
    for i, stage in enumerate(model.layers):
        if stage.downsample is not None:
            _load_norm(stage.downsample.norm, reader, f"layers.{i}.downsample.norm")
            _load_linear(stage.downsample.reduction, reader, f"layers.{i}.downsample.reduction")
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}"
            _load_norm(block.norm1, reader, f"{prefix}.norm1")
            # qkv rows are [q | k | v], each head-major: torch [3*inner, dim] -> (dim, 3, inner)
            _load_linear(block.attn.qkv, reader, f"{prefix}.attn.qkv")
            _load_linear(block.attn.proj, reader, f"{prefix}.attn.proj")
            table = f"{prefix}.attn.relative_position_bias_table"
            assign(block.attn.relative_position_bias_table, reader.get(table), table)
            _load_norm(block.norm2, reader, f"{prefix}.norm2")
            _load_linear(block.mlp.fc1, reader, f"{prefix}.mlp.fc1")
            _load_linear(block.mlp.fc2, reader, f"{prefix}.mlp.fc2")
    _load_norm(model.norm, reader, "norm")
    if model.head is not None:
        _load_linear(model.head, reader, "head.fc")
    reader.check_all_used("swin")
    check_all_set(model, "swin")
    return model
