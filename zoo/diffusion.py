"""Gaussian diffusion for pixel denoisers (FIT / RIN style), as pure functions.

Conventions follow pix2seq's `models/diffusion_utils.py` (the FIT/RIN code base):
  * continuous time t in [0, 1]; gamma(t) = signal variance. Schedule "cosine" is pix2seq's
    `cosine_schedule_simple`: gamma(t) = cos^2(pi/2 * (t + 2e-4) / (1 + 2.5e-4));
    "linear" is gamma(t) = 1 - t (clipped), both decreasing from ~1 to ~0;
  * forward process x_t = sqrt(gamma) x_0 + sqrt(1 - gamma) eps, images scaled to [-1, 1];
  * the denoiser predicts eps (pix2seq's default `pred_type='eps'`); the loss is the mean
    squared error on eps, in float32;
  * latent self-conditioning (FIT/RIN `self_cond='latent'`): with probability
    `self_cond_rate` per example, a first pass without gradient produces latents that the
    second pass receives as `latents_prev`; the sampler carries them across steps;
  * samplers: DDIM (deterministic) and DDPM ("large" variance beta_t), x_0 clipped to [-1, 1]
    and eps re-derived from it at each step (pix2seq's truncate_noise).

The denoiser is any module called as `model(x_t, t, *, cond=None, latents_prev=None, train,
rngs) -> (eps_pred, latents)` with a `latent_shape` property (zoo.fit.FITDenoiser).
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


def denoising_loss(model, x0, rng, *, cond=None, schedule: str = "cosine",
                   self_cond_rate: float = 0.5, train: bool = True, rngs=None):
    """Mean squared eps error (float32) of one training step on images x0 in [-1, 1].

    rng: a jax key for t, the noise and the self-conditioning coin (dropout keys come from
    `rngs`). Returns (loss, t) so callers can report per-time metrics.
    """
    t_key, noise_key, coin_key = jax.random.split(rng, 3)
    b = x0.shape[0]
    t = jax.random.uniform(t_key, (b,))
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    x_t = add_noise(x0.astype(jnp.float32), t, noise, schedule)
    latents_prev = None
    if self_cond_rate > 0:
        _, latents = model(x_t, t, cond=cond, train=train, rngs=rngs)
        use = jax.random.bernoulli(coin_key, self_cond_rate, (b,))
        latents_prev = jnp.where(use[:, None, None, None], jax.lax.stop_gradient(latents),
                                 jnp.zeros_like(latents))
    eps, _ = model(x_t, t, cond=cond, latents_prev=latents_prev, train=train, rngs=rngs)
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
            eps, latents = model(x, t_now, cond=cond if has_cond else None,
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
