"""The language-modelling task and its data (zoo/tasks/language_modeling.py): windowing, splits, token
files, loss and eval metrics against direct computations, config errors, and a tiny causal LM
trained end to end by the real loop (train_and_evaluate + eval from the checkpoint)."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common
from zoo import layers, registry
from zoo.axes import with_axes
from zoo.training import config as config_lib
from training_helpers import apply_changes
from zoo.tasks import language_modeling as lm
from zoo.training import pipeline, tasks
from zoo.training import trainer

VOCAB = 256


class TinyCausalLM(nnx.Module):
    """Embedding, one causal attention block, tied read-out: the smallest model that follows
    the LM contract `model(tokens [B, T], *, train, rngs) -> logits [B, T, vocab]`."""

    def __init__(self, *, vocab_size: int = VOCAB, width: int = 32, max_seq_len: int = 64,
                 rngs: nnx.Rngs, **unused):
        init = with_axes(nnx.initializers.normal(0.02), ("vocab", "embed"))
        self.embedding = nnx.Param(init(rngs.params(), (vocab_size, width)))
        self.positions = nnx.Param(with_axes(nnx.initializers.normal(0.02), ("pos", "embed"))(
                rngs.params(), (max_seq_len, width)))
        self.norm = layers.LayerNorm(width, rngs=rngs)
        self.attn = layers.Attention(width, 2, rngs=rngs)
        self.final_norm = layers.LayerNorm(width, rngs=rngs)

    def __call__(self, tokens, *, train=False, rngs=None):
        x = self.embedding[...][tokens] + self.positions[...][:tokens.shape[1]]
        x = x + self.attn(self.norm(x), causal=True)
        return self.final_norm(x) @ self.embedding[...].T


if "test_tiny_causal_lm" not in registry._REGISTRY:
    registry.register_model("test_tiny_causal_lm", paper="(test model)", reference="-",
                            default_input={"tokens": ((16,), "int32")},
                            config="tests/training/test_lm.py")(
            lambda *, rngs, **kw: TinyCausalLM(rngs=rngs, **kw))



def _validate(config) -> None:
    pipeline.validate_data_config(config, tasks.get_task(config), process_count=1)

def lm_config(**changes) -> ml_collections.ConfigDict:
    c = common.base_config("language_modeling")
    c.model.name = "test_tiny_causal_lm"
    c.data.source = "embedded_text"
    c.lm.seq_len = 16
    c.batch_size = 16
    c.eval.batch_size = 24
    c.eval.num_batches = 2
    c.total_steps = 60
    c.schedule.warmup_steps = 5
    c.optimizer.learning_rate = 3e-3
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    return apply_changes(c, changes)


def test_windows_cover_the_stream_and_targets_are_next_tokens():
    stream = np.arange(53, dtype=np.uint16) % VOCAB
    windows = lm.TokenWindows(stream, seq_len=8, vocab_size=VOCAB, origin="test")
    assert len(windows) == (53 - 1) // 8
    targets = np.concatenate([windows[i]["tokens"][1:] for i in range(len(windows))])
    np.testing.assert_array_equal(targets, stream[1:1 + 8 * len(windows)])
    for i in range(len(windows) - 1):  # consecutive windows share exactly one token
        assert windows[i]["tokens"][-1] == windows[i + 1]["tokens"][0]
    with pytest.raises(IndexError):
        windows[len(windows)]


def test_embedded_text_splits_are_disjoint_files_and_byte_level():
    summary = lm.corpus_summary()
    assert summary["train_bytes"] > 10 * summary["eval_bytes"] > 100_000
    assert summary["train_sha256"] != summary["eval_sha256"]
    config = lm_config()
    train = lm.open_split(config, config.data.train_split)
    held_out = lm.open_split(config, config.data.eval_split)
    assert len(train) > len(held_out) > 0
    assert train[0]["tokens"].dtype == np.int32 and train[0]["tokens"].shape == (17,)
    assert int(train[0]["tokens"].max()) < VOCAB


def test_token_files_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    ids = {"train": rng.integers(0, 1000, 500), "eval": rng.integers(0, 1000, 100)}
    for split, tokens in ids.items():
        lm.write_token_file(str(tmp_path / f"{split}.bin"), tokens)
    config = lm_config(**{"data.source": "token_files", "data.path": str(tmp_path),
                          "lm.vocab_size": 1000})
    _validate(config)
    windows = lm.open_split(config, "eval")
    np.testing.assert_array_equal(windows[1]["tokens"], ids["eval"][16:33])

    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a multiple of"):
        _validate(lm_config(**{"data.source": "token_files", "data.path": str(tmp_path / "odd")}))
    with pytest.raises(ValueError, match="does not exist"):
        _validate(lm_config(**{"data.source": "token_files", "data.path": str(tmp_path / "none")}))
    small_vocab = lm_config(**{"data.source": "token_files", "data.path": str(tmp_path),
                               "lm.vocab_size": 10})
    with pytest.raises(ValueError, match="outside config.lm.vocab_size=10"):
        lm.open_split(small_vocab, "train")[0]


@pytest.mark.parametrize("changes, message", [
        ({"lm.seq_len": 0}, "config.lm.seq_len=0"),
        ({"lm.vocab_size": 100}, "too small for the byte-level"),
        ({"data.source": "generated"}, "invalid for config.task='language_modeling'"),
        ({"lm.token_dtype": "int8"}, "config.lm.token_dtype='int8'"),
        ({"lm.seq_len": 10 ** 8}, "fewer than one window"),
])
def test_bad_lm_data_configs_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        _validate(lm_config(**changes))


def test_classification_rejects_text_sources():
    config = lm_config(task="classification")
    with pytest.raises(ValueError, match="invalid for config.task='classification'"):
        _validate(config)


def test_model_overrides_must_agree_with_the_data():
    config = lm_config()
    config.model.overrides = ml_collections.ConfigDict({"vocab_size": 300})
    with pytest.raises(config_lib.ConfigError, match="vocab_size=300 must equal"):
        tasks.get_task(config).check_config(config)


def test_loss_and_eval_metrics_equal_direct_computations():
    config = lm_config()
    task = tasks.get_task(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (3, 17)), jnp.int32)
    logits = jnp.asarray(rng.standard_normal((3, 16, VOCAB)), jnp.float32)
    model = lambda x, train=False, rngs=None: logits[:x.shape[0]]  # noqa: E731
    loss, metrics = task.loss_and_metrics(model, {"tokens": tokens}, None, False)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    per_token = -np.take_along_axis(np.asarray(log_probs), np.asarray(tokens[:, 1:])[..., None],
                                    axis=-1)[..., 0]
    np.testing.assert_allclose(float(loss), per_token.mean(), rtol=1e-6)
    # Eval over a padded batch: the masked row must not count.
    mask = jnp.asarray([1.0, 1.0, 0.0])
    sums = task.eval_sums(model, {"tokens": tokens, "mask": mask})
    result = task.finalize_eval({k: float(v) for k, v in sums.items()})
    expected = per_token[:2].mean()
    assert result["count"] == 2
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(result["perplexity"], math.exp(expected), rtol=1e-6)
    np.testing.assert_allclose(result["bits_per_byte"], expected / math.log(2), rtol=1e-6)


def test_tiny_lm_trains_on_embedded_text_and_evaluates_from_its_checkpoint(tmp_path):
    from zoo.training.evaluate import evaluate_checkpoint

    config = lm_config(checkpoint_every=30, eval_every=0, log_every=1)
    trainer.train_and_evaluate(config, str(tmp_path), profile_steps=None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[0] > 5.0  # ~ln(256) = 5.55 at init
    assert np.mean(losses[-10:]) < losses[0] - 1.5, losses
    result = evaluate_checkpoint(lm_config(), str(tmp_path), None)
    assert result["step"] == 60
    assert set(result) >= {"loss", "perplexity", "bits_per_token", "bits_per_byte", "accuracy"}
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    assert result["loss"] < 5.0
