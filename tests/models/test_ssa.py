"""SSA GPT (zoo/ssa.py): temperature formulas, causality, parameter overheads, GPT-2 import."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import convert, ssa

TINY = dict(vocab_size=64, max_seq_len=32, width=32, depth=2, num_heads=4)
FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "gpt2_small_random.npz")


def tiny_model(seed=0, **overrides):
    return zoo.create_model("ssa_gpt2_small", rngs=nnx.Rngs(seed), **{**TINY, **overrides})


def randomise_ssa_params(model, seed=1, scale=0.5):
    """Moves every SSA parameter off its init, so the temperatures are not the identity."""
    key = jax.random.key(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(map(str, path))
        if "temperature" in name or name.endswith("beta"):
            key, sub = jax.random.split(key)
            value = variable.get_value()
            variable.set_value(value + scale * jax.random.normal(sub, value.shape, value.dtype))
    return model


def tokens(shape, seed=0, vocab=TINY["vocab_size"]):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def explicit_selective_attention(attn: ssa.SelectiveAttention, x, temperatures=True):
    """The SSA formulas written out on materialised logits (no kernel, no q/v folding);
    temperatures=False gives vanilla attention on the same weights."""
    b, t, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.kernel[...].reshape(x.shape[-1], -1) + attn.qkv.bias[...].reshape(-1)
    q, k, v = (qkv[..., i * h * d:(i + 1) * h * d].reshape(b, t, h, d) for i in range(3))
    n = jnp.arange(1, t + 1, dtype=jnp.float32)  # visible keys of each query

    def token_term(module, proj):
        if module.shared:
            u = jnp.einsum("bthd,hd->bth", proj, module.weight[...]) + module.bias[...]
        else:
            u = x @ module.proj.kernel[...] + module.proj.bias[...]
        return jnp.tanh(u)

    tau_q = jnp.ones((b, t, h))
    tau_v = jnp.ones((b, t, h))
    if temperatures and attn.beta is not None:
        tau_q = tau_q + (jnp.exp(-jnp.exp(attn.beta[...])) * jnp.log(n))[None, :, None]
    if temperatures and attn.query_temperature is not None:
        tau_q = tau_q + token_term(attn.query_temperature, q)
    if temperatures and attn.value_temperature is not None:
        tau_v = tau_v + token_term(attn.value_temperature, v)
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    logits = logits * jnp.transpose(tau_q, (0, 2, 1))[..., None]  # row i scaled by tau_q(i)
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhij,bjhd->bihd", weights, v * tau_v[..., None]).reshape(b, t, h * d)
    return out @ attn.proj.kernel[...] + attn.proj.bias[...]


@pytest.mark.parametrize("switches", [
        dict(),  # full SSA, weight-shared
        dict(ssa_weight_sharing=False),
        dict(ssa_query_token=False, ssa_value=False),  # the official code: position only
        dict(ssa_query_position=False, ssa_value=False),
        dict(ssa_query_position=False, ssa_query_token=False),
])
def test_selective_attention_matches_the_written_out_formulas(switches):
    model = randomise_ssa_params(tiny_model(**switches))
    attn = model.blocks[1].attn
    # GPT-2's init gives near-uniform attention, on which temperatures barely act: sharpen
    # the logits, and make the position term large (beta = -1: exp(-e^-1) = 0.69).
    attn.qkv.kernel.set_value(attn.qkv.kernel[...] * 15)
    if attn.beta is not None:
        attn.beta.set_value(jnp.asarray(-1.0))
    x = jax.random.normal(jax.random.key(3), (2, 24, TINY["width"]))
    ours = attn(x)
    ref = explicit_selective_attention(attn, x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=1e-5)
    # The temperatures really were active: vanilla attention on the same weights differs.
    vanilla = explicit_selective_attention(attn, x, temperatures=False)
    assert np.abs(np.asarray(ours - vanilla)).max() > 1e-3


def test_position_term_init_and_values():
    model = tiny_model()
    beta = model.blocks[0].attn.beta[...]
    assert float(beta) == ssa.BETA_INIT == 1.5  # official gpt_2_PTS.py init
    factor = ssa.position_temperature(beta, jnp.arange(4))
    squash = math.exp(-math.exp(1.5))
    assert squash == pytest.approx(0.011314, abs=1e-6)
    np.testing.assert_allclose(np.asarray(factor), squash * np.log([1.0, 2.0, 3.0, 4.0]),
                               rtol=1e-6)
    # Token temperatures start as the identity (zero-initialised).
    for module in (model.blocks[0].attn.query_temperature, model.blocks[0].attn.value_temperature):
        assert not np.any(np.asarray(module.weight[...])) and not np.any(
                np.asarray(module.bias[...]))


def test_token_temperatures_at_init_are_exactly_vanilla():
    """Without the position term, an SSA model at init computes vanilla GPT-2's logits."""
    ids = tokens((2, 20))
    for sharing in (True, False):
        with_tokens = tiny_model(ssa_query_position=False, ssa_weight_sharing=sharing)
        vanilla = tiny_model(**ssa.SSA_OFF)
        # Same trunk weights: copy vanilla's params into the SSA model by path.
        trunk = dict(nnx.to_flat_state(nnx.state(vanilla, nnx.Param)))
        for path, variable in nnx.to_flat_state(nnx.state(with_tokens, nnx.Param)):
            if path in trunk:
                variable.set_value(trunk[path].get_value())
        np.testing.assert_array_equal(np.asarray(with_tokens(ids)), np.asarray(vanilla(ids)))


@pytest.mark.parametrize("switches", [dict(), dict(**ssa.SSA_OFF)])
def test_future_tokens_do_not_change_past_logits(switches):
    model = randomise_ssa_params(tiny_model(**switches))
    ids = tokens((2, 24))
    changed = ids.at[:, 13:].set((ids[:, 13:] + 7) % TINY["vocab_size"])
    a, b = model(ids), model(changed)
    np.testing.assert_allclose(np.asarray(a[:, :13]), np.asarray(b[:, :13]), atol=1e-6)
    assert not np.allclose(np.asarray(a[:, 13:]), np.asarray(b[:, 13:]), atol=1e-3)


@pytest.mark.parametrize("switches", [dict(), dict(ssa_weight_sharing=False),
                                      dict(**ssa.SSA_OFF)])
def test_cached_decoding_equals_full_forward(switches):
    model = randomise_ssa_params(tiny_model(**switches))
    ids = tokens((2, 22), seed=4)
    full = model(ids)
    cache = model.init_cache(2, 22)
    logits, cache = model.decode(ids[:, :9], cache, 0)  # prefill
    pieces = [logits]
    step = nnx.jit(lambda m, t, c, p: m.decode(t, c, p))
    for i in range(9, 22):  # traced positions, as inside generate
        logits, cache = step(model, ids[:, i:i + 1], cache, jnp.int32(i))
        pieces.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full),
                               atol=2e-5)


def measured_params(**overrides) -> int:
    model = zoo.create_model("ssa_gpt2_small", abstract=True, **overrides)
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name,size,base", [
        ("ssa_gpt2_small", dict(width=768, depth=12, num_heads=12), 124_439_808),
        ("ssa_gpt2_medium", dict(width=1024, depth=24, num_heads=16), 354_823_168),
])
def test_parameter_overheads_of_each_variant(name, size, base):
    def count(**switches):
        model = zoo.create_model(name, abstract=True, **switches)
        return sum(int(np.prod(v.shape))
                   for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))

    assert count(**ssa.SSA_OFF) == base  # the trunk is exactly GPT-2 (tied head)
    variants = {
            "shared": dict(),
            "unshared": dict(ssa_weight_sharing=False),
            "position": dict(ssa_query_token=False, ssa_value=False),
            "query_token_shared": dict(ssa_query_position=False, ssa_value=False),
    }
    overheads = {}
    for label, switches in variants.items():
        measured = count(**switches) - base
        flags = dict(query_position=switches.get("ssa_query_position", True),
                     query_token=switches.get("ssa_query_token", True),
                     value=switches.get("ssa_value", True),
                     weight_sharing=switches.get("ssa_weight_sharing", True))
        assert measured == ssa.ssa_overhead(**size, **flags), label
        overheads[label] = measured / base
    assert overheads["shared"] < 0.005  # the paper's "< 0.5%" claim, for the shared variant
    assert overheads["position"] == pytest.approx(size["depth"] / base)
    # The registry card reports the same figures.
    notes = zoo.model_card(name)["notes"]
    assert f"+{ssa.ssa_overhead(**size):,}" in notes
    assert f"+{ssa.ssa_overhead(**size, weight_sharing=False):,}" in notes


def load_fixture():
    data = np.load(FIXTURE)
    state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
    return data, state, json.loads(str(data["spec"]))


def test_from_gpt2_reproduces_hugging_face_logits():
    data, state, spec = load_fixture()
    model = convert.from_gpt2(state, num_heads=spec["n_head"], ssa=False)
    assert (model.width, model.depth, model.vocab_size) == (spec["n_embd"], spec["n_layer"],
                                                            spec["vocab_size"])
    ours = model(jnp.asarray(data["input_ids"]))
    np.testing.assert_allclose(np.asarray(ours), data["logits"], atol=1e-4, rtol=1e-4)


def test_from_gpt2_with_ssa_adds_initialised_temperatures():
    data, state, spec = load_fixture()
    model = convert.from_gpt2(state, num_heads=spec["n_head"], rngs=nnx.Rngs(5))
    for block in model.blocks:
        assert float(block.attn.beta[...]) == ssa.BETA_INIT
        assert not np.any(np.asarray(block.attn.query_temperature.weight[...]))
    # Token temperatures are the identity at init, so switching off only the position term
    # must give GPT-2's logits back; with it, logits move by the small log-n factor only.
    plain = convert.from_gpt2(state, num_heads=spec["n_head"], ssa_query_position=False)
    ids = jnp.asarray(data["input_ids"])
    np.testing.assert_allclose(np.asarray(plain(ids)), data["logits"], atol=1e-4, rtol=1e-4)
    moved = np.abs(np.asarray(model(ids)) - data["logits"])
    assert 1e-4 < moved.max() < 0.5
    assert moved[:, 0].max() < 1e-4  # log(1) = 0 at the first position


def test_from_gpt2_rejects_bad_arguments():
    _, state, _ = load_fixture()
    with pytest.raises(ValueError, match="not a multiple of 64"):
        convert.from_gpt2(state)  # width 32: heads cannot default to width / 64
    with pytest.raises(ValueError, match="num_heads must be a positive integer dividing"):
        convert.from_gpt2(state, num_heads=5)
    with pytest.raises(ValueError, match="read from the state_dict"):
        convert.from_gpt2(state, num_heads=4, width=64)
    with pytest.raises(ValueError, match="unknown SelectiveGPT argument"):
        convert.from_gpt2(state, num_heads=4, ssa_temperature=3)
    broken = dict(state)
    broken["transformer.h.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="does not map"):
        convert.from_gpt2(broken, num_heads=4, ssa=False)
    untied = dict(state)
    untied["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="ties its output head"):
        convert.from_gpt2(untied, num_heads=4)


def test_bad_model_arguments_are_rejected_before_building():
    with pytest.raises(ValueError, match="width \\(30\\) must be divisible by num_heads"):
        tiny_model(width=30)
    with pytest.raises(ValueError, match="ssa_value must be True or False"):
        tiny_model(ssa_value=1)
    with pytest.raises(ValueError, match="unknown ssa_gpt2_small argument"):
        tiny_model(rotary=True)
    model = tiny_model()
    with pytest.raises(ValueError, match="exceed max_seq_len=32"):
        model(tokens((1, 33)))
    with pytest.raises(ValueError, match="integer ids"):
        model(jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="max_length=40 exceeds max_seq_len=32"):
        model.init_cache(1, 40)
