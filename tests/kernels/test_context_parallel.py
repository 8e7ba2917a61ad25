"""Context-parallel attention (kernels_pallas/context_parallel.py) on 8 CPU devices.

`kernels_pallas.attention` runs ring or all-to-all attention whenever the rules in force split
the sequence (`activation_length` -> `sequence`). Each case jits forward + gradients under such a
mesh and compares them with single-device attention on the same inputs:
  * XLA route (the reference per key block): ring and all-to-all on meshes (data 2, sequence 2),
    (data 2, sequence 4) and (sequence 8), for
    causal (load-balanced zigzag), non-causal, padded (lengths), packed (segment ids), and
    sigmoid logits with a per-head bias;
  * kernel route (`impl="interpret"`: the Triton kernel per key block, interpreted) on the
    smallest mesh, one combined case per strategy plus sigmoid for the ring;
  * the compiled ring step sends K/V with collective-permutes and never all-gathers them;
  * the ring with the Mosaic-TPU kernel's key-block pair (interpreted), as a TPU pod runs it;
  * calls a strategy cannot take are clear errors raised while tracing.
Tolerances: f32 throughout, relative max error 1e-5 (kernels.md's f32 row; merging blocks adds
one exp/log rounding per ring step).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import kernels_pallas
from kernels_pallas import context_parallel, flash_tpu, sharding
from kernels_pallas.reference import attention_reference
from zoo.training import hlo

B, T, H, D = 2, 32, 8, 8
RTOL = 1e-5
RULES = (("activation_length", "sequence"), ("activation_batch", "data"))


def _mesh(data: int, sequence: int):
    return jax.make_mesh((data, sequence), ("data", "sequence"),
                         axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:data * sequence])


def _inputs(seed: int = 0, seq: int = T, heads: int = H):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, k, v, d_out = (jax.random.normal(key, (B, seq, heads, D), jnp.float32)
                      for key in keys[:4])
    bias = jax.random.normal(keys[4], (1, heads, 1, 1), jnp.float32)
    return q, k, v, d_out, bias


def _case_kwargs(case: str, seq: int = T) -> dict:
    # Lengths and segment boundaries fall inside chunks, not on their edges.
    lengths = jnp.array([seq, seq - 11], jnp.int32)
    a, b = seq // 6, seq // 2 + 3
    segments = jnp.array([[0] * a + [1] * (b - a) + [2] * (seq - b),
                          [0] * (seq // 3) + [1] * (seq - seq // 3)], jnp.int32)
    return {
            "causal": dict(causal=True),
            "noncausal": dict(causal=False),
            "padded": dict(causal=True, q_lengths=lengths, kv_lengths=lengths - 2),
            "packed": dict(causal=True, q_segment_ids=segments, kv_segment_ids=segments),
            "sigmoid": dict(causal=True, logits="sigmoid"),
            "combined": dict(causal=True, q_lengths=lengths, kv_lengths=lengths,
                             q_segment_ids=segments, kv_segment_ids=segments),
    }[case]


def _loss_and_grads(impl, kwargs, with_bias, q, k, v, d_out, bias):
    def loss(q, k, v, bias):
        out = kernels_pallas.attention(q, k, v, bias if with_bias else None, impl=impl,
                                       **kwargs)
        return jnp.sum(out.astype(jnp.float32) * d_out), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v,
                                                                                     bias)
    return out, grads


def _compare(case, impl, strategy, data, sequence, *, load_balance=True, seed=0):
    kwargs = _case_kwargs(case)
    with_bias = case == "sigmoid"
    q, k, v, d_out, bias = _inputs(seed)
    want_out, want_grads = jax.jit(
            lambda *a: _loss_and_grads("xla", kwargs, with_bias, *a))(q, k, v, d_out, bias)
    mesh = _mesh(data, sequence)

    def sharded(*arrays):
        with sharding.activation_sharding(mesh, RULES, context_parallel=strategy,
                                          load_balance=load_balance):
            return _loss_and_grads(impl, kwargs, with_bias, *arrays)

    with sharding.record_kernel_calls() as calls:
        got_out, got_grads = jax.jit(sharded)(q, k, v, d_out, bias)
    assert [c.what for c in calls] == [f"attention[{strategy}]"]
    assert tuple(calls[0].in_specs[0])[:2] == (None if data == 1 else "data", "sequence")
    names = ("out", "dq", "dk", "dv", "dbias")
    for name, got, want in zip(names, (got_out, *got_grads), (want_out, *want_grads)):
        if name == "dbias" and not with_bias:
            continue
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0, f"{name} is all zeros: the case tests nothing"
        error = float(jnp.max(jnp.abs(got - want))) / scale
        assert error <= RTOL, f"{case} {strategy} seq{sequence}: {name} rel error {error:.2e}"


XLA_CASES = ("causal", "noncausal", "padded", "packed", "sigmoid")


@pytest.mark.parametrize("sequence", (2, 4, 8))
@pytest.mark.parametrize("strategy", ("ring", "all_to_all"))
@pytest.mark.parametrize("case", XLA_CASES)
def test_xla_route_matches_one_device(case, strategy, sequence):
    _compare(case, "xla", strategy, 2 if sequence < 8 else 1, sequence)


def test_ring_without_load_balancing_matches_one_device():
    _compare("packed", "xla", "ring", 1, 4, load_balance=False)


@pytest.mark.parametrize("strategy,case", [("ring", "combined"), ("ring", "sigmoid"),
                                           ("all_to_all", "combined")])
def test_kernel_route_matches_one_device(strategy, case):
    """The Triton kernel (interpreted) per key block / per head shard, on (data 2, seq 2)."""
    _compare(case, "interpret", strategy, 2, 2)


def test_ring_hlo_permutes_kv_and_never_gathers_it():
    mesh = _mesh(1, 8)
    q, k, v, d_out, bias = _inputs()

    def step(q, k, v):
        with sharding.activation_sharding(mesh, RULES, context_parallel="ring"):
            return _loss_and_grads("xla", dict(causal=True), False, q, k, v, d_out, bias)

    text = jax.jit(step).lower(q, k, v).compile().as_text()
    found = hlo.collectives(text)
    kinds = hlo.counts(found)
    assert kinds.get("collective-permute", 0) > 0, kinds
    # Nothing the size of a whole K/V (or of any sequence-length array) is ever gathered.
    gathered = [c for c in found if c.kind in ("all-gather", "all-to-all")]
    assert not gathered, f"ring step gathers: {gathered}"


def test_all_to_all_moves_heads_not_sequences():
    mesh = _mesh(2, 4)
    q, k, v, d_out, bias = _inputs()

    def forward(q, k, v):
        with sharding.activation_sharding(mesh, RULES, context_parallel="all_to_all"):
            return kernels_pallas.attention(q, k, v, causal=True, impl="xla")

    kinds = hlo.counts(hlo.collectives(jax.jit(forward).lower(q, k, v).compile().as_text()))
    assert kinds.get("all-to-all", 0) >= 4 and not kinds.get("all-gather"), kinds


@pytest.mark.parametrize("strategy,kwargs,seq,heads,message", [
        ("all_to_all", dict(causal=True), T, 4, "heads on each device (4) divisible by the "
                                                "sequence axis size (8)"),
        ("ring", dict(causal=True), 24, H, "sequence length 24 must be divisible by 2 x the "
                                           "sequence axis size"),
        ("ring", dict(bias=jnp.zeros((1, H, T, T))), T, H, "bias broadcast over the sequence"),
        ("sideways", dict(), T, H, "strategy must be one of ('ring', 'all_to_all')"),
])
def test_calls_a_strategy_cannot_take_are_clear_errors(strategy, kwargs, seq, heads, message):
    mesh = _mesh(1, 8)
    q, k, v, _, _ = _inputs(seq=seq, heads=heads)
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", None)

    def forward(q, k, v):
        with sharding.activation_sharding(mesh, RULES, context_parallel=strategy):
            return kernels_pallas.attention(q, k, v, bias, impl="xla", **kwargs)

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        jax.jit(forward).lower(q, k, v)


def test_queries_split_with_whole_keys_matches_one_device():
    """Cross-attention from a split sequence to a short context (FIT's conditioning): each
    shard attends its queries to all keys, no communication; causal is a clear error."""
    mesh = _mesh(1, 8)
    q, _, _, d_out, _ = _inputs()
    k, v = (jax.random.normal(jax.random.key(s), (B, 12, H, D)) for s in (5, 6))

    def loss(q, k, v):
        out = kernels_pallas.attention(q, k, v, impl="xla")
        return jnp.sum(out * d_out)

    def sharded(q, k, v):
        with sharding.activation_sharding(mesh, RULES):
            return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    with sharding.record_kernel_calls() as calls:
        got = jax.jit(sharded)(q, k, v)
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert [c.what for c in calls] == ["attention[split queries]"]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.max(jnp.abs(g - w))) <= RTOL * float(jnp.max(jnp.abs(w)))

    def causal(q, k, v):
        with sharding.activation_sharding(mesh, RULES):
            return kernels_pallas.attention(q, k, v, causal=True, impl="xla")

    with pytest.raises(ValueError, match="supports neither causal=True nor q_lengths"):
        jax.jit(causal).lower(q, k, v)


def test_ring_with_tpu_kernel_blocks_matches_one_device():
    """The ring with the Mosaic-TPU kernel's key-block pair (interpreted on CPU): what
    impl="auto" runs on a TPU pod. Causal zigzag with segment ids over a sequence axis of 2."""
    mesh = _mesh(1, 2)
    q, k, v, d_out, _ = _inputs(seed=3)
    segments = _case_kwargs("packed")["q_segment_ids"]
    options = dict(causal=True, scale=D ** -0.5, logits="softmax", sigmoid_bias=None,
                   block_q=None, block_k=None)

    def per_device(q, k, v, seg):
        return context_parallel.ring_attention(
                q, k, v, None, None, None, seg, seg, axis="sequence", axis_size=2,
                load_balance=True,
                forward=functools.partial(flash_tpu.tpu_attention_forward, interpret=True),
                backward=functools.partial(flash_tpu.tpu_attention_backward, interpret=True),
                options=options)

    qkv_spec, seg_spec = P(None, "sequence"), P(None, "sequence")
    ring = jax.shard_map(per_device, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,),
                         out_specs=qkv_spec, check_vma=False)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * d_out), out

    def reference(q, k, v):
        return attention_reference(q, k, v, causal=True, q_segment_ids=segments,
                                   kv_segment_ids=segments)

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
    (_, got_out), got = jax.jit(grad(lambda *a: loss(lambda *x: ring(*x, segments), *a)))(q, k, v)
    (_, want_out), want = jax.jit(grad(lambda *a: loss(reference, *a)))(q, k, v)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (got_out, *got), (want_out, *want)):
        error = float(jnp.max(jnp.abs(g - w))) / float(jnp.max(jnp.abs(w)))
        assert error <= RTOL, f"{name}: rel error {error:.2e}"
