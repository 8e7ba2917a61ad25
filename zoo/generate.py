"""Autoregressive sampling with a KV cache, for any zoo language model that offers
`init_cache(batch, max_length)` and `decode(tokens, cache, position)` (e.g. zoo/ssa.py).

One jit-compiled program per (model structure, shapes, sampling settings): a prefill of the
whole prompt, then a `lax.fori_loop` of single-token steps writing into a preallocated output.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from flax import nnx


def _check(model, prompt, max_new_tokens, temperature, top_k, greedy, rng):
    for method in ("init_cache", "decode"):
        if not callable(getattr(model, method, None)):
            raise ValueError(f"{type(model).__name__} has no `{method}` method: generate needs "
                             f"a language model with a KV cache")
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape "
                         f"{prompt.shape}")
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral)
            or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    total = prompt.shape[1] + int(max_new_tokens)
    max_seq_len = getattr(model, "max_seq_len", None)
    if max_seq_len is not None and total > max_seq_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} "
                         f"= {total} exceeds the model's max_seq_len={max_seq_len}")
    vocab = getattr(model, "vocab_size", None)
    if not greedy:
        if not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling (use greedy=True for "
                             f"argmax decoding), got {temperature!r}")
        if rng is None:
            raise ValueError("sampling needs `rng` (a jax.random key), or pass greedy=True")
    if top_k is not None:
        if (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                or top_k < 1 or (vocab is not None and top_k > vocab)):
            raise ValueError(f"top_k must be None or an integer in [1, vocab_size={vocab}], "
                             f"got {top_k!r}")


def _next_token(logits, rng, *, temperature, top_k, greedy):
    """logits [B, V] f32 -> token ids [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, max_new_tokens, temperature, top_k, greedy):
    pick = functools.partial(_next_token, temperature=temperature, top_k=top_k, greedy=greedy)

    @jax.jit
    def run(state, prompt, rng):
        model = nnx.merge(graphdef, state)
        batch, length = prompt.shape
        cache = model.init_cache(batch, length + max_new_tokens)
        logits, cache = model.decode(prompt, cache, 0)
        rng, step_rng = jax.random.split(rng)
        first = pick(logits[:, -1].astype(jnp.float32), step_rng)
        out = jnp.zeros((batch, length + max_new_tokens), jnp.int32)
        out = out.at[:, :length].set(prompt.astype(jnp.int32)).at[:, length].set(first)

        def step(i, carry):
            out, cache, rng = carry
            position = length + i - 1  # the position of the token fed in this step
            token = jax.lax.dynamic_slice_in_dim(out, position, 1, axis=1)
            logits, cache = model.decode(token, cache, position)
            rng, step_rng = jax.random.split(rng)
            nxt = pick(logits[:, -1].astype(jnp.float32), step_rng)
            return jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], position + 1,
                                                       axis=1), cache, rng

        out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache, rng))
        return out

    return run


def generate(model: nnx.Module, prompt: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, greedy: bool = False,
             rng: jax.Array | None = None) -> jax.Array:
    """Continues `prompt` [B, P] (int ids) by `max_new_tokens` tokens -> [B, P + new] int32.

    greedy=True takes the argmax at every step (temperature, top_k and rng are then unused);
    otherwise tokens are sampled from softmax(logits / temperature), restricted to the top_k
    most likely when top_k is given. All rows of the prompt have the same length.
    """
    prompt = jnp.asarray(prompt)
    _check(model, prompt, max_new_tokens, temperature, top_k, greedy, rng)
    if rng is None:
        rng = jax.random.key(0)
    graphdef, state = nnx.split(model)
    run = _compiled(graphdef, int(max_new_tokens), None if greedy else float(temperature),
                    None if (greedy or top_k is None) else int(top_k), bool(greedy))
    return run(state, prompt.astype(jnp.int32), rng)
