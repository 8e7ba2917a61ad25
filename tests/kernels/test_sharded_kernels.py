"""The kernels inside sharded jits: shard-mapped per device, never gathered (kernels_pallas/sharding.py).

On 8 CPU devices, `impl="interpret"` (the GPU kernels in the Pallas interpreter) runs inside a
jit whose inputs are split over a mesh:
  * the issue's example: attention on a data-parallel mesh compiles without a single all-gather,
    under `jax.set_mesh` and under `activation_sharding`, where before it gathered the whole
    batch to every device;
  * forward and gradients on a data x fsdp x tensor mesh equal the XLA reference. The bias is
    broadcast over batch (its gradient is summed across devices), with lengths and segment ids
    split with the batch, and sequences that do not divide the blocks; f32 and bf16;
  * halo attention the same way, with replicated relative tables;
  * a head count the tensor axis cannot split is a one-line error naming both numbers; a batch
    the data axes cannot split runs replicated and stays correct; inside a user's own
    shard_map only the axes still automatic are split; outside a mesh nothing changes;
  * the shard-mapped kernel lowers for CUDA and TPU from this CPU-only machine.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import kernels_pallas
from kernels_pallas import halo, sharding
from kernels_pallas.reference import attention_reference

# rel-L2 bounds as tests/kernels/test_attention.py (interpret mode vs the f32 reference).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _mesh(shape, names=("data", "fsdp", "tensor")):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _all_gathers(compiled_text: str) -> int:
    return len(re.findall(r"\ball-gather(?:-start)?\(", compiled_text))


@pytest.mark.parametrize("context", ["set_mesh", "activation_sharding"])
def test_data_parallel_attention_compiles_without_gathers(context):
    mesh = _mesh((8,), ("data",))
    q = _normal(jax.random.key(0), (8, 256, 4, 32))
    spec = NamedSharding(mesh, P("data"))

    def fn(impl):
        def call(x):
            if context == "activation_sharding":
                with sharding.activation_sharding(mesh):
                    return kernels_pallas.attention(x, x, x, causal=True, impl=impl)
            return kernels_pallas.attention(x, x, x, causal=True, impl=impl)
        return jax.jit(call, in_shardings=spec, out_shardings=spec)

    def compile_text(impl):
        if context == "set_mesh":
            with jax.set_mesh(mesh):
                return fn(impl).lower(q).compile().as_text()
        return fn(impl).lower(q).compile().as_text()

    # The XLA reference needed no help; the kernel used to gather the whole batch 11 times.
    assert _all_gathers(compile_text("xla")) == 0
    assert _all_gathers(compile_text("interpret")) == 0
    if context == "set_mesh":
        with jax.set_mesh(mesh):
            out = fn("interpret")(q)
    else:
        out = fn("interpret")(q)
    assert out.sharding.spec == P("data")
    want = attention_reference(q, q, q, causal=True)
    assert _rel_l2(out, want) < TOLERANCE[jnp.float32]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_attention_on_data_fsdp_tensor_mesh_matches_reference(dtype):
    mesh = _mesh((2, 2, 2))
    batch, tq, tk, heads, dim = 4, 40, 56, 4, 24  # 40 and 56 do not divide the 16/32 blocks
    keys = jax.random.split(jax.random.key(1), 5)
    q = _normal(keys[0], (batch, tq, heads, dim), dtype)
    k = _normal(keys[1], (batch, tk, heads, dim), dtype)
    v = _normal(keys[2], (batch, tk, heads, dim), dtype)
    bias = _normal(keys[3], (1, heads, tq, tk), dtype)  # shared by the batch: replicated
    kv_lengths = jnp.array([56, 30, 9, 41], jnp.int32)
    q_segments = jnp.asarray(np.repeat([[0, 1]], batch, 0).repeat([25, 15], axis=1), jnp.int32)
    kv_segments = jnp.asarray(np.repeat([[0, 1]], batch, 0).repeat([30, 26], axis=1), jnp.int32)
    cotangent = _normal(keys[4], (batch, tq, heads, dim), jnp.float32)

    def loss(attend, q, k, v, bias):
        out = attend(q, k, v, bias, kv_lengths=kv_lengths, q_segment_ids=q_segments,
                     kv_segment_ids=kv_segments)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    def kernel(q, k, v, bias, **kw):
        with sharding.activation_sharding(mesh):
            return kernels_pallas.attention(q, k, v, bias, impl="interpret", block_q=16,
                                            block_k=32, **kw)

    qkv = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    grad_fn = jax.jit(jax.value_and_grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2, 3),
                                         has_aux=True),
                      in_shardings=(qkv, qkv, qkv, NamedSharding(mesh, P())))
    with sharding.record_kernel_calls() as calls:
        (_, out), grads = grad_fn(q, k, v, bias)
    assert calls and calls[0].in_specs[0] == P(("data", "fsdp"), None, "tensor", None)
    assert calls[0].in_specs[3] == P(None, "tensor", None, None)  # bias: heads only

    upcast = [x.astype(jnp.float32) for x in (q, k, v, bias)]
    (_, want_out), want_grads = jax.value_and_grad(
            lambda *a: loss(attention_reference, *a), argnums=(0, 1, 2, 3),
            has_aux=True)(*upcast)
    tolerance = TOLERANCE[dtype]
    assert _rel_l2(out, want_out) < tolerance
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, want_grads):
        assert got.shape == want.shape
        assert _rel_l2(got, want) < tolerance, name


def test_halo_attention_on_mesh_matches_reference():
    mesh = _mesh((2, 2, 2))
    batch, size, heads, dim, block, halo_width = 4, 16, 2, 16, 8, 3
    win = block + 2 * halo_width
    keys = jax.random.split(jax.random.key(2), 6)
    q = _normal(keys[0], (batch, size, size, heads, dim))
    k = _normal(keys[1], (batch, size, size, heads, dim))
    v = _normal(keys[2], (batch, size, size, heads, dim))
    rel_h = 0.3 * _normal(keys[3], (2 * win - 1, dim))
    rel_w = 0.3 * _normal(keys[4], (2 * win - 1, dim))
    cotangent = _normal(keys[5], (batch, size, size, heads, dim))

    def loss(impl, *args):
        with sharding.activation_sharding(mesh):
            out = halo.halo_attention(*args, block=block, halo=halo_width, impl=impl)
        return jnp.sum(out * cotangent)

    maps = NamedSharding(mesh, P(("data", "fsdp"), None, None, "tensor"))
    replicated = NamedSharding(mesh, P())
    grads = {}
    for impl in ("interpret", "xla"):
        fn = jax.jit(jax.value_and_grad(lambda *a, impl=impl: loss(impl, *a),
                                        argnums=(0, 1, 2, 3, 4)),
                     in_shardings=(maps, maps, maps, replicated, replicated))
        with sharding.record_kernel_calls() as calls:
            grads[impl] = fn(q, k, v, rel_h, rel_w)
        if impl == "interpret":
            assert calls[0].in_specs[0] == P(("data", "fsdp"), None, None, "tensor", None)
            assert calls[0].in_specs[3] == P(None, None)  # the tables: replicated
            text = fn.lower(q, k, v, rel_h, rel_w).compile().as_text()
            assert _all_gathers(text) == 0
    (loss_kernel, got), (loss_ref, want) = grads["interpret"], grads["xla"]
    assert abs(float(loss_kernel) - float(loss_ref)) < 1e-4 * abs(float(loss_ref))
    for name, g, w in zip(("dq", "dk", "dv", "drel_h", "drel_w"), got, want):
        assert _rel_l2(g, w) < 1e-5, name


def test_heads_the_tensor_axis_cannot_split_is_a_clear_error():
    mesh = _mesh((4, 1, 2))
    q = _normal(jax.random.key(3), (8, 16, 3, 8))
    with pytest.raises(ValueError, match=r"attention: 3 attention heads cannot be split over "
                                         r"mesh axis 'tensor' of size 2"):
        with sharding.activation_sharding(mesh):
            jax.jit(lambda x: kernels_pallas.attention(x, x, x, impl="interpret")).lower(q)
    # Mapping the heads to nothing is the documented way out: heads whole, batch still split.
    with sharding.activation_sharding(mesh, (("activation_heads", None),)):
        with sharding.record_kernel_calls() as calls:
            jax.jit(lambda x: kernels_pallas.attention(x, x, x, impl="interpret")).lower(q)
    assert calls[0].in_specs[0] == P("data", None, None, None)


def test_a_batch_the_data_axes_cannot_split_runs_replicated_and_correct():
    mesh = _mesh((8, 1, 1))
    q = _normal(jax.random.key(4), (3, 20, 2, 8))
    with sharding.record_kernel_calls() as calls:
        with sharding.activation_sharding(mesh):
            out = jax.jit(lambda x: kernels_pallas.attention(x, x, x, impl="interpret"))(q)
    assert calls[0].in_specs[0] == P(None, None, None, None)
    assert _rel_l2(out, attention_reference(q, q, q)) < TOLERANCE[jnp.float32]


def test_inside_a_user_shard_map_only_automatic_axes_are_split():
    mesh = _mesh((4, 1, 2))
    q = _normal(jax.random.key(5), (8, 24, 2, 8))

    def per_tensor_shard(x):  # a user's own shard_map over `tensor` (heads split by hand)
        with sharding.record_kernel_calls() as calls:
            out = kernels_pallas.attention(x, x, x, causal=True, impl="interpret")
        assert calls[0].in_specs[0] == P("data", None, None, None), calls[0].in_specs
        return out

    fn = jax.jit(jax.shard_map(per_tensor_shard, mesh=mesh, in_specs=P(None, None, "tensor"),
                               out_specs=P(None, None, "tensor"), axis_names={"tensor"},
                               check_vma=False))
    with jax.set_mesh(mesh):
        out = fn(q)
    assert _rel_l2(out, attention_reference(q, q, q, causal=True)) < TOLERANCE[jnp.float32]


def test_outside_a_mesh_the_kernel_is_called_directly():
    q = _normal(jax.random.key(6), (2, 16, 2, 8))
    jaxpr = str(jax.make_jaxpr(lambda x: kernels_pallas.attention(x, x, x, impl="interpret"))(q))
    assert "shard_map" not in jaxpr and "pallas_call" in jaxpr
    with sharding.record_kernel_calls() as calls:
        kernels_pallas.attention(q, q, q, impl="interpret")
    assert calls[0].in_specs == () and calls[0].shapes[0] == (2, 16, 2, 8)
    x = jnp.ones((4, 3))
    assert sharding.constrain(x, (sharding.BATCH, None)) is x


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_shard_mapped_kernel_lowers_for_accelerators(platform):
    """The per-shard kernel (forward and backward) inside its shard_map lowers for each
    platform's compiler (Triton on CUDA, Mosaic on TPU). A mesh of CPU devices stands in:
    lowering needs the device count, not the device kind."""
    import functools

    from kernels_pallas import api

    kernel = {"cuda": ("kernels_pallas.flash_triton", "gpu_attention"),
              "tpu": ("kernels_pallas.flash_tpu", "tpu_attention")}[platform]
    kernel = getattr(__import__(kernel[0], fromlist=[kernel[1]]), kernel[1])
    mesh = _mesh((2, 2, 2))
    q = jax.ShapeDtypeStruct((8, 128, 4, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, 4, 128, 128), jnp.bfloat16)

    def forward(q, k, v, bias):
        arrays, options = api.normalise_arguments(
                q, k, v, bias, causal=True, scale=None, q_lengths=None, kv_lengths=None,
                q_segment_ids=None, kv_segment_ids=None, logits="softmax", sigmoid_bias=None,
                impl="pallas", block_q=None, block_k=None)
        with sharding.activation_sharding(mesh):
            return sharding.shard_kernel(
                    functools.partial(kernel, interpret=False, **options), arrays,
                    (api._QKV_NAMES,) * 3 + (api._BIAS_NAMES,) + (None,) * 4, api._QKV_NAMES,
                    what="attention")

    loss = lambda *a: jnp.sum(forward(*a).astype(jnp.float32))  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, q, q, bias).lower(
            lowering_platforms=(platform,)).as_text()
    assert "sdy.manual_computation" in text or "shard_map" in text
    custom_call = "__gpu$xla.gpu.triton" if platform == "cuda" else "tpu_custom_call"
    assert text.count(custom_call) >= 3, f"{platform}: forward + backward kernels not found"
