"""pix2seq FIT weights (google-research/pix2seq `architectures/transformers.py`: `FIT`, `FITAR`,
`FITDenoiser`, Keras variable names) -> zoo/fit.py's FITEncoder, FITAR and FITDenoiser.

Keras names: "<model>/x_network<_i>/transformer_encoder<_j>/mha/{ln,query,key,value,
attention_output}" (FITAR: "transformer_decoder_layer<_j>/self_mha"), "l2x_cross_attn<_i>",
"x2l_cross_attn<_i>", "l2c_cross_attn<_i>" (the denoiser's latents-to-condition layers) with
"cross_mha/{ln,enc_ln,...}", "mlp/ffn/{ln,dense1,dense2}", "stem", "stem_ln", "x_pos_emb",
"latent_pos_emb", "x_output_ln", "l_output_ln", "token_embedding", "outp_bias", "time_emb",
"cond_proj", "latent_prev_proj", "latent_prev_ln", "x_output_linear". The leading model name is
whatever the Keras layer was called, so it is stripped. MultiHeadAttention kernels
[in, heads, head_dim] / [heads, head_dim, out] flatten head-major into ours.

What the weights do not record is passed as overrides: `num_groups` (the latent table holds
groups * latents_per_group rows), and for images `image_size`, `patch_size` and `in_chans`
(the stem sees patch_size**2 * in_chans values per token; default 2x2x3 must match).
Models with fixed sin-cos codes have no position tables, so they also need what those tables
would tell: `x_pos_encoding` ("sin_cos" or "sin_cos2d"), `latents_per_group` when the latents
use "sin_cos" (inferred), and FIT-AR's `seq_len`. pix2seq's `mask='causal'` leaves no trace in
the weights either: pass `latent_mask="causal"`. Inferred from which variables exist:
`x_self_attention` (no "mha" in the local layers), `xattn_with_mlp` (an "mlp" in the
read/write layers), `xattn_enc_ln` ("cross_mha/enc_ln") and the encoder's `y_dim` ("stem_y").
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo import fit as fit_lib
from zoo.registry import model_arguments
from zoo.converters.common import (StateDictReader, assign, build_abstract, check_all_set,
                                   check_overrides)

KINDS = ("encoder", "ar", "denoiser")


def _suffix(i: int) -> str:  # pix2seq's suffix_id
    return "" if i == 0 else f"_{i}"


def _strip_model_name(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state_dict.items():
        key = key.split(":")[0]
        first, _, rest = key.partition("/")
        out[rest if rest else first] = value
    return out


def kind_of(state_dict: Mapping[str, Any]) -> str:
    """"ar", "denoiser" or "encoder", from which embeddings the weights hold."""
    keys = _strip_model_name(state_dict)
    if "token_embedding" in keys:
        return "ar"
    if any(k.startswith("time_emb/") for k in keys):
        return "denoiser"
    return "encoder"


def _norm(norm, reader, prefix):
    assign(norm.scale, reader.get(f"{prefix}/gamma"), f"{prefix}/gamma")
    assign(norm.bias, reader.get(f"{prefix}/beta"), f"{prefix}/beta")


def _dense(linear, reader, prefix):
    assign(linear.kernel, reader.get(f"{prefix}/kernel").reshape(linear.kernel.shape),
           f"{prefix}/kernel")
    assign(linear.bias, reader.get(f"{prefix}/bias").reshape(linear.bias.shape),
           f"{prefix}/bias")


def _attention(attn, reader, prefix):
    """Keras MultiHeadAttention at `prefix` into a zoo `layers.Attention`."""
    def flat(name):
        kernel = reader.get(f"{prefix}/{name}/kernel")
        return kernel.reshape(kernel.shape[0], -1), reader.get(f"{prefix}/{name}/bias").reshape(-1)

    q, k, v = flat("query"), flat("key"), flat("value")
    if attn.fused_qkv and not attn.cross_attention:
        assign(attn.qkv.kernel, np.stack([q[0], k[0], v[0]], axis=1), f"{prefix}/query|key|value")
        assign(attn.qkv.bias, np.stack([q[1], k[1], v[1]]), f"{prefix}/query|key|value bias")
    else:
        assign(attn.q.kernel, q[0], f"{prefix}/query/kernel")
        assign(attn.q.bias, q[1], f"{prefix}/query/bias")
        assign(attn.kv.kernel, np.stack([k[0], v[0]], axis=1), f"{prefix}/key|value")
        assign(attn.kv.bias, np.stack([k[1], v[1]]), f"{prefix}/key|value bias")
    out = reader.get(f"{prefix}/attention_output/kernel")
    assign(attn.proj.kernel, out.reshape(-1, out.shape[-1]), f"{prefix}/attention_output")
    assign(attn.proj.bias, reader.get(f"{prefix}/attention_output/bias"),
           f"{prefix}/attention_output/bias")


def _self_layer(layer, reader, prefix, mha):
    if layer.attn is not None:
        _norm(layer.norm1, reader, f"{prefix}/{mha}/ln")
        _attention(layer.attn, reader, f"{prefix}/{mha}")
    _norm(layer.norm2, reader, f"{prefix}/mlp/ffn/ln")
    _dense(layer.mlp.fc1, reader, f"{prefix}/mlp/ffn/dense1")
    _dense(layer.mlp.fc2, reader, f"{prefix}/mlp/ffn/dense2")


def _cross_layer(layer, reader, prefix):
    _norm(layer.q_norm, reader, f"{prefix}/cross_mha/ln")
    if layer.kv_norm is not None:
        _norm(layer.kv_norm, reader, f"{prefix}/cross_mha/enc_ln")
    _attention(layer.attn, reader, f"{prefix}/cross_mha")
    if layer.mlp is not None:
        _norm(layer.mlp_norm, reader, f"{prefix}/mlp/ffn/ln")
        _dense(layer.mlp.fc1, reader, f"{prefix}/mlp/ffn/dense1")
        _dense(layer.mlp.fc2, reader, f"{prefix}/mlp/ffn/dense2")


def _layer_spec(reader) -> str:
    """'(a)b(c)d...' from the numbers of local and global layers per pair."""
    pairs = []
    for i in range(64):
        local = len({m.group(1) for k in reader.arrays
                     if (m := re.match(rf"x_network{_suffix(i)}/(transformer_\w+?)/", k))})
        global_ = len({m.group(1) for k in reader.arrays
                       if (m := re.match(rf"l_network{_suffix(i)}/(transformer_\w+?)/", k))})
        if not local and not global_:
            break
        pairs.append(f"({local}){global_}")
    if not pairs:
        raise ValueError("state_dict has no 'x_network/...' layers: not a pix2seq FIT model")
    return "".join(pairs)


def _heads(reader, prefix) -> int:
    return reader.shape(f"{prefix}/query/kernel")[1]


def fit_from_pix2seq(state_dict: Mapping[str, Any], *, kind: str | None = None,
                     num_groups: int | None = None, rngs: nnx.Rngs | None = None,
                     **overrides) -> nnx.Module:
    """pix2seq FIT / FITAR / FITDenoiser weights -> the zoo model (module docstring).

    kind: "encoder", "ar" or "denoiser"; default read from the weights (`kind_of`).
    num_groups: the groups T (required: the weights hold T * latents_per_group latents).
    """
    kind = kind_of(state_dict) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups={num_groups!r}: pass the number of groups T (a positive "
                         "int; pix2seq weights hold T * latents_per_group latents, not T)")
    model_class = {"encoder": fit_lib.FITEncoder, "ar": fit_lib.FITAR,
                   "denoiser": fit_lib.FITDenoiser}[kind]
    reader = StateDictReader(_strip_model_name(state_dict))
    mha = "self_mha" if kind == "ar" else "mha"
    layer = "transformer_decoder_layer" if kind == "ar" else "transformer_encoder"
    learned_latents = reader.has("latent_pos_emb/kernel/vis_pos_embedding")
    learned_x = reader.has("x_pos_emb/kernel/vis_pos_embedding")
    x_self_attention = reader.has(f"x_network/{layer}/{mha}/query/kernel")
    inferred = ["layer_spec", "x_dim", "latent_dim", "x_heads", "latent_heads", "mlp_ratio",
                "num_groups", "vocab_size", "num_classes", "cond_dim", "self_condition",
                "latent_pos_encoding", "x_self_attention", "xattn_with_mlp", "xattn_enc_ln",
                "y_dim"]
    inferred += ["latents_per_group"] if learned_latents else []
    inferred += (["x_pos_encoding"] + (["seq_len"] if kind == "ar" else [])) if learned_x else []
    check_overrides(overrides, model_args=model_arguments(model_class),
                    inferred=inferred, fixed=(), model=f"FIT {kind}",
                    entry_point="fit_from_pix2seq")
    needed = ([] if learned_latents else ["latents_per_group"]) + (
            [] if learned_x else ["x_pos_encoding"] + (["seq_len"] if kind == "ar" else []))
    missing = [name for name in needed if name not in overrides]
    if missing:
        raise ValueError(f"pass {missing}: these weights use fixed sin-cos position codes "
                         f"(no position table), which do not record them")
    latent_dim = reader.shape(f"l_network/{layer}/{mha}/query/kernel")[0]
    if learned_latents:
        latents = reader.shape("latent_pos_emb/kernel/vis_pos_embedding")[0]
        if latents % num_groups:
            raise ValueError(f"num_groups={num_groups} does not divide the {latents} latents "
                             "of latent_pos_emb")
        latents_per_group = latents // num_groups
    else:
        latents_per_group = overrides["latents_per_group"]
    x_dim, hidden = reader.shape(f"x_network/{layer}/mlp/ffn/dense1/kernel")
    latent_heads = _heads(reader, f"l_network/{layer}/{mha}")
    if x_self_attention:
        x_heads = _heads(reader, f"x_network/{layer}/{mha}")
    else:
        # without local attention x_heads only enters as min(latent_heads, x_heads), the
        # heads of the read/write layers
        x_heads = _heads(reader, "l2x_cross_attn/cross_mha")
    architecture = dict(layer_spec=_layer_spec(reader), num_groups=num_groups,
                        latents_per_group=latents_per_group, x_dim=x_dim,
                        latent_dim=latent_dim, x_heads=x_heads, latent_heads=latent_heads,
                        mlp_ratio=hidden / x_dim)
    if not learned_latents:
        architecture["latent_pos_encoding"] = "sin_cos"
    if kind == "denoiser":
        architecture.update(x_self_attention=x_self_attention,
                            xattn_with_mlp=reader.has("l2x_cross_attn/mlp/ffn/ln/gamma"),
                            xattn_enc_ln=reader.has("l2x_cross_attn/cross_mha/enc_ln/gamma"))
    if kind == "ar":
        architecture.update(vocab_size=reader.shape("token_embedding")[0])
        if learned_x:
            tokens_per_group = reader.shape("x_pos_emb/kernel/vis_pos_embedding")[0]
            architecture.update(seq_len=num_groups * tokens_per_group)
    else:
        patch_dim = reader.shape("stem/kernel")[0]
        patch, chans = overrides.get("patch_size", 2), overrides.get("in_chans", 3)
        if patch * patch * chans != patch_dim:
            raise ValueError(f"the stem takes {patch_dim} values per token; pass patch_size "
                             f"and in_chans with patch_size**2 * in_chans = {patch_dim}")
        if "image_size" not in overrides:
            raise ValueError("pass image_size: pix2seq's FIT takes patches, so the weights do "
                             "not record the image they come from")
        if kind == "encoder":
            architecture.update(num_classes=0, y_dim=reader.shape("stem_y/kernel")[0]
                                if reader.has("stem_y/kernel") else 0)
        else:
            architecture.update(cond_dim=reader.shape("cond_proj/kernel")[0]
                                if reader.has("cond_proj/kernel") else 0,
                                self_condition=reader.has("latent_prev_ln/gamma"))
    architecture.update(overrides)
    model = build_abstract(lambda r: model_class(**architecture, rngs=r), rngs,
                           architecture=architecture)

    trunk = model.trunk
    for i, (local, global_) in enumerate(trunk.pairs):
        for j, block in enumerate(trunk.x_networks[i]):
            _self_layer(block, reader, f"x_network{_suffix(i)}/{layer}{_suffix(j)}", mha)
        if global_:
            _cross_layer(trunk.reads[i], reader, f"l2x_cross_attn{_suffix(i)}")
            if trunk.cond_attention[i] is not None:
                _cross_layer(trunk.cond_attention[i], reader, f"l2c_cross_attn{_suffix(i)}")
            for j, block in enumerate(trunk.latent_networks[i]):
                _self_layer(block, reader, f"l_network{_suffix(i)}/{layer}{_suffix(j)}", mha)
        if trunk.writes[i] is not None:
            _cross_layer(trunk.writes[i], reader, f"x2l_cross_attn{_suffix(i)}")
    if trunk.x_norm is not None:
        _norm(trunk.x_norm, reader, "x_output_ln")
    if trunk.latent_norm is not None:
        if reader.has("l_output_ln/gamma"):
            _norm(trunk.latent_norm, reader, "l_output_ln")
        else:  # FITAR builds no l_output_ln (its latents leave no output): identity
            assign(trunk.latent_norm.scale, np.ones(latent_dim, np.float32), "l_output_ln")
            assign(trunk.latent_norm.bias, np.zeros(latent_dim, np.float32), "l_output_ln")
    if model.latent_pos_emb is not None:
        assign(model.latent_pos_emb, reader.get("latent_pos_emb/kernel/vis_pos_embedding"),
               "latent_pos_emb")
    if model.x_pos_emb is not None:
        assign(model.x_pos_emb, reader.get("x_pos_emb/kernel/vis_pos_embedding"), "x_pos_emb")
    if kind == "ar":
        assign(model.token_embedding, reader.get("token_embedding"), "token_embedding")
        assign(model.output_bias, reader.get("outp_bias"), "outp_bias")
    else:
        _dense(model.stem, reader, "stem")
        _norm(model.stem_norm, reader, "stem_ln")
    if kind == "encoder" and model.stem_y is not None:
        _dense(model.stem_y, reader, "stem_y")
        _norm(model.stem_y_norm, reader, "stem_y_ln")
    if kind == "denoiser":
        _dense(model.time_emb.dense0, reader, "time_emb/dense0")
        _dense(model.time_emb.dense1, reader, "time_emb/dense1")
        if model.cond_proj is not None:
            _dense(model.cond_proj, reader, "cond_proj")
        if model.self_condition:
            _norm(model.latent_prev_norm, reader, "latent_prev_proj/ffn/ln")
            _dense(model.latent_prev_mlp.fc1, reader, "latent_prev_proj/ffn/dense1")
            _dense(model.latent_prev_mlp.fc2, reader, "latent_prev_proj/ffn/dense2")
            _norm(model.latent_prev_out_norm, reader, "latent_prev_ln")
        _norm(model.output_norm, reader, "x_output_ln")
        _dense(model.output, reader, "x_output_linear")
    reader.check_all_used(f"FIT {kind}")
    check_all_set(model, f"FIT {kind}")
    return model


def encoder_from_pix2seq(state_dict, *, rngs=None, **overrides):
    """pix2seq `FIT` weights -> `fit_encoder_b` (without a classifier head: num_classes=0)."""
    return fit_from_pix2seq(state_dict, kind="encoder", rngs=rngs, **overrides)


def ar_from_pix2seq(state_dict, *, rngs=None, **overrides):
    """pix2seq `FITAR` weights -> `fit_ar_small`."""
    return fit_from_pix2seq(state_dict, kind="ar", rngs=rngs, **overrides)


def denoiser_from_pix2seq(state_dict, *, rngs=None, **overrides):
    """pix2seq `FITDenoiser` weights -> `fit_denoiser_64`."""
    return fit_from_pix2seq(state_dict, kind="denoiser", rngs=rngs, **overrides)
