"""Gaussian diffusion for pixel denoisers (FIT / RIN style), as pure functions.

Conventions follow pix2seq's `models/diffusion_utils.py` (the FIT/RIN code base):
  * continuous time t in [0, 1]; gamma(t) = signal variance. Schedule "cosine" is pix2seq's
    `cosine_schedule_simple`: gamma(t) = cos^2(pi/2 * (t + 2e-4) / (1 + 2.5e-4));
    "linear" is gamma(t) = 1 - t (clipped), both decreasing from ~1 to ~0;
  * forward process x_t = sqrt(gamma) x_0 + sqrt(1 - gamma) eps, images scaled to [-1, 1];
  * the denoiser predicts eps (pix2seq's default `pred_type='eps'`); the loss is the mean
    squared error on eps, in float32;
  * latent self-conditioning (FIT/RIN `self_cond='latent'`): a first pass without gradient on
    `self_cond_rate` of the batch produces latents that the second pass receives as
    `latents_prev` (zeros for the other examples), in training and in the eval loss as pix2seq
    computes both; the sampler carries them across steps;
  * samplers: DDIM (deterministic) and DDPM ("large" variance beta_t), x_0 clipped to [-1, 1]
    and eps re-derived from it at each step (pix2seq's truncate_noise).

The denoiser is any module called as `model(x_t, gamma, *, cond=None, latents_prev=None, train,
rngs) -> (eps_pred, latents)` with a `latent_shape` property (zoo.fit.FITDenoiser). It is
conditioned on the noise level gamma(t) [B], not on t: pix2seq's `noise_denoise` and samplers
hand the denoiser gamma, which makes the network independent of the schedule.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

SCHEDULES = ("cosine", "linear")
SAMPLERS = ("ddim", "ddpm")
_GAMMA_MIN = 1e-9


def gamma(t: jax.Array, schedule: str = "cosine") -> jax.Array:
    """Signal variance at time t (float32, same shape as t)."""
    t = jnp.asarray(t, jnp.float32)
    if schedule == "cosine":
        g = jnp.cos((t + 2e-4) / (1.0 + 2.5e-4) * (math.pi / 2)) ** 2
    elif schedule == "linear":
        g = 1.0 - t
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return jnp.clip(g, _GAMMA_MIN, 1.0)


def add_noise(x0, t, noise, schedule: str = "cosine"):
    """x_t = sqrt(gamma(t)) x0 + sqrt(1 - gamma(t)) noise; t: [B]."""
    g = gamma(t, schedule).reshape(-1, *([1] * (x0.ndim - 1)))
    return jnp.sqrt(g) * x0 + jnp.sqrt(1.0 - g) * noise


def _first_pass_examples(batch: int, rate: float):
    """Which examples get a self-conditioning first pass: pix2seq takes the first
    floor(batch * rate) of its (per-replica) batch. With rate = 1/k and k dividing the batch we
    take every k-th example instead: as many, and under data parallelism each device keeps its
    share (a prefix would move the first half of the global batch onto half the devices)."""
    count = int(batch * rate)
    k = round(1.0 / rate) if rate > 0 else 0
    if k >= 1 and abs(1.0 / rate - k) < 1e-9 and batch % k == 0:
        return slice(None, None, k), count
    return slice(0, count), count


def self_conditioned_eps(model, x_t, g, *, cond=None, self_cond_rate: float = 0.5,
                         train: bool = False, rngs=None):
    """eps predicted with latent self-conditioning as pix2seq's `add_self_cond_hidden` does it
    (self_cond_by_masking=False): a first pass on floor(B * rate) examples (no gradient) gives
    their latents to the second pass over the whole batch; the other examples get zeros. The
    cost is (1 + rate) forward passes. rate 0: one pass, no self-conditioning."""
    b = x_t.shape[0]
    latents_prev = None
    if self_cond_rate > 0:
        chosen, count = _first_pass_examples(b, self_cond_rate)
        if count > 0:
            sub_cond = None if cond is None else cond[chosen]
            _, latents = model(x_t[chosen], g[chosen], cond=sub_cond, train=train, rngs=rngs)
            latents = jax.lax.stop_gradient(latents.astype(jnp.float32))
            if chosen.step is not None:  # every k-th example: interleave with zeros
                k = chosen.step
                zeros = [jnp.zeros_like(latents)] * (k - 1)
                latents_prev = jnp.stack([latents, *zeros], axis=1).reshape(
                        b, *latents.shape[1:])
            else:
                latents_prev = jnp.concatenate(
                        [latents, jnp.zeros((b - count, *latents.shape[1:]), latents.dtype)])
    eps, _ = model(x_t, g, cond=cond, latents_prev=latents_prev, train=train, rngs=rngs)
    return eps


def denoising_loss(model, x0, rng, *, cond=None, schedule: str = "cosine",
                   self_cond_rate: float = 0.5, train: bool = True, rngs=None):
    """Mean squared eps error (float32) of one training step on images x0 in [-1, 1].

    rng: a jax key for t and the noise (dropout keys come from `rngs`). The denoiser sees the
    noise level gamma(t) and self-conditions `self_cond_rate` of the batch
    (`self_conditioned_eps`). Returns (loss, t) so callers can report per-time metrics.
    """
    t_key, noise_key = jax.random.split(rng)
    b = x0.shape[0]
    t = jax.random.uniform(t_key, (b,))
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x_t = add_noise(x0.astype(jnp.float32), t, noise, schedule)
    eps = self_conditioned_eps(model, x_t, gamma(t, schedule), cond=cond,
                               self_cond_rate=self_cond_rate, train=train, rngs=rngs)
    return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise)), t


def _step(x_t, eps_pred, g_now, g_next, sampler, key):
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    g_now, g_next = g_now.reshape(shape), g_next.reshape(shape)
    x0 = jnp.clip((x_t - jnp.sqrt(1.0 - g_now) * eps_pred) / jnp.sqrt(g_now), -1.0, 1.0)
    eps = (x_t - jnp.sqrt(g_now) * x0) / jnp.sqrt(1.0 - g_now)
    if sampler == "ddim":
        return jnp.sqrt(g_next) * x0 + jnp.sqrt(1.0 - g_next) * eps, x0
    alpha = jnp.clip(g_now / g_next, 0.0, 1.0)
    mean = (x_t - (1.0 - alpha) / jnp.sqrt(1.0 - g_now) * eps) / jnp.sqrt(alpha)
    return mean + jnp.sqrt(1.0 - alpha) * jax.random.normal(key, x_t.shape), x0


@functools.lru_cache(maxsize=16)
def _sampler(graphdef, shape, steps, sampler, schedule, has_cond):
    @jax.jit
    def run(state, rng, cond):
        model = nnx.merge(graphdef, state)
        rng, init_key = jax.random.split(rng)
        x = jax.random.normal(init_key, shape, jnp.float32)
        latents = jnp.zeros((shape[0], *model.latent_shape), jnp.float32)

        def body(i, carry):
            x, latents, rng, _ = carry
            rng, key = jax.random.split(rng)
            t_now = jnp.full((shape[0],), 1.0 - i / steps)
            t_next = jnp.full((shape[0],), 1.0 - (i + 1) / steps)
            eps, latents = model(x, gamma(t_now, schedule), cond=cond if has_cond else None,
                                 latents_prev=latents)
            x, x0 = _step(x, eps.astype(jnp.float32), gamma(t_now, schedule),
                          gamma(t_next, schedule), sampler, key)
            return x, latents.astype(jnp.float32), rng, x0

        _, _, _, x0 = jax.lax.fori_loop(0, steps, body, (x, latents, rng, x))
        return x0

    return run


def sample(model: nnx.Module, rng: jax.Array, num_samples: int, *, steps: int = 100,
           sampler: str = "ddim", schedule: str = "cosine", cond=None) -> jax.Array:
    """num_samples images in [-1, 1] ([N, H, W, C] float32) from pure noise in `steps` steps,
    carrying the latents from step to step (latent self-conditioning). One jit program."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    shape = (num_samples, *model.image_size, model.in_chans)
    graphdef, state = nnx.split(model)
    run = _sampler(graphdef, shape, steps, sampler, schedule, cond is not None)
    return run(state, rng, cond)
