"""Hugging Face `GPT2LMHeadModel` (or `GPT2Model`) state_dict -> `zoo.ssa.SelectiveGPT`.

HF GPT-2 stores its projections as `Conv1D` modules whose weight is already [in, out] (no
transpose, unlike `nn.Linear`); `c_attn` packs q|k|v along the output axis, which reshapes to
our fused (in, 3, width) kernel. `lm_head.weight` is tied to `transformer.wte.weight` (checked
equal, then dropped); the causal-mask buffers `attn.bias` / `attn.masked_bias` that older
transformers versions save are ignored.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from zoo import ssa as ssa_lib
from zoo.converters.common import (StateDictReader, assign, build_abstract, check_all_set,
                                   check_overrides, note_architecture)

_INFERRED = ("vocab_size", "max_seq_len", "width", "depth", "num_heads")


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Accepts GPT2LMHeadModel ("transformer.h.0...") and GPT2Model ("h.0...") names."""
    out = {}
    for key, value in state_dict.items():
        if re.search(r"\.attn\.(masked_)?bias$", key):
            continue  # causal-mask buffers, not weights
        out[key[len("transformer."):] if key.startswith("transformer.") else key] = value
    return out


def _load_linear(linear, reader: StateDictReader, prefix: str, out_shape) -> None:
    weight = reader.get(f"{prefix}.weight")  # Conv1D: [in, out]
    assign(linear.kernel, weight.reshape(weight.shape[0], *out_shape), f"{prefix}.weight")
    assign(linear.bias, reader.get(f"{prefix}.bias").reshape(out_shape), f"{prefix}.bias")


def _load_norm(norm, reader: StateDictReader, prefix: str) -> None:
    assign(norm.scale, reader.get(f"{prefix}.weight"), f"{prefix}.weight")
    assign(norm.bias, reader.get(f"{prefix}.bias"), f"{prefix}.bias")


def gpt2_from_hf(state_dict: Mapping[str, Any], *, num_heads: int | None = None,
                 ssa: bool = True, rngs: nnx.Rngs | None = None,
                 **overrides) -> ssa_lib.SelectiveGPT:
    """GPT-2 weights into the SSA GPT.

    Sizes (vocab, positions, width, depth) are read from the arrays; `num_heads` is not
    recorded in GPT-2 weights and defaults to width / 64, as in every released GPT-2 size.
    ssa=True adds all selective-attention parameters at their initialisation (drawn from
    `rngs`; the token temperatures are zero-initialised and beta = `ssa_beta_init`), ready for
    fine-tuning as in the paper; ssa=False gives plain GPT-2 with GPT-2's logits. Other
    `zoo.ssa.SelectiveGPT` options that leave no trace in the weights (dtype, attn_impl,
    dropout_rate, the individual `ssa_*` switches, ...) may be overridden.
    """
    if not isinstance(ssa, bool):
        raise ValueError(f"ssa must be True or False, got {ssa!r}")
    check_overrides(overrides, model_args=ssa_lib.MODEL_ARGS, inferred=_INFERRED,
                    model="SelectiveGPT", entry_point="from_gpt2")
    arrays = _strip_prefix(state_dict)
    reader = StateDictReader(arrays)
    vocab_size, width = reader.shape("wte.weight")
    max_seq_len = reader.shape("wpe.weight")[0]
    depth = len({int(m.group(1)) for key in arrays if (m := re.match(r"h\.(\d+)\.", key))})
    if depth == 0:
        raise ValueError("state_dict has no 'h.<i>.' blocks: not a GPT-2 checkpoint")
    if num_heads is None:
        if width % 64:
            raise ValueError(f"width {width} is not a multiple of 64: pass num_heads (GPT-2 "
                             f"weights do not record it)")
        num_heads = width // 64
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 \
            or width % num_heads:
        raise ValueError(f"num_heads must be a positive integer dividing the width {width}, "
                         f"got {num_heads!r}")
    if reader.has("lm_head.weight"):
        head = reader.get("lm_head.weight")
        if not np.array_equal(head, reader.get("wte.weight")):
            raise ValueError("lm_head.weight differs from transformer.wte.weight: this model "
                             "ties its output head to the token embedding, as GPT-2 does")
    kwargs = dict(vocab_size=vocab_size, max_seq_len=max_seq_len, width=width, depth=depth,
                  num_heads=num_heads)
    if not ssa:
        kwargs.update(ssa_lib.SSA_OFF)
    kwargs.update(overrides)

    def build(r):
        return ssa_lib.SelectiveGPT(**kwargs, rngs=r)

    # With SSA the new parameters need their real initialisation, so the model is built for
    # real (the GPT-2 weights it draws are then replaced); without, shapes suffice.
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    note_architecture(kwargs)
    model = build(rngs) if ssa else build_abstract(build, rngs)
    assign(model.embedding, reader.get("wte.weight"), "wte.weight")
    assign(model.pos_embedding, reader.get("wpe.weight"), "wpe.weight")
    for i, block in enumerate(model.blocks):
        prefix = f"h.{i}"
        _load_norm(block.norm1, reader, f"{prefix}.ln_1")
        _load_linear(block.attn.qkv, reader, f"{prefix}.attn.c_attn", (3, width))
        _load_linear(block.attn.proj, reader, f"{prefix}.attn.c_proj", (width,))
        _load_norm(block.norm2, reader, f"{prefix}.ln_2")
        _load_linear(block.mlp.fc1, reader, f"{prefix}.mlp.c_fc", (block.mlp.fc1.out_shape))
        _load_linear(block.mlp.fc2, reader, f"{prefix}.mlp.c_proj", (width,))
    _load_norm(model.final_norm, reader, "ln_f")
    reader.check_all_used("GPT-2")
    check_all_set(model, "SelectiveGPT")
    return model
