"""The dispatch policy of impl="auto" (`kernels_pallas.api.DISPATCH_TABLE`): which call goes where.

The routing decisions are pure functions of a call's static facts, so they are checked on CPU
for every backend. The cuDNN route itself runs only on a GPU (marked `gpu`): its test is the gate
that `CUDNN_ROUTING` waits for.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import api, attention
from test_attention import HAS_GPU, TOLERANCE, Case, errors, make_inputs


def facts(**changes) -> api.CallFacts:
    """A plain bf16 self-attention call (cuDNN takes it), with `changes`."""
    base = dict(dtype="bfloat16", head_dim=64, value_head_dim=64, logits="softmax",
                bias_shape=None, seq_q=128, seq_k=128, has_lengths=False,
                has_segment_ids=False)
    return api.CallFacts(**{**base, **changes})


# (facts, route on a GPU once cuDNN routing is on, unmet cuDNN requirement)
GPU_ROUTES = [
        (facts(), "cudnn", None),
        (facts(dtype="float16", head_dim=256, value_head_dim=256), "cudnn", None),
        (facts(seq_q=77, seq_k=300, bias_shape=(1, 8, 77, 300)), "cudnn", None),
        (facts(bias_shape=(4, 1, 128, 128)), "cudnn", None),
        (facts(dtype="float32"), "pallas", "dtype bfloat16 or float16"),
        (facts(logits="sigmoid"), "pallas", "logits='softmax'"),
        (facts(head_dim=72, value_head_dim=72), "cudnn", None),
        (facts(head_dim=36, value_head_dim=36), "pallas", "head_dim a multiple of 8"),
        (facts(head_dim=512, value_head_dim=512), "pallas", "head_dim a multiple of 8 and <= 256"),
        (facts(value_head_dim=32), "pallas", "value head_dim equal to head_dim"),
        (facts(has_segment_ids=True), "pallas", "no segment ids"),
        (facts(has_lengths=True), "pallas", "no q_lengths/kv_lengths"),
        (facts(bias_shape=(4, 1, 1, 128)), "pallas", "bias absent or full over (Tq, Tk)"),
        (facts(bias_shape=(1, 8, 128, 1)), "pallas", "bias absent or full over (Tq, Tk)"),
]


@pytest.mark.parametrize("call, route, unmet", GPU_ROUTES)
def test_gpu_routes(call, route, unmet):
    assert api.route_for(call, "gpu", cudnn_routing=True) == route
    # Until the GPU suite has checked cuDNN's semantics, every GPU call takes our kernel.
    assert api.route_for(call, "gpu", cudnn_routing=False) == "pallas"
    assert api.route_for(call, "gpu") == ("pallas" if not api.CUDNN_ROUTING else route)
    missing = api.unmet_requirements("cudnn", call)
    assert (missing == []) if unmet is None else any(m.startswith(unmet) for m in missing)


@pytest.mark.parametrize("call", [c for c, _, _ in GPU_ROUTES])
def test_tpu_takes_our_kernel_and_cpu_the_reference(call):
    assert api.route_for(call, "tpu", cudnn_routing=True) == "pallas"
    assert api.route_for(call, "cpu", cudnn_routing=True) == "xla"


def test_facts_come_from_the_normalised_call():
    case = Case("facts", batch=2, tq=24, tk=40, heads=2, head_dim=32, value_dim=16,
                dtype=jnp.bfloat16, bias=(40,), kv_lengths=(40, 9),
                segments=((10,), (20,)))
    (q, k, v, bias), _, kwargs = make_inputs(case)
    arrays, options = api.normalise_arguments(
            q, k, v, bias, causal=False, scale=None, q_lengths=None,
            kv_lengths=kwargs["kv_lengths"], q_segment_ids=kwargs["q_segment_ids"],
            kv_segment_ids=kwargs["kv_segment_ids"], logits="softmax", sigmoid_bias=None,
            impl="auto", block_q=None, block_k=None)
    q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, _ = arrays
    call = api.call_facts(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, options)
    assert call == api.CallFacts(dtype="bfloat16", head_dim=32, value_head_dim=16,
                                 logits="softmax", bias_shape=(1, 1, 1, 40), seq_q=24,
                                 seq_k=40, has_lengths=True, has_segment_ids=True)
    assert api.unmet_requirements("cudnn", call) == [
            "value head_dim equal to head_dim", "no segment ids", "no q_lengths/kv_lengths",
            "bias absent or full over (Tq, Tk) (broadcast over batch/heads allowed)"]
    assert api.resolve_impl("auto", call) == "xla"  # this process runs on CPU


def test_forced_routes_are_checked_before_tracing():
    call = facts(dtype="float32", has_segment_ids=True)
    with pytest.raises(ValueError, match="impl='cudnn' needs a GPU backend"):
        api.resolve_impl("cudnn", call)
    with pytest.raises(ValueError, match="impl='pallas' needs a GPU or TPU backend"):
        api.resolve_impl("pallas", call)
    assert api.resolve_impl("interpret", call) == "interpret"
    q = jnp.ones((1, 8, 1, 8), jnp.float32)
    with pytest.raises(ValueError, match="impl='cudnn' needs a GPU backend"):
        attention(q, q, q, impl="cudnn")


def test_unmet_cudnn_requirements_are_named(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match=r"it needs: dtype bfloat16 or float16; no segment ids\. "
                                         r"impl='pallas' takes any call"):
        api.resolve_impl("cudnn", facts(dtype="float32", has_segment_ids=True))
    assert api.resolve_impl("auto", facts()) == ("cudnn" if api.CUDNN_ROUTING else "pallas")


# The semantics where cuDNN could differ from ours: causal masks with Tq != Tk (ours are
# top-left aligned; a bottom-right mask would leave the first Tq - Tk rows without keys, which
# must then be 0), and bias gradients of broadcast shapes. All within cuDNN's requirements.
CUDNN_CASES = [
        Case("cudnn_plain", tq=128, tk=128, heads=4, head_dim=64, dtype=jnp.bfloat16),
        Case("cudnn_causal_tq_lt_tk", tq=64, tk=192, heads=2, head_dim=64,
             dtype=jnp.bfloat16, causal=True),
        Case("cudnn_causal_tq_gt_tk", tq=192, tk=64, heads=2, head_dim=64,
             dtype=jnp.bfloat16, causal=True),
        Case("cudnn_bias_heads", tq=96, tk=160, heads=4, head_dim=128, dtype=jnp.bfloat16,
             bias=(1, 4, 96, 160)),
        Case("cudnn_bias_batch_causal", tq=128, tk=128, heads=2, head_dim=64,
             dtype=jnp.float16, bias=(2, 1, 128, 128), causal=True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@pytest.mark.parametrize("case", CUDNN_CASES, ids=lambda c: c.name)
def test_cudnn_semantics_match_ours_on_gpu(case):
    """The gate for `api.CUDNN_ROUTING`: forward and every gradient of impl="cudnn" against the
    f32 reference, with the tolerances of our own kernels."""
    for what, rel_l2, max_abs in errors(case, "cudnn"):
        assert rel_l2 < TOLERANCE[case.dtype], (
                f"{case.name} {what}: rel-L2 {rel_l2:.2e}, max-abs {max_abs:.2e}")
    if case.causal and case.tq > case.tk:
        (q, k, v, bias), _, kwargs = make_inputs(case)
        out = np.asarray(attention(q, k, v, bias, impl="cudnn", **kwargs), np.float32)
        assert np.all(np.abs(out[:, :case.tq - case.tk]).sum(axis=(2, 3)) > 0), (
                "cuDNN's causal mask is bottom-right aligned: the first rows have no keys")
