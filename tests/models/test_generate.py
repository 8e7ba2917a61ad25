"""zoo.generate: KV-cache generation equals full-sequence recompute; sampling options."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_ssa import randomise_ssa_params, tiny_model, tokens
from zoo import generate, ssa


def is_greedy_continuation(model, sequence, prompt_length):
    """Every generated token is the argmax of the full (uncached) forward at the previous
    position: one teacher-forced pass checks the whole greedy recompute, since the model is
    causal."""
    logits = nnx.jit(lambda m, t: m(t))(model, sequence)
    expected = jnp.argmax(logits[:, prompt_length - 1:-1], axis=-1)
    return np.array_equal(np.asarray(expected), np.asarray(sequence[:, prompt_length:]))


@pytest.mark.parametrize("switches", [dict(), dict(**ssa.SSA_OFF)])
def test_greedy_generation_equals_full_recompute(switches):
    model = randomise_ssa_params(tiny_model(**switches))
    prompt = tokens((3, 6), seed=7)
    out = generate.generate(model, prompt, max_new_tokens=12, greedy=True)
    assert out.shape == (3, 18) and out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out[:, :6]), np.asarray(prompt))
    assert is_greedy_continuation(model, out, 6)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = randomise_ssa_params(tiny_model())
    prompt = tokens((2, 4), seed=8)
    greedy = generate.generate(model, prompt, max_new_tokens=8, greedy=True)
    top1 = generate.generate(model, prompt, max_new_tokens=8, top_k=1, rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    a = generate.generate(model, prompt, max_new_tokens=8, temperature=2.0,
                          rng=jax.random.key(1))
    b = generate.generate(model, prompt, max_new_tokens=8, temperature=2.0,
                          rng=jax.random.key(1))
    c = generate.generate(model, prompt, max_new_tokens=8, temperature=2.0,
                          rng=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(a[:, :4]), np.asarray(prompt))


def test_top_k_restricts_samples_to_the_k_most_likely():
    model = randomise_ssa_params(tiny_model())
    prompt = tokens((64, 3), seed=9)
    out = generate.generate(model, prompt, max_new_tokens=1, temperature=5.0, top_k=3,
                            rng=jax.random.key(3))
    allowed = jax.lax.top_k(model(prompt)[:, -1], 3)[1]
    assert all(int(t) in set(np.asarray(row).tolist())
               for t, row in zip(np.asarray(out[:, -1]), allowed))


def test_bad_arguments_raise_before_compiling():
    model = tiny_model()
    prompt = tokens((1, 30))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=32"):
        generate.generate(model, prompt, max_new_tokens=3, greedy=True)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate.generate(model, prompt[:, :4], max_new_tokens=3, temperature=0.0,
                          rng=jax.random.key(0))
    with pytest.raises(ValueError, match="top_k must be None or an integer in \\[1, "
                                         "vocab_size=64\\]"):
        generate.generate(model, prompt[:, :4], max_new_tokens=3, top_k=65,
                          rng=jax.random.key(0))
    with pytest.raises(ValueError, match="needs `rng`"):
        generate.generate(model, prompt[:, :4], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate.generate(model, prompt[:, :4], max_new_tokens=0, greedy=True)
    with pytest.raises(ValueError, match="no `init_cache` method"):
        generate.generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), prompt, max_new_tokens=1,
                          greedy=True)
