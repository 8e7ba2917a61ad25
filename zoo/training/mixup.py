"""Mixup and CutMix on a training batch, with timm's semantics (`timm.data.Mixup`).

Runs on the device inside the train step, on the global batch, with a key derived from
(seed, step, micro-batch), so it is identical for any number of hosts and bit-exact on resume.

Per call (timm `Mixup.__call__`):
  * with probability `prob` the batch is mixed, else left as is (lambda = 1);
  * when both alphas are > 0, CutMix is chosen with probability `switch_prob`, else Mixup;
    with one alpha > 0, that one is used;
  * lambda ~ Beta(alpha, alpha) of the chosen method;
  * Mixup: x = lambda * x + (1 - lambda) * x_flipped; CutMix pastes a box of x_flipped whose
    area fraction is about 1 - lambda (`cutmix_minmax` instead draws its sides uniformly in
    [min, max] x image side), and lambda becomes 1 - box area / image area (timm's
    correct_lam, always on here);
  * the partner of example i is example B-1-i (timm flips the batch);
  * mode "batch": one draw for the whole batch; "pair": one per pair (i, B-1-i), shared by
    both; "elem": one per example;
  * targets: lambda * smooth(one_hot(y)) + (1 - lambda) * smooth(one_hot(y_flipped)), with
    timm's smoothing (off = s / C, on = 1 - s + off).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODES = ("batch", "pair", "elem")


def enabled(c) -> bool:
    return float(c.mixup_alpha) > 0 or _cutmix_alpha(c) > 0


def _cutmix_alpha(c) -> float:
    # timm forces cutmix_alpha = 1 when cutmix_minmax is set (lambda then comes from the box).
    return 1.0 if tuple(c.cutmix_minmax) else float(c.cutmix_alpha)


def validate(config) -> None:
    """ValueError naming the field for an unusable `config.mixup`."""
    c = config.mixup
    for name in ("mixup_alpha", "cutmix_alpha"):
        value = float(c[name])
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"config.mixup.{name}={c[name]!r} is invalid; allowed: a number "
                             f">= 0 (0 disables it)")
    for name in ("prob", "switch_prob"):
        value = float(c[name])
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"config.mixup.{name}={c[name]!r} is invalid; allowed: a "
                             f"probability in [0, 1]")
    if c.mode not in MODES:
        raise ValueError(f"config.mixup.mode={c.mode!r} is invalid; allowed: one of {MODES}")
    minmax = tuple(c.cutmix_minmax)
    if minmax and (len(minmax) != 2 or not 0.0 < minmax[0] <= minmax[1] <= 1.0):
        raise ValueError(f"config.mixup.cutmix_minmax={minmax!r} is invalid; allowed: () or "
                         f"(min, max) with 0 < min <= max <= 1")
    if enabled(c) and config.get("task", "classification") != "classification":
        raise ValueError(f"config.mixup applies to classification only; config.task="
                         f"{config.task!r}")


def smooth_one_hot(labels, num_classes: int, smoothing: float):
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def _draws(c, key, count: int):
    """(lambda [count], use_cutmix [count] bool) before box correction."""
    k_apply, k_switch, k_mix, k_cut = jax.random.split(key, 4)
    mixup_alpha, cutmix_alpha = float(c.mixup_alpha), _cutmix_alpha(c)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch, (count,)) < float(c.switch_prob)
    else:
        use_cutmix = jnp.full((count,), cutmix_alpha > 0)
    lam_mix = (jax.random.beta(k_mix, mixup_alpha, mixup_alpha, (count,))
               if mixup_alpha > 0 else jnp.ones((count,)))
    lam_cut = (jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha, (count,))
               if cutmix_alpha > 0 else jnp.ones((count,)))
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
    apply = jax.random.uniform(k_apply, (count,)) < float(c.prob)
    return jnp.where(apply, lam, 1.0).astype(jnp.float32), use_cutmix & apply


def _boxes(c, key, lam, height: int, width: int):
    """Integer boxes (y0, y1, x0, x1) per draw, as timm's rand_bbox / rand_bbox_minmax."""
    k_cy, k_cx, k_h, k_w = jax.random.split(key, 4)
    count = lam.shape[0]
    minmax = tuple(c.cutmix_minmax)
    if minmax:
        # randint(int(min * side), int(max * side)) sides, randint(0, side - cut) corners.
        cut_h = jnp.floor(jax.random.uniform(k_h, (count,), minval=int(minmax[0] * height),
                                             maxval=int(minmax[1] * height)))
        cut_w = jnp.floor(jax.random.uniform(k_w, (count,), minval=int(minmax[0] * width),
                                             maxval=int(minmax[1] * width)))
        y0 = jnp.floor(jax.random.uniform(k_cy, (count,)) * (height - cut_h))
        x0 = jnp.floor(jax.random.uniform(k_cx, (count,)) * (width - cut_w))
        return y0, y0 + cut_h, x0, x0 + cut_w
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = jnp.floor(height * ratio), jnp.floor(width * ratio)
    cy = jnp.floor(jax.random.uniform(k_cy, (count,)) * height)
    cx = jnp.floor(jax.random.uniform(k_cx, (count,)) * width)
    y0 = jnp.clip(cy - jnp.floor(cut_h / 2), 0, height)
    y1 = jnp.clip(cy + jnp.floor(cut_h / 2), 0, height)
    x0 = jnp.clip(cx - jnp.floor(cut_w / 2), 0, width)
    x1 = jnp.clip(cx + jnp.floor(cut_w / 2), 0, width)
    return y0, y1, x0, x1


def mix_batch(c, key, images, labels, num_classes: int, smoothing: float):
    """(mixed images [B, H, W, C], soft targets [B, num_classes] f32, lambda [B]).

    `c` is `config.mixup`; images NHWC. lambda is per example (equal across the batch in
    "batch" mode), after CutMix's area correction."""
    batch, height, width = images.shape[:3]
    if c.mode == "batch":
        count = 1
    elif c.mode == "pair":
        if batch % 2:
            raise ValueError(f"config.mixup.mode='pair' needs an even batch, got {batch}")
        count = batch // 2
    else:
        count = batch
    k_draw, k_box = jax.random.split(key)
    lam, use_cutmix = _draws(c, k_draw, count)
    y0, y1, x0, x1 = _boxes(c, k_box, lam, height, width)
    area = (y1 - y0) * (x1 - x0)
    lam = jnp.where(use_cutmix, 1.0 - area / (height * width), lam)

    def per_example(values):  # [count] -> [B]
        if c.mode == "batch":
            return jnp.broadcast_to(values, (batch,))
        if c.mode == "pair":  # pair (i, B-1-i) shares draw i
            return jnp.concatenate([values, values[::-1]])
        return values

    lam_b, cut_b = per_example(lam), per_example(use_cutmix)
    box = [per_example(v) for v in (y0, y1, x0, x1)]
    flipped = images[::-1]
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = ((rows >= box[0][:, None, None]) & (rows < box[1][:, None, None])
              & (cols >= box[2][:, None, None]) & (cols < box[3][:, None, None]))
    pasted = jnp.where(inside[..., None], flipped, images)
    lam_x = lam_b.astype(images.dtype)[:, None, None, None]
    blended = images * lam_x + flipped * (1 - lam_x)
    mixed = jnp.where(cut_b[:, None, None, None], pasted, blended)
    targets = smooth_one_hot(labels, num_classes, smoothing)
    soft = lam_b[:, None] * targets + (1.0 - lam_b[:, None]) * targets[::-1]
    return mixed, soft, lam_b
