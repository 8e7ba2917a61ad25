"""Official NViST checkpoints (wbjang/nvist_official `Model`: encoder., decoder., renderer.)
-> `zoo.nvist.NViST`.

The fixed sin-cos codes (`encoder.pos_embed`, `decoder.decoder_pos_embed`) are recomputed by
our model and checked against the checkpoint's; the MAE pre-training leftovers that NViST
keeps but never uses (`encoder.mask_token`, `encoder.decoder_pos_embed`, and any
`encoder.decoder_*` inpainting layers) are skipped. torch Linear [out, in] -> [in, out]; the
patch conv [out, in, kh, kw] -> [kh, kw, in, out]. Training checkpoints that wrap the weights
({"model": ...} or {"state_dict": ...}) are accepted.

What the weights do not record and must be given when they differ from the reference config:
`image_size` (default (160, 90)), `encoder_heads` / `decoder_heads` (default width / 64),
`num_samples` (48), `near_far` ((0.0, 1.5): the dataset's, see zoo/tasks/novel_view_synthesis.py) and
`aabb` (0.8).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo import nvist as nvist_lib
from zoo.converters.common import (StateDictReader, assign, build_abstract, check_all_set,
                                   check_overrides)

_INFERRED = ("patch_size", "encoder_dim", "encoder_depth", "decoder_dim", "decoder_depth",
             "resolution", "decoder_patch_size", "channels")
_UNUSED = re.compile(r"^encoder\.(mask_token|decoder_.*)$")
_FIXED_CODES = {"encoder.pos_embed": "encoder", "decoder.decoder_pos_embed": "decoder"}


def _linear(linear, reader: StateDictReader, prefix: str) -> None:
    weight = reader.get(f"{prefix}.weight")
    assign(linear.kernel, weight.T.reshape(linear.kernel.shape), f"{prefix}.weight")
    if linear.bias is not None:
        assign(linear.bias, reader.get(f"{prefix}.bias").reshape(linear.bias.shape),
               f"{prefix}.bias")


def _norm(norm, reader: StateDictReader, prefix: str) -> None:
    assign(norm.scale, reader.get(f"{prefix}.weight"), f"{prefix}.weight")
    assign(norm.bias, reader.get(f"{prefix}.bias"), f"{prefix}.bias")


def _count(reader: StateDictReader, pattern: str) -> int:
    return len({m.group(1) for key in reader.arrays if (m := re.match(pattern, key))})


def nvist_from_official(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                        **overrides) -> nvist_lib.NViST:
    """Official NViST `Model.state_dict()` -> NViST (sizes read from the arrays)."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
    check_overrides(overrides, model_args=nvist_lib.MODEL_ARGS, inferred=_INFERRED,
                    model="NViST", entry_point="from_nvist_official")
    reader = StateDictReader(state_dict)
    if not reader.has("decoder.output_token") or not reader.has("encoder.cls_token"):
        raise ValueError("state_dict has no 'encoder.cls_token' / 'decoder.output_token': not "
                         "an official NViST Model checkpoint (keys encoder., decoder., "
                         "renderer.)")
    reader.arrays = {k: v for k, v in reader.arrays.items() if not _UNUSED.match(k)}
    encoder_dim = reader.shape("encoder.cls_token")[-1]
    decoder_dim = reader.shape("decoder.output_token")[-1]
    patch = reader.shape("encoder.patch_embed.proj.weight")[-1]
    matrix_out = reader.shape("decoder.decoder_pred.0.weight")[0]
    vector_out = reader.shape("decoder.decoder_vector_pred.0.weight")[0]
    decoder_patch = matrix_out // vector_out
    channels = vector_out // decoder_patch
    tokens = reader.shape("decoder.decoder_pos_embed")[1] - 1  # 3R/p * R/p + 3R/p
    grid_cols = int(round(np.sqrt(tokens / 3 + 0.25) - 0.5))  # R/p, from 3c^2 + 3c = tokens
    architecture = dict(
            patch_size=patch, encoder_dim=encoder_dim,
            encoder_depth=_count(reader, r"encoder\.blocks\.(\d+)\."),
            decoder_dim=decoder_dim, decoder_depth=_count(reader, r"decoder\.blocks\.(\d+)\."),
            resolution=grid_cols * decoder_patch, decoder_patch_size=decoder_patch,
            channels=channels, encoder_heads=max(encoder_dim // 64, 1),
            decoder_heads=max(decoder_dim // 64, 1))
    architecture.update(overrides)
    model = build_abstract(lambda r: nvist_lib.NViST(**architecture, rngs=r), rngs,
                           architecture=architecture)

    for key, part in _FIXED_CODES.items():
        ours = np.asarray(getattr(model, part).position_code(), np.float32)
        theirs = reader.get(key)[0]
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, atol=1e-5):
            raise ValueError(f"{key} differs from the fixed sin-cos code this configuration "
                             f"computes (shape {theirs.shape} vs {ours.shape}): check "
                             f"image_size / resolution")
    enc = model.encoder
    assign(enc.patch_embed.kernel,
           reader.get("encoder.patch_embed.proj.weight").transpose(2, 3, 1, 0),
           "encoder.patch_embed.proj.weight")
    assign(enc.patch_embed.bias, reader.get("encoder.patch_embed.proj.bias"),
           "encoder.patch_embed.proj.bias")
    assign(enc.cls_token, reader.get("encoder.cls_token"), "encoder.cls_token")
    for i, block in enumerate(enc.blocks):
        prefix = f"encoder.blocks.{i}"
        _norm(block.norm1, reader, f"{prefix}.norm1")
        _linear(block.attn.qkv, reader, f"{prefix}.attn.qkv")
        _linear(block.attn.proj, reader, f"{prefix}.attn.proj")
        _norm(block.norm2, reader, f"{prefix}.norm2")
        _linear(block.mlp.fc1, reader, f"{prefix}.mlp.fc1")
        _linear(block.mlp.fc2, reader, f"{prefix}.mlp.fc2")
    _norm(enc.norm, reader, "encoder.norm")

    dec = model.decoder
    assign(dec.output_token, reader.get("decoder.output_token").reshape(-1),
           "decoder.output_token")
    assign(dec.image_pos_embed, reader.get("decoder.encoded_patches_pos_embed")[0],
           "decoder.encoded_patches_pos_embed")
    _linear(dec.camera_fc1, reader, "decoder.camera_params_embed.0")
    _linear(dec.camera_fc2, reader, "decoder.camera_params_embed.2")
    for i, block in enumerate(dec.blocks):
        prefix = f"decoder.blocks.{i}"
        _linear(block.modulation, reader, f"{prefix}.adaLN_modulation.1")
        for name in ("q", "k", "v", "proj"):
            _linear(getattr(block, name), reader, f"{prefix}.attn.{name}")
        _norm(block.norm_k, reader, f"{prefix}.norm_k")
        _norm(block.norm_v, reader, f"{prefix}.norm_v")
        _linear(block.mlp.fc1, reader, f"{prefix}.mlp.fc1")
        _linear(block.mlp.fc2, reader, f"{prefix}.mlp.fc2")
    _norm(dec.matrix_norm, reader, "decoder.decoder_out_norm.0")
    _norm(dec.vector_norm, reader, "decoder.decoder_vector_norm.0")
    for j in range(3):
        _linear(dec.matrix_heads[j], reader, f"decoder.decoder_pred.{j}")
        _linear(dec.vector_heads[j], reader, f"decoder.decoder_vector_pred.{j}")

    ren = model.renderer
    _linear(ren.rgb_features, reader, "renderer.rgb_matrix.1")
    _linear(ren.rgb_hidden, reader, "renderer.rgb_mlp.0")
    _linear(ren.rgb_out, reader, "renderer.rgb_mlp.2")
    reader.check_all_used("NViST")
    check_all_set(model, "NViST")
    return model
