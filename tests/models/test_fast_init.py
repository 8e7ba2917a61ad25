"""`zoo.create_model` initialises through bucketed host draws (zoo/fast_init.py); the values must
be exactly those of plain eager jax. `bench/create_model.py` checks every registered model at
full size (its "bit-identical" column); here, one tiny model per model file, and the pieces."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import fast_init, registry

# One per model file; SSA at depth 3 so that its residual scaling divides by sqrt(6), which XLA
# and numpy round differently (the division must stay in jax).
CASES = [("swin_t", {}), ("vsa_swin_t", {}), ("halonet_h0", {}), ("fit_denoiser_64", {}),
         ("nvist_small", {}), ("ssa_gpt2_small", {"depth": 3})]


def _leaves(model):
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


@pytest.mark.parametrize("name,extra", CASES, ids=[c[0] for c in CASES])
def test_create_model_equals_plain_eager_init(name, extra):
    overrides = {**registry.tiny_overrides(name), **extra}
    fast = _leaves(zoo.create_model(name, **overrides))
    plain = _leaves(registry._entry(name).builder(rngs=nnx.Rngs(0), **overrides))
    assert fast.keys() == plain.keys()
    for key, value in fast.items():
        assert isinstance(value, jax.Array), (key, type(value))  # nothing left on the host
        assert value.dtype == plain[key].dtype, key
        np.testing.assert_array_equal(np.asarray(value), np.asarray(plain[key]), err_msg=key)


@pytest.mark.parametrize("shape", [(7, 5), (4097,)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_draws_are_prefixes_of_a_bucket(shape, dtype):
    key = jax.random.key(7)
    expected = [jax.random.truncated_normal(key, -2, 2, shape, dtype),
                jax.random.normal(key, shape, dtype),
                jax.random.uniform(key, shape, dtype, -1.0, 1.0)]
    with fast_init.host_random():
        got = [jax.random.truncated_normal(key, -2, 2, shape, dtype),
               jax.random.normal(key, shape, dtype),
               jax.random.uniform(key, shape, dtype, -1.0, 1.0)]
        scaled = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(
                key, (*shape, 1), dtype)
        divided = jax.random.normal(key, shape, dtype) * 0.02 / math.sqrt(6)
    for want, have in zip(expected, got):
        assert isinstance(have, np.ndarray) and have.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(scaled), np.asarray(
            jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(
                    key, (*shape, 1), dtype)))
    np.testing.assert_array_equal(np.asarray(divided), np.asarray(
            jax.random.normal(key, shape, dtype) * 0.02 / math.sqrt(6)))


def test_traced_keys_and_shardings_go_to_jax_and_patches_are_restored():
    original = jax.random.truncated_normal
    with pytest.raises(RuntimeError, match="boom"):
        with fast_init.host_random():
            traced = jax.jit(lambda k: jax.random.truncated_normal(k, -2, 2, (5,)))(
                    jax.random.key(1))
            assert isinstance(traced, jax.Array)
            raise RuntimeError("boom")
    assert jax.random.truncated_normal is original
    with fast_init.host_random():  # a draw above the host limit stays a device array
        large = jax.random.normal(jax.random.key(2), (fast_init._MAX_HOST_DRAW + 1,))
    assert isinstance(large, jax.Array) and not isinstance(large, np.ndarray)
    np.testing.assert_array_equal(traced, jax.random.truncated_normal(jax.random.key(1), -2, 2,
                                                                      (5,)))


def test_buckets_bound_the_waste():
    for n in (1, 4096, 4097, 70_000, 2**20 + 1, 3 * 2**20, 51_000_000):
        size = fast_init._bucket(n)
        assert size >= n
        if n > 2**20:
            assert size <= n * 1.125 + 1
