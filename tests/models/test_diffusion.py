"""zoo/diffusion.py: schedule, forward process, objective, samplers."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import diffusion


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
def test_schedule_endpoints_and_monotonic(schedule):
    t = jnp.linspace(0.0, 1.0, 101)
    g = np.asarray(diffusion.gamma(t, schedule))
    assert g[0] > 0.999 and g[-1] < 1e-3
    assert np.all(np.diff(g) <= 0)
    assert np.all(g > 0)


def test_cosine_schedule_is_pix2seqs_formula():
    t = np.asarray([0.0, 0.25, 0.5, 0.9])
    expected = np.cos((t + 2e-4) / (1 + 2.5e-4) * math.pi / 2) ** 2
    np.testing.assert_allclose(np.asarray(diffusion.gamma(jnp.asarray(t))), expected, rtol=1e-5)


class EchoDenoiser(nnx.Module):
    """Predicts eps = a * x_t (a learnable scalar), latents = mean of x_t: a model whose loss
    has a closed form."""

    image_size, in_chans, latent_shape = (4, 4), 3, (1, 1, 1)

    def __init__(self, a):
        self.a = nnx.Param(jnp.asarray(a))
        self.calls = 0

    def __call__(self, x, t, *, cond=None, latents_prev=None, train=False, rngs=None):
        latents = jnp.mean(x, axis=(1, 2, 3)).reshape(-1, 1, 1, 1)
        if latents_prev is not None:
            x = x + 0.0 * latents_prev.sum()
        return self.a[...] * x, latents


def test_objective_equals_the_direct_formula():
    model = EchoDenoiser(0.3)
    x0 = jax.random.uniform(jax.random.key(0), (5, 4, 4, 3), minval=-1, maxval=1)
    key = jax.random.key(1)
    loss, t = diffusion.denoising_loss(model, x0, key, self_cond_rate=0.0)
    t_key, noise_key = jax.random.split(key)
    t_direct = jax.random.uniform(t_key, (5,))
    noise = jax.random.normal(noise_key, x0.shape)
    g = diffusion.gamma(t_direct).reshape(-1, 1, 1, 1)
    x_t = jnp.sqrt(g) * x0 + jnp.sqrt(1 - g) * noise
    np.testing.assert_allclose(np.asarray(t), np.asarray(t_direct))
    np.testing.assert_allclose(float(loss), float(jnp.mean((0.3 * x_t - noise) ** 2)),
                               rtol=1e-6)


def tiny_denoiser():
    return zoo.create_model("fit_denoiser_64", rngs=nnx.Rngs(0), image_size=8, patch_size=2,
                            num_groups=4, layer_spec="(1)1", latents_per_group=2, x_dim=16,
                            latent_dim=16, x_heads=2, latent_heads=2)


@pytest.mark.parametrize("sampler", diffusion.SAMPLERS)
def test_sampler_runs_in_range_and_is_deterministic_given_a_key(sampler):
    model = tiny_denoiser()
    a = diffusion.sample(model, jax.random.key(0), 3, steps=5, sampler=sampler)
    b = diffusion.sample(model, jax.random.key(0), 3, steps=5, sampler=sampler)
    c = diffusion.sample(model, jax.random.key(1), 3, steps=5, sampler=sampler)
    assert a.shape == (3, 8, 8, 3)
    assert float(jnp.abs(a).max()) <= 1.0
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_ddim_step_with_the_true_noise_recovers_x0():
    x0 = jax.random.uniform(jax.random.key(2), (2, 4, 4, 3), minval=-0.9, maxval=0.9)
    noise = jax.random.normal(jax.random.key(3), x0.shape)
    t_now, t_next = jnp.full((2,), 0.7), jnp.full((2,), 0.4)
    x_t = diffusion.add_noise(x0, t_now, noise)
    x_next, x0_hat = diffusion._step(x_t, noise, diffusion.gamma(t_now),
                                     diffusion.gamma(t_next), "ddim", None)
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_next),
                               np.asarray(diffusion.add_noise(x0, t_next, noise)), atol=1e-5)


def test_bad_sampler_arguments():
    model = tiny_denoiser()
    with pytest.raises(ValueError, match="sampler must be one of"):
        diffusion.sample(model, jax.random.key(0), 1, sampler="euler")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        diffusion.sample(model, jax.random.key(0), 1, steps=0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        diffusion.gamma(jnp.zeros(2), "sigmoid")


class RecordingDenoiser(nnx.Module):
    """Records what each call receives; latents = a per-example marker (1 + example index)."""

    image_size, in_chans, latent_shape = (4, 4), 3, (1, 1, 1)

    def __init__(self):
        self.calls = []

    def __call__(self, x, g, *, cond=None, latents_prev=None, train=False, rngs=None):
        self.calls.append(dict(batch=x.shape[0], gamma=g, x=x, cond=cond,
                               latents_prev=latents_prev))
        marker = 1.0 + jnp.arange(x.shape[0], dtype=jnp.float32).reshape(-1, 1, 1, 1)
        return jnp.zeros_like(x), marker * jnp.mean(jnp.abs(x), axis=(1, 2, 3),
                                                     keepdims=True)


@pytest.mark.parametrize("rate,batch,strided", [(0.5, 8, True), (0.25, 8, True),
                                                 (0.6, 5, False), (1.0, 3, True)])
def test_self_conditioning_is_a_first_pass_on_part_of_the_batch(rate, batch, strided):
    """pix2seq's add_self_cond_hidden: floor(B * rate) examples get a first pass, the whole
    batch the second, the others zero latents; the denoiser sees gamma(t), not t."""
    model = RecordingDenoiser()
    x0 = jax.random.uniform(jax.random.key(0), (batch, 4, 4, 3), minval=-1, maxval=1)
    cond = jax.nn.one_hot(jnp.arange(batch) % 3, 3)
    _, t = diffusion.denoising_loss(model, x0, jax.random.key(1), cond=cond,
                                    self_cond_rate=rate)
    first, second = model.calls
    count = int(batch * rate)
    chosen = (np.arange(batch)[::round(1 / rate)] if strided else np.arange(count))
    assert first["batch"] == count == len(chosen) and second["batch"] == batch
    np.testing.assert_array_equal(np.asarray(first["x"]), np.asarray(second["x"])[chosen])
    np.testing.assert_array_equal(np.asarray(first["cond"]), np.asarray(cond)[chosen])
    np.testing.assert_allclose(np.asarray(second["gamma"]), np.asarray(diffusion.gamma(t)))
    prev = np.asarray(second["latents_prev"]).reshape(batch)
    expected = np.zeros(batch)
    expected[chosen] = (1.0 + np.arange(count)) * np.abs(np.asarray(first["x"])).mean((1, 2, 3))
    np.testing.assert_allclose(prev, expected, rtol=1e-6)
    assert np.all(prev[chosen] > 0)


def test_no_self_conditioning_is_one_pass():
    model = RecordingDenoiser()
    diffusion.denoising_loss(model, jnp.zeros((4, 4, 4, 3)), jax.random.key(0),
                             self_cond_rate=0.0)
    assert len(model.calls) == 1 and model.calls[0]["latents_prev"] is None

