"""What a model attends to: `zoo.capture_attention(model, *inputs)`.

Every attention module of the zoo has a `capture_attention` switch (off by default). This function
switches it on for one forward pass, collects what the modules sow as `nnx.Intermediate`s, and
switches it off again. The captured values are computed on the pure-jnp reference beside the
model's own attention call, which is unchanged: the fused kernel still computes the output (up to
float rounding where XLA fuses the larger program differently), and training never pays for it.

What each module sows (its docstring has the layouts):
  * `zoo.layers.Attention` (ViT, DeiT, MAE, FIT, Swin's window attention):
    `attention_weights` [B, heads, q_len, kv_len] (Swin: per window, [B * windows, ...]);
  * HaloNet's `HaloAttention`: `attention_weights` [B, blocks_h, blocks_w, heads,
    query_block**2, window**2], each query over its block's neighbourhood;
  * VSA's `VSAAttention`: `window_corners` [B, heads, windows, 4, 2], the regressed windows in
    pixels of the layer's padded map, and `attention_weights` per window;
  * SSA's `SelectiveAttention`: `query_temperatures` and `value_temperatures` [B, T, heads] and
    `attention_weights` [B, heads, T, T];
  * NViST's `AdaLNBlock`: `attention_weights` [B, heads, N, M], from the 3-D tokens to the image
    patches in its cross-attention blocks.
All weights are float32 and cost O(q_len * kv_len) memory per layer: inspect small batches.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def attention_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """(dotted path, module) of every module of `model` with a `capture_attention` switch."""
    return [(".".join(str(part) for part in path), module)
            for path, module in nnx.iter_modules(model)
            if hasattr(type(module), "capture_attention")]


def capture_attention(model: nnx.Module, *args, jit: bool = True,
                      **kwargs) -> tuple[Any, dict[str, dict[str, jax.Array]]]:
    """Runs `model(*args, **kwargs)` once with attention capture on.

    Returns (output, maps): `maps[module path][name]` is what that module sowed, e.g.
    `maps["stages.0.blocks.0.attn"]["attention_weights"]`. A module called more than once in the
    pass (a decoder step loop, a shared block) gives a tuple, one entry per call.

    jit: run the pass under `nnx.jit` (keyword arguments are static); False runs it eagerly.
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention module that can be inspected "
                         "(none has a `capture_attention` switch)")
    had_own_switch = [("capture_attention" in vars(module)) for _, module in modules]
    for _, module in modules:
        module.capture_attention = True
    try:
        def forward(model, *args):
            return model(*args, **kwargs)

        if hasattr(nnx, "capture"):  # flax >= 0.12.5: sow() belongs inside nnx.capture
            run = nnx.capture(forward, nnx.Intermediate)
        else:
            def run(model, *args):
                return forward(model, *args), nnx.pop(model, nnx.Intermediate)
        output, captured = (nnx.jit(run) if jit else run)(model, *args)
    finally:
        for (_, module), own in zip(modules, had_own_switch):
            if own:
                module.capture_attention = False
            else:
                del module.capture_attention
    maps: dict[str, dict[str, jax.Array]] = {}
    for path, value in nnx.to_flat_state(captured):
        *module_path, name = (str(part) for part in path)
        value = value.get_value() if hasattr(value, "get_value") else value
        value = value[0] if isinstance(value, tuple) and len(value) == 1 else value
        maps.setdefault(".".join(module_path), {})[name] = value
    return output, maps
