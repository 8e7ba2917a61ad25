"""Weight import from other frameworks' checkpoints: the public entry points.

  from_source(source, state_dict)          any source in `zoo.registry.weight_sources()`
  from_timm(timm_model_name, state_dict)   timm models ("timm:<name>" sources)
  from_gpt2(state_dict, ...)               Hugging Face `GPT2LMHeadModel` -> SSA GPT
  from_qformer_vsa(state_dict, ...)        official Swin-T + VSA (QFormer repo layout)
  from_nvist_official(state_dict, ...)     official NViST (encoder, decoder, renderer)
  load_state_dict(path)                    name -> array from a .safetensors, .npz or torch
                                           .pth/.bin file, read without torch and without
                                           running code from it (zoo/weight_files.py)

A state_dict is name -> array (numpy arrays; torch tensors are accepted too). Each converter
infers what it can from the array shapes, builds the zoo model, copies every array into it with
an explicit layout change (torch conv [out, in, kh, kw] -> [kh, kw, in, out], linear
[out, in] -> [in, out]), and fails with a ValueError naming the keys if any array is unused or
any model variable unset. Nothing here depends on torch.

Each converter lives in `zoo/converters/<family>.py` and is named by the registry entry of the
model it builds (`register_model(..., weights={source: "module:function"})`, as timm keeps
`checkpoint_filter_fn` beside `default_cfgs`); it is imported on first use, so importing this
module builds nothing. A new source is one function there and one `weights` entry.
"""
from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from zoo import registry
from zoo.converters import common as converter_common
from zoo.weight_files import load_state_dict  # noqa: F401  (public: zoo.convert.load_state_dict)


def from_source(source: str, state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                **overrides) -> nnx.Module:
    """Builds the zoo model registered for checkpoint `source` and loads `state_dict` into it.

    Args:
        source: a key of `zoo.registry.weight_sources()` ("timm:halonet_h1", "hf:gpt2", ...).
        state_dict: name -> array (numpy arrays or tensors).
        rngs: passed to the (shapes-only) model build; every weight comes from the
            state_dict unless the converter says otherwise (SSA's new parameters).
        **overrides: architecture facts the weights do not record (see each converter).
    """
    converter = registry.weight_converter(source)
    with converter_common.record_architectures() as built:
        model = converter(state_dict, rngs=rngs, **overrides)
    # Remembered with the constructor arguments read from the weights, so that
    # zoo.save_pretrained(model, folder) writes a card that rebuilds exactly this model.
    return registry.remember(model, registry.weight_sources()[source], {},
                             architecture=built[-1] if built else None)


def timm_models() -> list[str]:
    """timm model names `from_timm` accepts."""
    return sorted(source.partition(":")[2] for source in registry.weight_sources("timm:*"))


def from_timm(model_name: str, state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
              **overrides) -> nnx.Module:
    """timm's `model_name` -> the zoo model registered for "timm:<model_name>".

    Returns the model in eval-ready form: call it with `train=False` for timm's eval outputs.
    """
    if model_name not in timm_models():
        raise ValueError(f"no timm converter for model_name={model_name!r}; available: "
                         f"{timm_models()}")
    return from_source(f"timm:{model_name}", state_dict, rngs=rngs, **overrides)


def from_gpt2(state_dict: Mapping[str, Any], *, num_heads: int | None = None, ssa: bool = True,
              rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
    """Hugging Face `GPT2LMHeadModel` weights (any size) -> the SSA GPT (zoo/ssa.py), with
    selective attention added at its initialisation (`ssa=True`) or plain GPT-2 (`ssa=False`,
    same logits as GPT-2). See `zoo.converters.gpt2.gpt2_from_hf`."""
    return from_source("hf:gpt2", state_dict, num_heads=num_heads, ssa=ssa, rngs=rngs,
                       **overrides)


def from_qformer_vsa(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                     **overrides) -> nnx.Module:
    """Official Swin-T + VSA checkpoint (ViTAE-Transformer/QFormer layout) -> `vsa_swin_t`.
    See `zoo.converters.vsa.vsa_from_qformer`."""
    return from_source("qformer:swin_tiny_vsa", state_dict, rngs=rngs, **overrides)


def from_nvist_official(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                        **overrides) -> nnx.Module:
    """Official NViST checkpoint (wbjang/nvist_official layout) -> `nvist`.
    See `zoo.converters.nvist.nvist_from_official`."""
    return from_source("nvist_official", state_dict, rngs=rngs, **overrides)


def from_pix2seq_fit(state_dict: Mapping[str, Any], *, num_groups: int,
                     rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
    """pix2seq FIT weights (Keras variable names; FIT, FITAR or FITDenoiser, told apart by
    their embeddings) -> `fit_encoder_b`, `fit_ar_small` or `fit_denoiser_64`. See
    `zoo.converters.fit.fit_from_pix2seq` for what must be passed (num_groups; image_size,
    patch_size and in_chans for images)."""
    from zoo.converters import fit as fit_converter

    source = {"encoder": "pix2seq:fit", "ar": "pix2seq:fitar",
              "denoiser": "pix2seq:fit_denoiser"}[fit_converter.kind_of(state_dict)]
    return from_source(source, state_dict, rngs=rngs, num_groups=num_groups, **overrides)
