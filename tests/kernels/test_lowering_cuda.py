"""The GPU kernel lowers through Pallas -> Triton for CUDA, checked on a CPU-only install.

`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` runs the Triton lowering of every
pallas_call (it rejects non-power-of-two tiles, mixed-dtype dots, unsupported ops), without a
GPU. It does not run ptxas, so shared-memory/register limits remain GPU-only checks.
"""
import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.api import normalise_arguments
from kernels_pallas.flash_triton import gpu_attention

TRITON_CALL = "__gpu$xla.gpu.triton"

# (id, batch, tq, tk, heads, head_dim, value_dim, dtype, bias shape, options)
CONFIGS = [
        ("fa_causal_d64", 2, 256, 256, 4, 64, 64, jnp.bfloat16, None, dict(causal=True)),
        ("fa_rpb_d128", 1, 512, 512, 2, 128, 128, jnp.bfloat16, (1, 2, 512, 512), {}),
        ("nvist_cross_f32", 2, 817, 576, 2, 72, 72, jnp.float32, None,
         dict(lengths=True)),
        ("swin_f16", 8, 49, 49, 3, 32, 32, jnp.float16, (1, 3, 49, 49), {}),
        ("sigmoid_segments", 2, 128, 160, 2, 64, 64, jnp.bfloat16, (2, 1, 1, 160),
         dict(logits="sigmoid", segments=True, causal=True)),
        ("halo_dv", 4, 64, 196, 2, 48, 96, jnp.bfloat16, (64, 196), {}),
        ("row_bias_blocks", 2, 300, 100, 2, 64, 64, jnp.bfloat16, (2, 2, 300, 1),
         dict(block_q=32, block_k=128, lengths=True)),
        ("full_bias_segments", 2, 96, 160, 2, 64, 64, jnp.bfloat16, (2, 2, 96, 160),
         dict(segments=True, causal=True)),
]


def _lower(config, with_grad):
    _, batch, tq, tk, heads, head_dim, value_dim, dtype, bias_shape, options = config
    options = dict(options)
    spec = jax.ShapeDtypeStruct
    arrays = [spec((batch, tq, heads, head_dim), dtype), spec((batch, tk, heads, head_dim), dtype),
              spec((batch, tk, heads, value_dim), dtype),
              None if bias_shape is None else spec(bias_shape, jnp.float32)]
    extra = {}
    if options.pop("lengths", False):
        extra.update(q_lengths=spec((batch,), jnp.int32), kv_lengths=spec((batch,), jnp.int32))
    if options.pop("segments", False):
        extra.update(q_segment_ids=spec((batch, tq), jnp.int32),
                     kv_segment_ids=spec((batch, tk), jnp.int32))

    def forward(q, k, v, bias, extra):
        kernel_arrays, kernel_options = normalise_arguments(
                q, k, v, bias, impl="pallas", **{**_DEFAULTS, **options, **extra})
        return gpu_attention(*kernel_arrays, **kernel_options, interpret=False)

    def forward_backward(q, k, v, bias, extra):
        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        loss = lambda *a: jnp.sum(forward(*a, extra).astype(jnp.float32))  # noqa: E731
        return jax.value_and_grad(loss, argnums=argnums)(q, k, v, bias)

    fn = forward_backward if with_grad else forward
    return jax.jit(fn).trace(*arrays, extra).lower(lowering_platforms=("cuda",)).as_text()


_DEFAULTS = dict(causal=False, scale=None, logits="softmax", sigmoid_bias=None, block_q=None,
                 block_k=None, q_lengths=None, kv_lengths=None, q_segment_ids=None,
                 kv_segment_ids=None)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_forward_lowers_for_cuda(config):
    assert _lower(config, with_grad=False).count(TRITON_CALL) == 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_forward_backward_lowers_for_cuda(config):
    _, batch, tq, tk, heads = config[:5]
    bias = config[8]
    # A full bias's gradient comes out of the dQ pass; a broadcast one needs the dbias pass.
    full_bias = bias is not None and (1,) * (4 - len(bias)) + tuple(bias) == (batch, heads, tq,
                                                                              tk)
    broadcast_bias = bias is not None and not full_bias
    # forward + dQ + dK/dV (+ dbias)
    text = _lower(config, with_grad=True)
    assert text.count(TRITON_CALL) == 3 + broadcast_bias
    assert ("attention_backward_dbias" in text) == broadcast_bias


def test_non_power_of_two_tile_is_rejected_by_triton_lowering(monkeypatch):
    """The check above is real: a 48-row tile fails the Triton lowering."""
    from kernels_pallas import flash_triton
    monkeypatch.setattr(flash_triton, "default_blocks", lambda *_: (48, 64, 64, 64))
    with pytest.raises(Exception, match="power of 2"):
        _lower(("bad", 1, 96, 64, 1, 64, 64, jnp.bfloat16, None, {}), with_grad=False)
