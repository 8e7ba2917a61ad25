"""`attention`: the one entry point every zoo model calls — argument validation and dispatch.

Everything a backend kernel may rely on is established here, before anything is traced:
shapes agree, the bias is 4-D with each dimension full or 1, lengths and segment ids are int32,
`scale` and `sigmoid_bias` are Python floats, block sizes are powers of two. Backends therefore
share one internal signature (see `_BACKENDS`) and contain no argument checking of their own.
Semantics are defined by `kernels_pallas.reference.attention_reference`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import context_parallel, sharding
from kernels_pallas.reference import attention_weights as reference_attention_weights
from kernels_pallas.reference import (attention_reference, chunk_causal_bias,
                                      reference_backward, reference_forward)

IMPLS = ("auto", "pallas", "cudnn", "xla", "interpret")
LOGITS = ("softmax", "sigmoid")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Pallas kernels per JAX backend: (module, function). Every function takes the normalised
# arguments `(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids, *, causal,
# scale, logits, sigmoid_bias, block_q, block_k, interpret)`. A Hopper (Mosaic GPU) kernel would
# be added as another row, selected in `_pallas_kernel` by device capability.
_BACKENDS = {
        "gpu": ("kernels_pallas.flash_triton", "gpu_attention"),
        "tpu": ("kernels_pallas.flash_tpu", "tpu_attention"),
}
# impl="interpret" runs the GPU (Triton-style) kernel through the Pallas interpreter: it needs
# no accelerator, which is what CPU tests use.
_INTERPRET_BACKEND = "gpu"
# Key-block (forward with log-sum-exp, backward from the merged one) pairs per backend, the
# contract of `reference.reference_forward`/`reference_backward`: what ring attention composes
# (kernels_pallas/context_parallel.py).
_BLOCK_BACKENDS = {
        "gpu": ("kernels_pallas.flash_triton", "gpu_attention_forward", "gpu_attention_backward"),
        "tpu": ("kernels_pallas.flash_tpu", "tpu_attention_forward", "tpu_attention_backward"),
}

# ---------------------------------------------------------------------------------------------
# The dispatch policy of impl="auto": per backend, the routes in order of preference, each with
# the requirements a call must meet. The first route whose requirements all hold is taken.
# `route_for` applies it; tests/kernels/test_dispatch.py checks which call goes where.
#
#   gpu  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused
#                attention, likely 1.7-3x our untuned Triton kernel for the plain bf16/f16
#                softmax calls it accepts (an estimate from the code; bench/attention.py
#                measures it on a device). Only while CUDNN_ROUTING is on (below).
#        pallas  our Triton kernel: sigmoid, segment ids, lengths, float32, shapes cuDNN
#                rejects.
#   tpu  pallas  our Mosaic kernel. jax's splash attention is not routed to: it is unmeasured
#                against ours here (no TPU was available), and the policy changes only by
#                measurement.
#   cpu  xla     the pure-jnp reference (XLA fuses it; interpreting a kernel is far slower).
#
# impl="pallas" always forces our kernel, impl="cudnn" forces cuDNN (an error naming the unmet
# requirements if the call is not one it takes), impl="xla" the reference.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CallFacts:
    """What the dispatcher looks at: static facts of one normalised attention call."""
    dtype: str
    head_dim: int
    value_head_dim: int
    logits: str
    bias_shape: tuple[int, ...] | None  # 4-D [B|1, H|1, Tq|1, Tk|1], or None
    seq_q: int
    seq_k: int
    has_lengths: bool
    has_segment_ids: bool


# (requirement, predicate) pairs; the requirement text is what an error or `explain_route`
# shows.
CUDNN_REQUIREMENTS = (
        ("logits='softmax'", lambda c: c.logits == "softmax"),
        ("dtype bfloat16 or float16", lambda c: c.dtype in ("bfloat16", "float16")),
        ("head_dim a multiple of 8 and <= 256",
         lambda c: c.head_dim % 8 == 0 and c.head_dim <= 256),
        ("value head_dim equal to head_dim", lambda c: c.value_head_dim == c.head_dim),
        ("no segment ids", lambda c: not c.has_segment_ids),
        # cuDNN's padding masks take lengths, but a fully padded query row's output (ours: 0)
        # is unverified: lengths stay on our kernel.
        ("no q_lengths/kv_lengths", lambda c: not c.has_lengths),
        ("bias absent or full over (Tq, Tk) (broadcast over batch/heads allowed)",
         lambda c: c.bias_shape is None or c.bias_shape[2:] == (c.seq_q, c.seq_k)),
)
DISPATCH_TABLE: dict[str, tuple[tuple[str, tuple], ...]] = {
        "gpu": (("cudnn", CUDNN_REQUIREMENTS), ("pallas", ())),
        "tpu": (("pallas", ()),),
}
DEFAULT_ROUTE = "xla"  # any other backend (CPU)

# cuDNN routing is switched on only once the GPU suite has shown that cuDNN's semantics are
# ours where they could differ: causal masking with Tq != Tk (top-left aligned here), a query
# row with no valid key returning 0, and bias gradients of broadcast shapes
# (tests/kernels/test_dispatch.py::test_cudnn_semantics_match_ours_on_gpu). That test has not
# run on a GPU yet, so `auto` still sends every GPU call to our kernel. impl="cudnn" works
# regardless (for that test and for bench/attention.py).
CUDNN_ROUTING = False


def call_facts(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, options) -> CallFacts:
    """The `CallFacts` of a normalised call (arrays and options from `normalise_arguments`)."""
    return CallFacts(
            dtype=jnp.dtype(q.dtype).name, head_dim=int(q.shape[3]),
            value_head_dim=int(v.shape[3]), logits=options["logits"],
            bias_shape=None if bias is None else tuple(int(d) for d in bias.shape),
            seq_q=int(q.shape[1]), seq_k=int(k.shape[1]),
            has_lengths=q_lengths is not None or kv_lengths is not None,
            has_segment_ids=q_segment_ids is not None)


def unmet_requirements(route: str, facts: CallFacts) -> list[str]:
    """The requirements of `route` (in any backend's table) that the call does not meet."""
    rules = next((rules for routes in DISPATCH_TABLE.values() for name, rules in routes
                  if name == route), ())
    return [text for text, holds in rules if not holds(facts)]


def route_for(facts: CallFacts, backend: str, *, cudnn_routing: bool | None = None) -> str:
    """The route impl="auto" takes for a call with `facts` on `backend` (see the table)."""
    enabled = CUDNN_ROUTING if cudnn_routing is None else cudnn_routing
    for route, _ in DISPATCH_TABLE.get(backend, ()):
        if route == "cudnn" and not enabled:
            continue
        if not unmet_requirements(route, facts):
            return route
    return DEFAULT_ROUTE


def cudnn_attention(q, k, v, bias, *, causal: bool, scale: float):
    """cuDNN's fused attention through jax (same [B, T, H, D] layout as ours)."""
    if bias is not None:
        bias = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, is_causal=causal,
                                        implementation="cudnn")


# Logical activation names of the kernel operands (kernels_pallas/sharding.py). Sequence and
# head_dim dimensions are None: a kernel reads whole sequences.
_QKV_NAMES = (sharding.BATCH, None, sharding.HEADS, None)
_BIAS_NAMES = (sharding.BATCH, sharding.HEADS, None, None)
_LENGTHS_NAMES = (sharding.BATCH,)
_SEGMENT_NAMES = (sharding.BATCH, None)


def attention(q, k, v, bias=None, *, causal: bool = False, scale: float | None = None,
              q_lengths=None, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
              logits: str = "softmax", sigmoid_bias: float | None = None, impl: str = "auto",
              block_q: int | None = None, block_k: int | None = None,
              causal_chunk: int | None = None):
    """Multi-head attention on [batch, seq, heads, head_dim] inputs.

    Args:
        q: [B, Tq, H, D] queries (float32, bfloat16 or float16).
        k: [B, Tk, H, D] keys, same dtype as q.
        v: [B, Tk, H, Dv] values, same dtype as q; Dv may differ from D.
        bias: additive logits bias, any array broadcastable (numpy rules) to [B, H, Tq, Tk],
            e.g. [1, H, Tq, Tk] (relative position bias), [B, 1, 1, Tk] or [Tq, Tk]. Its
            gradient is returned with the bias's own shape.
        causal: mask keys after the query (j > i), top-left aligned when Tq != Tk.
        scale: logits scale; default 1/sqrt(D).
        q_lengths, kv_lengths: int [B]; positions at or after the length are masked out.
        q_segment_ids, kv_segment_ids: int [B, Tq] / [B, Tk], given together; a query only
            attends to keys with the same id (packed sequences, block-diagonal attention).
        logits: "softmax", or "sigmoid" for sigmoid(s + sigmoid_bias) weights without row
            normalisation (Ramapuram et al. 2024).
        sigmoid_bias: scalar added to the logits before the sigmoid; default -log(Tk).
        impl: "auto" (the dispatch policy, `DISPATCH_TABLE`: our kernels on GPU and TPU, cuDNN
            for the plain calls it takes once `CUDNN_ROUTING` is on, xla elsewhere),
            "pallas" (our kernel for the current backend, always), "cudnn" (cuDNN's fused
            attention via jax; GPU, plain softmax calls only), "xla" (the pure-jnp reference)
            or "interpret" (the GPU kernel in the Pallas interpreter).
        block_q, block_k: kernel tile sizes (powers of two); default per backend. On TPU
            block_q must also be >= 8 (16 for 16-bit dtypes) and block_k a multiple of 128,
            unless one block covers the whole sequence.
        causal_chunk: with causal=True and Tq == Tk, block-causal attention: key j is
            visible to query i when j // causal_chunk <= i // causal_chunk (full attention
            inside chunks, causal across them; FIT-AR's latents). Kernels receive it as an
            additive bias; context-parallel rings keep it structural (only diagonal chunk
            pairs carry a chunk-sized bias).

    Returns:
        [B, Tq, H, Dv] in q.dtype. A query row with no valid key returns zeros.

    Inside a mesh (`activation_sharding` or `jax.set_mesh`) the call runs per shard: batch
    over the data axes, heads over `tensor`. When the rules also split the sequence
    (`activation_length` -> a `sequence` axis), it runs context-parallel: ring or all-to-all
    attention (kernels_pallas/context_parallel.py), chosen by `activation_sharding(...,
    context_parallel=)`.
    """
    args = normalise_arguments(q, k, v, bias, causal=causal, scale=scale, q_lengths=q_lengths,
                      kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids, logits=logits, sigmoid_bias=sigmoid_bias,
                      impl=impl, block_q=block_q, block_k=block_k)
    (q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids), options = args
    causal_chunk = _causal_chunk(causal_chunk, options["causal"], q.shape[1], k.shape[1])
    sharding.check_sequence_divides(_CP_QKV_NAMES, q.shape, 1, what="attention")
    split_q = sharding.sequence_split(_CP_QKV_NAMES, q.shape, 1)
    split_k = sharding.sequence_split(_CP_QKV_NAMES, k.shape, 1)
    if split_q is not None or split_k is not None:
        facts = call_facts(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, options)
        arrays = (q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids)
        return _context_parallel(arrays, options, resolve_impl(impl, facts), split_q, split_k,
                                 causal_chunk)
    if causal_chunk is not None:
        bias, options = _as_bias(bias, options, causal_chunk, q.shape[1])
    facts = call_facts(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, options)
    resolved = resolve_impl(impl, facts)
    if resolved == "xla":
        return attention_reference(
                q, k, v, bias, q_lengths=q_lengths, kv_lengths=kv_lengths,
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                **_reference_options(options))
    kernel = _route_kernel(resolved, options)
    # Inside a mesh the kernel runs per shard: batch over the data axes, heads over `tensor`
    # (kernels_pallas/sharding.py). The XLA reference above needs no such help: XLA partitions it.
    return sharding.shard_kernel(
            kernel,
            (q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids),
            (_QKV_NAMES, _QKV_NAMES, _QKV_NAMES, _BIAS_NAMES, _LENGTHS_NAMES, _LENGTHS_NAMES,
             _SEGMENT_NAMES, _SEGMENT_NAMES),
            _QKV_NAMES, what="attention")


def attention_weights(q, k, bias=None, *, causal: bool = False, scale: float | None = None,
                      q_lengths=None, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None,
                      logits: str = "softmax", sigmoid_bias: float | None = None,
                      causal_chunk: int | None = None):
    """[B, H, Tq, Tk] float32 weights that `attention(q, k, v, ...)` with the same arguments
    applies to its values (softmax probabilities, or the sigmoid weights; 0 where masked).

    For inspection (`zoo.capture_attention`): always the pure-jnp reference, whatever kernel
    the model's attention runs, and O(Tq * Tk) memory. Arguments are validated as `attention`
    validates them."""
    args = normalise_arguments(q, k, k, bias, causal=causal, scale=scale, q_lengths=q_lengths,
                               kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids, logits=logits,
                               sigmoid_bias=sigmoid_bias, impl="xla", block_q=None,
                               block_k=None)
    (q, k, _, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids), options = args
    causal_chunk = _causal_chunk(causal_chunk, options["causal"], q.shape[1], k.shape[1])
    if causal_chunk is not None:
        bias, options = _as_bias(bias, options, causal_chunk, q.shape[1])
    return reference_attention_weights(
            q, k, bias, q_lengths=q_lengths, kv_lengths=kv_lengths, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, **_reference_options(options))


# Context parallelism: q/k/v, segment ids and the output split along the sequence as well.
_CP_QKV_NAMES = (sharding.BATCH, sharding.LENGTH, sharding.HEADS, None)
_CP_SEGMENT_NAMES = (sharding.BATCH, sharding.LENGTH)


def _causal_chunk(value, causal: bool, tq: int, tk: int) -> int | None:
    """The validated `causal_chunk` (None when absent or 1: plain causality)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < 1:
        raise ValueError(f"causal_chunk must be None or a positive integer, got {value!r}")
    if not causal:
        raise ValueError(f"causal_chunk={value} needs causal=True (it makes causality "
                         f"block-wise)")
    if tq != tk:
        raise ValueError(f"causal_chunk needs self-attention (Tq == Tk), got Tq={tq}, Tk={tk}")
    return int(value) if value > 1 else None


def _as_bias(bias, options, causal_chunk: int, length: int):
    """Block-causal attention as an additive bias on a non-causal call (for the kernels)."""
    mask = chunk_causal_bias(length, causal_chunk)[None, None]
    bias = mask if bias is None else bias + mask.astype(bias.dtype)
    return bias, dict(options, causal=False)


def _cross_attention_split_queries(arrays, options, resolved, split_q):
    """Queries split along the sequence, keys whole (tokens attending to a short context
    such as FIT's conditioning): each shard attends its queries to all keys, no
    communication. Causality and query lengths would need each shard's offset: rejected."""
    q, k = arrays[0], arrays[1]
    if options["causal"] or arrays[4] is not None:
        raise ValueError(f"attention: queries split over the sequence axis ({q.shape[1]} "
                         f"tokens over {split_q[0]}) with whole keys ({k.shape[1]} tokens) "
                         f"supports neither causal=True nor q_lengths; map activation_length "
                         f"to None for this model")
    kernel = _route_kernel(resolved, options)
    kv_names = (sharding.BATCH, None, sharding.HEADS, None)
    return sharding.shard_kernel(
            kernel, arrays,
            (_CP_QKV_NAMES, kv_names, kv_names, _BIAS_NAMES, _LENGTHS_NAMES, _LENGTHS_NAMES,
             _CP_SEGMENT_NAMES, _SEGMENT_NAMES),
            _CP_QKV_NAMES, what="attention[split queries]")


def _route_kernel(resolved, options):
    """The differentiable attention of a route, with the normalised signature."""
    if resolved == "xla":
        def kernel(*operands):
            return attention_reference(*operands[:4], q_lengths=operands[4],
                                       kv_lengths=operands[5], q_segment_ids=operands[6],
                                       kv_segment_ids=operands[7], **_reference_options(options))
        return kernel
    if resolved == "cudnn":  # no lengths or segment ids reach this route
        return lambda q, k, v, bias, *_: cudnn_attention(q, k, v, bias,
                                                         causal=options["causal"],
                                                         scale=options["scale"])
    backend = _INTERPRET_BACKEND if resolved == "interpret" else jax.default_backend()
    return functools.partial(_kernel_for(backend), interpret=resolved == "interpret",
                             **options)


def _context_parallel(arrays, options, resolved, split_q, split_k, causal_chunk):
    """A call whose sequence the rules split: ring or all-to-all attention per shard
    (kernels_pallas/context_parallel.py), with our kernel per block (the reference on the xla
    route; cuDNN returns no log-sum-exp, so its calls take our kernel)."""
    q, k, v, bias = arrays[:4]
    if split_q is not None and split_k is None and causal_chunk is None:
        return _cross_attention_split_queries(arrays, options, resolved, split_q)
    if split_q != split_k:
        raise ValueError(
                f"attention: the sequence axis splits the queries ({q.shape[1]} tokens: "
                f"{split_q}) and the keys ({k.shape[1]} tokens: {split_k}) differently; context "
                f"parallelism needs self-attention over one sequence split the same way. Map "
                f"activation_length to None for this model, or give it a sequence length the "
                f"sequence axis divides")
    axes, axis_size = split_q
    axis = axes[0] if len(axes) == 1 else axes
    strategy, load_balance = sharding.context_parallel_settings()
    if resolved in ("xla", "cudnn"):
        resolved = "xla" if resolved == "xla" else "pallas"
    if resolved == "xla":
        forward, backward = reference_forward, reference_backward
    else:
        backend = _INTERPRET_BACKEND if resolved == "interpret" else jax.default_backend()
        module_name, forward_name, backward_name = _BLOCK_BACKENDS[backend]
        module = importlib.import_module(module_name)
        interpret = resolved == "interpret"
        forward = functools.partial(getattr(module, forward_name), interpret=interpret)
        backward = functools.partial(getattr(module, backward_name), interpret=interpret)
    # all-to-all runs the ordinary kernel on the whole sequence (block-causality as a bias).
    a2a_options = options if causal_chunk is None else dict(options, causal=False)
    a2a_kernel = _route_kernel(resolved, a2a_options)
    if causal_chunk is not None:
        plain_kernel = a2a_kernel

        def a2a_kernel(q, k, v, bias, *rest):
            return plain_kernel(q, k, v, _as_bias(bias, options, causal_chunk, q.shape[1])[0],
                                *rest)

    def check(local_heads, bias_shape):
        context_parallel.check_call(
                strategy, axis_size=axis_size, seq_q=q.shape[1], seq_k=k.shape[1],
                local_heads=local_heads, causal=options["causal"], load_balance=load_balance,
                bias_shape=bias_shape, causal_chunk=causal_chunk)

    def per_device(q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids):
        check(q.shape[2], None if bias is None else tuple(bias.shape))
        local = (q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids)
        if strategy == "all_to_all":
            return context_parallel.all_to_all_attention(*local, axis=axis,
                                                         axis_size=axis_size, kernel=a2a_kernel)
        return context_parallel.ring_attention(
                *local, axis=axis, axis_size=axis_size, load_balance=load_balance,
                forward=forward, backward=backward, options=options, causal_chunk=causal_chunk)

    if bias is not None and bias.shape[2:] != (1, 1):
        check(q.shape[2], tuple(bias.shape))  # before shard_map would split the bias
    return sharding.shard_kernel(
            per_device, arrays,
            (_CP_QKV_NAMES, _CP_QKV_NAMES, _CP_QKV_NAMES, _BIAS_NAMES, _LENGTHS_NAMES,
             _LENGTHS_NAMES, _CP_SEGMENT_NAMES, _CP_SEGMENT_NAMES),
            _CP_QKV_NAMES, what=f"attention[{strategy}]")


def _reference_options(options) -> dict:
    return {name: options[name] for name in ("causal", "scale", "logits", "sigmoid_bias")}


def resolve_impl(impl: str, facts: CallFacts) -> str:
    """The route of a call: `route_for` under impl="auto", else `impl` checked against the
    backend and the call."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        return route_for(facts, backend)
    if impl == "cudnn":
        if backend != "gpu":
            raise ValueError(f"impl='cudnn' needs a GPU backend, this process runs on "
                             f"{backend!r}")
        unmet = unmet_requirements("cudnn", facts)
        if unmet:
            raise ValueError(f"impl='cudnn' cannot take this call ({facts}); it needs: "
                             f"{'; '.join(unmet)}. impl='pallas' takes any call")
        return impl
    if impl == "pallas" and backend not in _BACKENDS:
        raise ValueError(f"impl='pallas' needs a GPU or TPU backend, this process runs on "
                         f"{backend!r}; use impl='interpret' (the GPU kernel, interpreted) or "
                         f"impl='xla' on CPU")
    return impl


def _kernel_for(backend: str):
    module_name, function_name = _BACKENDS[backend]
    # Imported lazily: a backend's kernel module may import backend-only Pallas modules.
    return getattr(importlib.import_module(module_name), function_name)


def _shape_str(x) -> str:
    if x is None:
        return "None"
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return repr(x)
    return f"{tuple(x.shape)} {x.dtype}"


def _concrete(x):
    """`x` as a NumPy array, or None when it is traced (its value unknown until run time)."""
    try:
        return np.asarray(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _python_float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    host = _concrete(value) if hasattr(value, "dtype") else None
    if host is not None and host.ndim == 0 and jnp.issubdtype(host.dtype, jnp.floating):
        return float(host)
    raise ValueError(f"{name} must be a concrete Python/NumPy scalar (it is a static kernel "
                     f"constant), got {type(value).__name__} {_shape_str(value)}")


def _block_size(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be None or a positive power of two, got {value!r}")
    value = int(value)
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{name} must be None or a positive power of two, got {value}")
    return value


def _lengths(name: str, value, batch: int, seq: int, seq_name: str):
    if value is None:
        return None
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape ({batch},), got "
                         f"{_shape_str(value)}")
    if value.shape != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {value.shape}")
    host = _concrete(value)
    if host is not None:
        if host.min(initial=0) < 0 or host.max(initial=0) > seq:
            raise ValueError(f"{name} must lie in [0, {seq_name}={seq}], got {host.tolist()}")
    return value.astype(jnp.int32)


def _segment_ids(name: str, value, batch: int, seq: int, seq_name: str):
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape (batch, {seq_name}) = "
                         f"({batch}, {seq}), got {_shape_str(value)}")
    if value.shape != (batch, seq):
        raise ValueError(f"{name} must have shape (batch, {seq_name}) = ({batch}, {seq}), got "
                         f"{value.shape}")
    return value.astype(jnp.int32)


def _bias(bias, full_shape):
    """Returns the bias as a 4-D array whose dims are each full-size or 1 (numpy broadcast)."""
    if bias is None:
        return None
    if not hasattr(bias, "shape"):
        bias = jnp.asarray(bias)
    dtype = jnp.result_type(bias)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"bias must be a float array, got {_shape_str(bias)}")
    shape = tuple(bias.shape)
    message = (f"bias of shape {shape} is not broadcastable to [batch, heads, Tq, Tk] = "
               f"{list(full_shape)}")
    if len(shape) > 4:
        raise ValueError(message)
    padded = (1,) * (4 - len(shape)) + shape
    if any(size not in (1, full) for size, full in zip(padded, full_shape)):
        raise ValueError(message)
    return jnp.reshape(bias, padded)


def normalise_arguments(q, k, v, bias, *, causal, scale, q_lengths, kv_lengths, q_segment_ids,
               kv_segment_ids, logits, sigmoid_bias, impl, block_q, block_k):
    """Validates every argument; returns (arrays, static options) in kernel form."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or len(x.shape) != 4:
            raise ValueError(f"{name} must be a 4-D array [batch, seq, heads, head_dim], got "
                             f"{_shape_str(x)}")
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"{name} must have dtype float32, bfloat16 or float16, got "
                             f"{x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                         f"v {v.dtype}")
    batch, tq, heads, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[2] != heads or v.shape[2] != heads:
        raise ValueError(f"head counts differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[3] != head_dim:
        raise ValueError(f"q and k head_dim differ: q {q.shape}, k {k.shape}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"k and v sequence lengths differ: k {k.shape}, v {v.shape}")
    tk = k.shape[1]
    if min(tq, tk, head_dim, v.shape[3]) == 0:
        raise ValueError(f"empty sequence or head_dim: q {q.shape}, k {k.shape}, v {v.shape}")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool, got {causal!r}")

    scale = 1.0 / math.sqrt(head_dim) if scale is None else _python_float("scale", scale)
    if logits == "sigmoid":
        sigmoid_bias = (-math.log(tk) if sigmoid_bias is None
                        else _python_float("sigmoid_bias", sigmoid_bias))
    elif sigmoid_bias is not None:
        raise ValueError(f"sigmoid_bias is only used with logits='sigmoid', got "
                         f"sigmoid_bias={sigmoid_bias!r} with logits={logits!r}")

    bias = _bias(bias, (batch, heads, tq, tk))
    q_lengths = _lengths("q_lengths", q_lengths, batch, tq, "Tq")
    kv_lengths = _lengths("kv_lengths", kv_lengths, batch, tk, "Tk")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(f"q_segment_ids and kv_segment_ids must be given together, got "
                         f"q_segment_ids {_shape_str(q_segment_ids)} and kv_segment_ids "
                         f"{_shape_str(kv_segment_ids)}")
    if q_segment_ids is not None:
        q_segment_ids = _segment_ids("q_segment_ids", q_segment_ids, batch, tq, "Tq")
        kv_segment_ids = _segment_ids("kv_segment_ids", kv_segment_ids, batch, tk, "Tk")

    options = dict(causal=bool(causal), scale=scale, logits=logits, sigmoid_bias=sigmoid_bias,
                   block_q=_block_size("block_q", block_q),
                   block_k=_block_size("block_k", block_k))
    arrays = (q, k, v, bias, q_lengths, kv_lengths, q_segment_ids, kv_segment_ids)
    return arrays, options
