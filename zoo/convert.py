"""Weight import from other frameworks' checkpoints: the public entry points.

  from_timm(timm_model_name, state_dict)   timm models, looked up in `TIMM_CONVERTERS`
  from_gpt2(state_dict, ...)               Hugging Face `GPT2LMHeadModel` -> SSA GPT
  from_qformer_vsa(state_dict, ...)        official Swin-T + VSA (QFormer repo layout)
  from_nvist_official(state_dict, ...)     official NViST (encoder, decoder, renderer)

A state_dict is name -> array (numpy arrays; torch tensors are accepted too). Each converter
infers what it can from the array shapes, builds the zoo model, copies every array into it with
an explicit layout change (torch conv [out, in, kh, kw] -> [kh, kw, in, out], linear
[out, in] -> [in, out]), and fails with a ValueError naming the keys if any array is unused or
any model variable unset. Nothing here depends on torch.

The converters live in `zoo/converters/<family>.py` and are imported on first use, so that
importing this module does not build every model family. A new timm family is one function
there and one row in `TIMM_CONVERTERS` ("module:function").
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

from flax import nnx

TIMM_CONVERTERS: dict[str, str] = {
        "halonet_h1": "zoo.converters.halonet:halonet_from_timm",
        "swin_tiny_patch4_window7_224": "zoo.converters.swin:swin_from_timm",
}


def _load(target: str) -> Callable[..., nnx.Module]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


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
    return _load(TIMM_CONVERTERS[model_name])(state_dict, rngs=rngs, **overrides)


def from_gpt2(state_dict: Mapping[str, Any], *, num_heads: int | None = None, ssa: bool = True,
              rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
    """Hugging Face `GPT2LMHeadModel` weights -> the SSA GPT (zoo/ssa.py), with selective
    attention added at its initialisation (`ssa=True`) or plain GPT-2 (`ssa=False`, same
    logits as GPT-2). See `zoo.converters.gpt2.gpt2_from_hf`."""
    return _load("zoo.converters.gpt2:gpt2_from_hf")(state_dict, num_heads=num_heads, ssa=ssa,
                                                     rngs=rngs, **overrides)


def from_qformer_vsa(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                     **overrides) -> nnx.Module:
    """Official Swin-T + VSA checkpoint (ViTAE-Transformer/QFormer layout) -> `vsa_swin_t`.
    See `zoo.converters.vsa.vsa_from_qformer`."""
    return _load("zoo.converters.vsa:vsa_from_qformer")(state_dict, rngs=rngs, **overrides)


def from_nvist_official(state_dict: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                        **overrides) -> nnx.Module:
    """Official NViST checkpoint (wbjang/nvist_official layout) -> `nvist`.
    See `zoo.converters.nvist.nvist_from_official`."""
    return _load("zoo.converters.nvist:nvist_from_official")(state_dict, rngs=rngs,
                                                              **overrides)
