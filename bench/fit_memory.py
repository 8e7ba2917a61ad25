r"""Memory and FLOPs of one FIT training step as the token count grows, vs a plain ViT.

  python bench/fit_memory.py            # 4K, 16K, 64K, 160K tokens (compile only, no run)
  python bench/fit_memory.py --quick    # small widths, 1K-16K tokens (< 3 min on 2 CPU cores)

Each row compiles ONE training step (forward, backward and an AdamW update; batch 1, bf16
compute, f32 parameters) with `jax.jit(...).lower(...).compile()` and reads
`compiled.memory_analysis()` (peak = temp + argument + output bytes, what the step needs
resident) and `compiled.cost_analysis()["flops"]`. Nothing is executed, so 160K-token steps
"fit" a laptop's compiler even where they would not fit a device. The growth exponent is the
log-log slope of peak memory / FLOPs against tokens between consecutive rows.

Models (FIT configuration chosen in the spirit of the paper's "6400x6400 images, 160K tokens in
16 GB" claim; the paper's exact one is not in the released code):
  * FIT encoder: patch 16 (so 6400 px = 400x400 = 160K tokens), groups of 16x16 patches
    (n = 256 tokens), 8 latents per group, c = 384, d_l = 768, 6 / 12 heads, spec
    '(2)4(2)4(2)', remat on every layer;
  * ViT: patch 16, width 384, depth 12, 6 heads, GAP head, no remat (a plain transformer of
    the same width over all tokens).
Attention runs through `kernels_pallas.attention` with impl="auto": the fused Pallas kernels
on GPU/TPU (memory linear in sequence length), the XLA reference on CPU, which materialises
every [heads, Tq, Tk] logit matrix. So CPU figures are an upper bound dominated by the
quadratic logits; the kernel's saving shows only when this script runs on a GPU/TPU.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import kernels_pallas  # noqa: E402
import zoo  # noqa: E402

PATCH = 16
GROUP_SIDE = 16  # patches per group side: n = 256 tokens
FULL_TOKENS = (4096, 16384, 65536, 160000)
QUICK_TOKENS = (1024, 4096, 16384)
FIT = dict(patch_size=PATCH, num_classes=1000, layer_spec="(2)4(2)4(2)", latents_per_group=8,
           x_dim=384, latent_dim=768, x_heads=6, latent_heads=12, remat=True)
VIT = dict(patch_size=PATCH, num_classes=1000, embed_dim=384, depth=12, num_heads=6,
           pool="gap")
QUICK_FIT = dict(FIT, x_dim=64, latent_dim=128, x_heads=2, latent_heads=4,
                 layer_spec="(1)2(1)")
QUICK_VIT = dict(VIT, embed_dim=64, depth=4, num_heads=2)
GIB = 2 ** 30


def side_for(tokens: int) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens or side % GROUP_SIDE:
        raise ValueError(f"{tokens} tokens is not a square grid of {GROUP_SIDE}-patch groups")
    return side * PATCH


def build(name: str, tokens: int, kwargs: dict):
    size = side_for(tokens)
    if name == "fit":
        groups = (size // PATCH // GROUP_SIDE) ** 2
        return zoo.create_model("fit_encoder_b", abstract=True, image_size=size,
                                num_groups=groups, dtype="bfloat16", **kwargs)
    return zoo.create_model("vit_s16", abstract=True, image_size=size, dtype="bfloat16",
                            **kwargs)


def step_stats(model) -> tuple[float, float]:
    """(peak GiB, GFLOPs) of one compiled training step of `model` at batch 1."""
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-3)
    size = model.image_size if hasattr(model, "image_size") else None
    side = size[0] if size else model.grid_size[0] * PATCH
    images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    opt_state = jax.eval_shape(tx.init, params)

    def train_step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(images).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    compiled = jax.jit(train_step).lower(params, opt_state, images, labels).compile()
    memory = compiled.memory_analysis()
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
            + memory.output_size_in_bytes) / GIB
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return peak, float(cost.get("flops", float("nan"))) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="fit,vit")
    args = parser.parse_args()
    tokens_list = QUICK_TOKENS if args.quick else FULL_TOKENS
    configs = {"fit": QUICK_FIT if args.quick else FIT, "vit": QUICK_VIT if args.quick else VIT}
    api = kernels_pallas.api
    route = next((r for r, _ in api.DISPATCH_TABLE.get(jax.default_backend(), ())
                  if r != "cudnn"), api.DEFAULT_ROUTE)  # what impl="auto" takes for FIT's calls
    print(f"# one training step (fwd+bwd+AdamW), batch 1, bf16 compute | device "
          f"{jax.devices()[0].device_kind} | attention impl 'auto' -> {route!r} | "
          f"jax {jax.__version__} | "
          f"{datetime.date.today()} | {'quick' if args.quick else 'full'} grid")
    print("| model | tokens | image px | peak GiB | GFLOPs | mem exponent | flop exponent | "
          "fits 16 GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        previous = None
        for tokens in tokens_list:
            try:
                peak, tflops = step_stats(build(name, tokens, configs[name]))
            except Exception as error:  # noqa: BLE001 - report a compile failure as a row
                print(f"| {name} | {tokens} | {side_for(tokens)} | compile failed: "
                      f"{type(error).__name__} | | | | |", flush=True)
                continue
            slopes = ("-", "-")
            if previous is not None:
                ratio = math.log(tokens / previous[0])
                slopes = (f"{math.log(peak / previous[1]) / ratio:.2f}",
                          f"{math.log(tflops / previous[2]) / ratio:.2f}")
            previous = (tokens, peak, tflops)
            print(f"| {name} | {tokens} | {side_for(tokens)} | {peak:.2f} | {tflops:,.1f} | "
                  f"{slopes[0]} | {slopes[1]} | {'yes' if peak <= 16 else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
