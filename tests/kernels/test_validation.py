"""Bad arguments to `kernels_pallas.attention` raise ValueError naming the argument, before any
kernel is traced; the TPU dispatch receives exactly the normalised internal signature."""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import attention

B, TQ, TK, H, D = 2, 12, 20, 3, 16


def _qkv(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(keys[0], (B, TQ, H, D), dtype),
            jax.random.normal(keys[1], (B, TK, H, D), dtype),
            jax.random.normal(keys[2], (B, TK, H, D), dtype))


Q, K, V = _qkv()


@pytest.mark.parametrize("args, kwargs, match", [
        ((Q[0], K, V), {}, r"q must be a 4-D array .*\(12, 3, 16\)"),
        ((Q, K[..., 0], V), {}, r"k must be a 4-D array"),
        ((Q.astype(jnp.int32), K, V), {}, r"q must have dtype float32, bfloat16 or float16"),
        ((Q, K.astype(jnp.bfloat16), V), {}, r"q, k and v must share one dtype"),
        ((Q, K[:1], V), {}, r"batch sizes differ"),
        ((Q, K[:, :, :2], V), {}, r"head counts differ"),
        ((Q, K[..., :8], V), {}, r"q and k head_dim differ"),
        ((Q, K, V[:, :7]), {}, r"k and v sequence lengths differ"),
        ((Q, K, V, jnp.zeros((B, TK))), {}, r"bias of shape \(2, 20\) is not broadcastable"),
        ((Q, K, V, jnp.zeros((1, 1, 1, 1, TK))), {}, r"bias of shape \(1, 1, 1, 1, 20\)"),
        ((Q, K, V, jnp.zeros((TQ, TK), jnp.int32)), {}, r"bias must be a float array"),
        ((Q, K, V), dict(q_lengths=jnp.array([3, 13])), r"q_lengths must lie in \[0, Tq=12\]"),
        ((Q, K, V), dict(kv_lengths=jnp.array([-1, 3])), r"kv_lengths must lie in \[0, Tk=20\]"),
        ((Q, K, V), dict(kv_lengths=jnp.array([3])), r"kv_lengths must have shape \(batch,\)"),
        ((Q, K, V), dict(q_lengths=jnp.array([3.0, 4.0])), r"q_lengths must be an integer"),
        ((Q, K, V), dict(q_segment_ids=jnp.zeros((B, TQ), jnp.int32)),
         r"q_segment_ids and kv_segment_ids must be given together"),
        ((Q, K, V), dict(q_segment_ids=jnp.zeros((B, TQ), jnp.int32),
                         kv_segment_ids=jnp.zeros((B, TQ), jnp.int32)),
         r"kv_segment_ids must have shape \(batch, Tk\) = \(2, 20\), got \(2, 12\)"),
        ((Q, K, V), dict(q_segment_ids=jnp.zeros((B, TQ)), kv_segment_ids=jnp.zeros((B, TK))),
         r"q_segment_ids must be an integer array"),
        ((Q, K, V), dict(logits="relu"), r"logits must be one of \('softmax', 'sigmoid'\)"),
        ((Q, K, V), dict(impl="cuda"), r"impl must be one of"),
        ((Q, K, V), dict(block_q=48), r"block_q must be None or a positive power of two, got 48"),
        ((Q, K, V), dict(block_k=0), r"block_k must be None or a positive power of two"),
        ((Q, K, V), dict(block_k=16.0), r"block_k must be None or a positive power of two"),
        ((Q, K, V), dict(block_q=True), r"block_q must be None or a positive power of two"),
        ((Q, K, V), dict(sigmoid_bias=-3.0), r"sigmoid_bias is only used with logits='sigmoid'"),
        ((Q, K, V), dict(scale="big"), r"scale must be a concrete"),
        ((Q, K, V), dict(causal="yes"), r"causal must be a bool"),
        ((Q, K, V), dict(impl="interpret", block_q=8), r"block_q must be >= 16"),
])
def test_bad_arguments_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention(*args, **kwargs)


def test_traced_scale_is_rejected_under_jit():
    with pytest.raises(ValueError, match="scale must be a concrete"):
        jax.jit(lambda q, s: attention(q, K, V, scale=s))(Q, 0.5)


def test_traced_lengths_are_accepted_under_jit():
    """Range checks need concrete values; traced lengths pass validation and run."""
    fn = jax.jit(lambda q, n: attention(q, K, V, kv_lengths=n, impl="xla"))
    out = fn(Q, jnp.array([5, 20], jnp.int32))
    assert out.shape == (B, TQ, H, D)


def test_bias_broadcast_shapes_are_accepted():
    for shape in [(TK,), (TQ, TK), (H, 1, TK), (1, H, TQ, TK), (B, 1, 1, TK), (B, H, TQ, 1)]:
        out = attention(Q, K, V, jnp.ones(shape), impl="xla")
        assert out.shape == (B, TQ, H, D)


def test_tpu_dispatch_gets_normalised_arguments(monkeypatch):
    """On a TPU backend impl='pallas' calls flash_tpu.tpu_attention with validated inputs."""
    seen = {}

    def fake_tpu_attention(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids,
                           kv_segment_ids, **kwargs):
        seen.update(bias=bias, q_lengths=q_lengths, kv_lengths=kv_lengths,
                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, **kwargs)
        return jnp.zeros((*q.shape[:3], v.shape[3]), q.dtype)

    module = types.ModuleType("kernels_pallas.flash_tpu")
    module.tpu_attention = fake_tpu_attention
    monkeypatch.setitem(sys.modules, "kernels_pallas.flash_tpu", module)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    attention(Q, K, V, jnp.ones((TQ, TK), jnp.bfloat16), impl="pallas", logits="sigmoid",
              kv_lengths=np.array([4, 20]), q_segment_ids=np.zeros((B, TQ), np.int8),
              kv_segment_ids=np.zeros((B, TK), np.int64), block_k=64)
    assert seen["bias"].shape == (1, 1, TQ, TK) and seen["bias"].dtype == jnp.bfloat16
    assert seen["q_lengths"] is None and seen["kv_lengths"].dtype == jnp.int32
    assert seen["q_segment_ids"].dtype == jnp.int32 == seen["kv_segment_ids"].dtype
    assert seen["causal"] is False and seen["logits"] == "sigmoid"
    assert seen["scale"] == pytest.approx(D ** -0.5) and isinstance(seen["scale"], float)
    assert seen["sigmoid_bias"] == pytest.approx(-np.log(TK))
    assert seen["block_q"] is None and seen["block_k"] == 64 and seen["interpret"] is False
