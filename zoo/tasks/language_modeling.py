"""Language modelling: the "language_modeling" task and its token data.

Contract with the models (the SSA GPT and FIT-AR follow it):
    batch {"tokens": int32 [B, seq_len + 1]}; inputs = tokens[:, :-1], targets = tokens[:, 1:]
    model(inputs [B, T] int32, *, train, rngs) -> logits [B, T, vocab]

Sources (config.data.source):
  * "embedded_text" (the default for this task): byte-level text (vocab 256) that every
    machine has without a download: the top-level pure-Python modules of the running
    interpreter's standard library, in sorted file order. Their content differs a little
    between Python versions, so the split's byte count and SHA-256 are logged and available
    from `corpus_summary`; compare runs on one Python version. Every 20th file (sorted order)
    is the eval split, so train and eval never share a file.
  * "token_files": nanoGPT-style `{data.path}/{split}.bin`, a flat array of token ids
    (lm.token_dtype uint16 or uint32, native little-endian), memory-mapped; in a bucket
    (`gs://...`) each window is one ranged read (`BucketTokens`).
The task's own fields (context length, vocabulary, token format) are the config subtree
`config.lm` (`LanguageModelingTask.default_config`).
An example is a window of seq_len + 1 consecutive tokens; window i starts at i * seq_len, so
consecutive windows share one token and every token of the stream is a target exactly once.

Metrics: the loss is next-token cross-entropy in float32 (mean over tokens). Eval reports the
per-token loss, perplexity = exp(loss), bits_per_token = loss / ln 2 and, where the bytes per
token are known (byte-level text: 1; token files: lm.bytes_per_token > 0), bits_per_byte.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import sysconfig
import threading
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from zoo import generate as generate_lib
from zoo import storage
from zoo.training import mesh as mesh_lib
from zoo.training.errors import ConfigError
from zoo.training.tasks import Task, register_task

TASK = "language_modeling"
SOURCES = ("embedded_text", "token_files")
TOKEN_DTYPES = ("uint16", "uint32")
BYTE_VOCAB = 256
EVAL_FILE_EVERY = 20  # every 20th stdlib file (5%) is held out


# ================================================================================================
# Token streams
# ================================================================================================

@functools.lru_cache(maxsize=None)
def _stdlib_files() -> tuple[str, ...]:
    root = sysconfig.get_paths()["stdlib"]
    files = tuple(sorted(os.path.join(root, name) for name in os.listdir(root)
                         if name.endswith(".py")))
    if len(files) < 2 * EVAL_FILE_EVERY:
        raise ValueError(f"the standard library at {root} has only {len(files)} top-level .py "
                         f"files; embedded_text needs the CPython source tree")
    return files


@functools.lru_cache(maxsize=4)
def embedded_text(split_is_eval: bool) -> np.ndarray:
    """The byte stream of one split of the embedded corpus (uint8)."""
    files = [f for i, f in enumerate(_stdlib_files())
             if (i % EVAL_FILE_EVERY == 0) == split_is_eval]
    chunks = []
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
    stream = np.frombuffer(b"\n\n".join(chunks), np.uint8)
    logging.info("embedded_text %s split: %d files, %d bytes, sha256 %s",
                 "eval" if split_is_eval else "train", len(files), stream.size,
                 hashlib.sha256(stream.tobytes()).hexdigest()[:16])
    return stream


def corpus_summary() -> dict[str, Any]:
    """Byte counts and hashes of the embedded corpus on this Python (for reports)."""
    summary = {"stdlib": sysconfig.get_paths()["stdlib"], "files": len(_stdlib_files())}
    for name, is_eval in (("train", False), ("eval", True)):
        stream = embedded_text(is_eval)
        summary[f"{name}_bytes"] = int(stream.size)
        summary[f"{name}_sha256"] = hashlib.sha256(stream.tobytes()).hexdigest()
    return summary


def token_file(config, split: str) -> str:
    return storage.join(config.data.path, f"{split}.bin")


def write_token_file(path: str, tokens, dtype: str = "uint16") -> None:
    """Writes ids as a nanoGPT-style flat .bin file (the format "token_files" reads)."""
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; allowed: {TOKEN_DTYPES}")
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids must be in [0, {np.iinfo(dtype).max}] for {dtype}")
    if storage.is_remote(path):
        storage.write_bytes(path, tokens.astype(dtype).tobytes())
    else:
        tokens.astype(dtype).tofile(path)


class BucketTokens:
    """A token file in a bucket, read like the np.memmap of a local one: `size`, and slices
    [start:stop] as read-only arrays, each one ranged read (gcsfs reads exactly the range for
    random access). Every thread keeps its own open file object (grain reads from several);
    pickling (to grain worker processes) keeps only the path."""

    def __init__(self, path: str, dtype, num_bytes: int):
        self.path, self.dtype = path, np.dtype(dtype)
        self.size = num_bytes // self.dtype.itemsize
        self._files = threading.local()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_files"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._files = threading.local()

    def _file(self):
        file = getattr(self._files, "file", None)
        if file is None:  # closed when the thread's reference goes away
            file = self._files.file = storage.open(self.path, "rb")
        return file

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"{self.path}: only contiguous slices are read, got {key!r}")
        start, stop, _ = key.indices(self.size)
        count = max(0, stop - start)
        file = self._file()
        file.seek(start * self.dtype.itemsize)
        data = file.read(count * self.dtype.itemsize)
        if len(data) != count * self.dtype.itemsize:
            raise OSError(f"{self.path}: read {len(data)} bytes at token {start}, expected "
                          f"{count * self.dtype.itemsize} (did the file change during the run?)")
        return np.frombuffer(data, self.dtype)


def _open_token_file(config, split: str) -> np.ndarray | BucketTokens:
    path = token_file(config, split)
    dtype = np.dtype(config.lm.token_dtype)
    if not storage.isfile(path):
        raise ValueError(f"config.data.path={config.data.path!r}: token file {path} for split "
                         f"{split!r} does not exist (expected <path>/<split>.bin)")
    size = storage.getsize(path)
    if size % dtype.itemsize:
        raise ValueError(f"token file {path} has {size} bytes, not a multiple of "
                         f"config.lm.token_dtype={config.lm.token_dtype!r} "
                         f"({dtype.itemsize} bytes)")
    if size == 0:
        raise ValueError(f"token file {path} is empty")
    if storage.is_remote(path):
        return BucketTokens(path, dtype, size)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenWindows:
    """Random-access windows of seq_len + 1 tokens over a stream (grain source)."""

    def __init__(self, stream: np.ndarray | BucketTokens, seq_len: int, vocab_size: int,
                 origin: str):
        self.stream, self.seq_len = stream, int(seq_len)
        self.vocab_size, self.origin = int(vocab_size), origin
        self.count = max(0, (stream.size - 1) // self.seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.count:
            raise IndexError(f"window {index} of {self.count}")
        start = int(index) * self.seq_len
        tokens = np.asarray(self.stream[start:start + self.seq_len + 1]).astype(np.int32)
        if tokens.max() >= self.vocab_size:
            raise ValueError(f"{self.origin} holds token id {int(tokens.max())} at window "
                             f"{index}, outside config.lm.vocab_size={self.vocab_size}")
        return {"tokens": tokens}


def open_split(config, split: str) -> TokenWindows:
    d = config.data
    if d.source == "embedded_text":
        stream = embedded_text(split == d.eval_split)
        origin = f"embedded_text split {split!r}"
    elif d.source == "token_files":
        stream = _open_token_file(config, split)
        origin = token_file(config, split)
    else:
        raise ValueError(f"config.data.source={d.source!r} is invalid for task {TASK!r}; "
                         f"allowed: {SOURCES}")
    windows = TokenWindows(stream, config.lm.seq_len, config.lm.vocab_size, origin)
    if len(windows) < 1:
        raise ValueError(f"{origin} has {stream.size} tokens, fewer than one window of "
                         f"config.lm.seq_len + 1 = {config.lm.seq_len + 1}")
    return windows


def _check_data(config) -> None:
    lm = config.lm
    if not isinstance(lm.seq_len, int) or lm.seq_len < 1:
        raise ValueError(f"config.lm.seq_len={lm.seq_len!r} is invalid; allowed: an integer "
                         f">= 1")
    if not isinstance(lm.vocab_size, int) or lm.vocab_size < 2:
        raise ValueError(f"config.lm.vocab_size={lm.vocab_size!r} is invalid; allowed: an "
                         f"integer >= 2")
    if config.data.source == "embedded_text" and lm.vocab_size < BYTE_VOCAB:
        raise ValueError(f"config.lm.vocab_size={lm.vocab_size} is too small for the "
                         f"byte-level embedded_text source; allowed: >= {BYTE_VOCAB}")
    if lm.token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"config.lm.token_dtype={lm.token_dtype!r} is invalid; allowed: "
                         f"{TOKEN_DTYPES}")
    if lm.bytes_per_token < 0:
        raise ValueError(f"config.lm.bytes_per_token={lm.bytes_per_token!r} is invalid; "
                         f"allowed: >= 0 (0 = unknown)")


@dataclasses.dataclass(frozen=True)
class _PrepareTokens:
    def __call__(self, raw: Mapping[str, Any], rng) -> dict[str, np.ndarray]:
        del rng  # no augmentation for text
        return {"tokens": np.asarray(raw["tokens"], np.int32)}


# ================================================================================================
# The task
# ================================================================================================

def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token next-token cross-entropy in float32: [B, T, V], [B, T] -> [B, T]."""
    logits = logits.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_norm - target_logit


@register_task(TASK)
class LanguageModelingTask(Task):
    """Next-token prediction on {"tokens": int32 [B, seq_len + 1]} (see the module docstring)."""

    sources = SOURCES
    config_key = "lm"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.seq_len = 256  # tokens per example (context length)
        c.vocab_size = 256  # 256 = byte-level (embedded_text)
        c.token_dtype = "uint16"  # token_files: uint16 | uint32 ids in <path>/<split>.bin
        c.bytes_per_token = 0.0  # token_files: corpus bytes per token, for bits_per_byte
        return c

    def check_data(self, config) -> None:
        _check_data(config)

    def open_split(self, config, split: str) -> TokenWindows:
        return open_split(config, split)

    def make_preparer(self, config) -> _PrepareTokens:
        return _PrepareTokens()

    def example_spec(self, config) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {"tokens": ((int(config.lm.seq_len) + 1,), np.int32)}

    def __init__(self, config):
        super().__init__(config)
        self.seq_len = int(config.lm.seq_len)
        self.vocab_size = int(config.lm.vocab_size)
        if config.data.source == "embedded_text":
            self.bytes_per_token = 1.0
        else:
            self.bytes_per_token = float(config.lm.bytes_per_token)

    def check_config(self, config) -> None:
        overrides = config.model.overrides
        if "vocab_size" in overrides and overrides.vocab_size != config.lm.vocab_size:
            raise ConfigError(f"config.model.overrides.vocab_size={overrides.vocab_size!r} must "
                              f"equal config.lm.vocab_size={config.lm.vocab_size!r}")
        if "max_seq_len" in overrides and overrides.max_seq_len < config.lm.seq_len:
            raise ConfigError(f"config.model.overrides.max_seq_len={overrides.max_seq_len!r} is "
                              f"shorter than config.lm.seq_len={config.lm.seq_len!r}")
        chunks = mesh_lib.sequence_chunks(config)
        if config.lm.seq_len % chunks:
            raise ConfigError(
                    f"config.lm.seq_len={config.lm.seq_len} must be divisible by {chunks}: "
                    f"context parallelism cuts each sequence into {chunks} equal chunks "
                    f"(sequence axis size {mesh_lib.sequence_axis_size(config)}, two chunks per "
                    f"device for the load-balanced causal ring)")

    def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {"tokens": jax.ShapeDtypeStruct((batch_size, self.seq_len), jnp.int32)}

    # --- samples: text from a prompt (sample.py) --------------------------------------------

    sample_options = ("prompt", "prompt_ids", "max_new_tokens", "temperature", "top_k",
                      "greedy", "num_samples", "seed")

    def prompt_tokens(self, text: str, ids: str | None) -> np.ndarray:
        """The prompt as int32 ids: parsed `ids`, else the UTF-8 bytes of `text` (byte-level
        vocabulary only: no tokenizer ships with the zoo)."""
        vocab = self.vocab_size
        if ids is not None:
            try:
                tokens = np.asarray([int(t) for t in ids.split(",") if t.strip()], np.int32)
            except ValueError as error:
                raise ValueError(f"--prompt_ids={ids!r} must be comma-separated integers"
                                 ) from error
        elif vocab == BYTE_VOCAB:
            tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        else:
            raise ValueError(f"this model has a {vocab}-token vocabulary (config.lm.vocab_size),"
                             f" not bytes: pass the prompt as --prompt_ids")
        if tokens.size == 0:
            raise ValueError("the prompt is empty: give --prompt text or --prompt_ids")
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"prompt ids must be in [0, {vocab}), got min {tokens.min()} max "
                             f"{tokens.max()}")
        return tokens

    def decode(self, tokens: np.ndarray) -> str:
        """Text for byte-level vocabularies, comma-separated ids otherwise."""
        if self.vocab_size == BYTE_VOCAB:
            return bytes(tokens.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
        return ",".join(str(int(t)) for t in tokens)

    def check_sample_options(self, *, prompt: str = "\n", prompt_ids: str | None = None,
                             num_samples: int = 1, **_) -> None:
        if num_samples < 1:
            raise ValueError(f"--num_samples={num_samples} must be >= 1")
        self.prompt_tokens(prompt, prompt_ids)

    def write_samples(self, model, workdir: str, step: int, *, prompt: str = "\n",
                      prompt_ids: str | None = None, max_new_tokens: int = 200,
                      temperature: float = 1.0, top_k: int = 0, greedy: bool = False,
                      num_samples: int = 1, seed: int = 0) -> dict[str, Any]:
        """Continues the prompt `num_samples` times with the model's KV cache
        (`zoo.generate.generate`); writes <workdir>/samples_<step>.txt."""
        self.check_sample_options(prompt=prompt, prompt_ids=prompt_ids,
                                  num_samples=num_samples)
        tokens = self.prompt_tokens(prompt, prompt_ids)
        logging.info("sampling from the model of step %d", step)
        prompts = np.repeat(tokens[None, :], num_samples, axis=0)
        out = generate_lib.generate(model, jnp.asarray(prompts), max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_k=top_k or None,
                                    greedy=greedy, rng=jax.random.key(seed))
        texts = [self.decode(row) for row in np.asarray(out)]
        path = storage.join(workdir, f"samples_{step}.txt")
        storage.write_text(path, "\n\n=====\n\n".join(texts) + "\n")
        return {"step": step, "path": path, "texts": texts}

    def _logits(self, model, tokens, train, rngs):
        logits = model(tokens[:, :-1], train=train, rngs=rngs)
        return logits, tokens[:, 1:]

    def loss_and_metrics(self, model, batch, rngs, train):
        logits, targets = self._logits(model, batch["tokens"], train, rngs)
        loss = jnp.mean(token_cross_entropy(logits, targets))
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
        return loss, {"accuracy": accuracy}

    def eval_sums(self, model, batch):
        logits, targets = self._logits(model, batch["tokens"], False, None)
        mask = batch["mask"].astype(jnp.float32)
        per_example = jnp.sum(token_cross_entropy(logits, targets), axis=-1)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32), axis=-1)
        return {"count": jnp.sum(mask), "tokens": jnp.sum(mask) * targets.shape[1],
                "loss": jnp.sum(mask * per_example), "accuracy": jnp.sum(mask * correct)}

    def finalize_eval(self, sums: Mapping[str, float]) -> dict[str, Any]:
        if sums["count"] <= 0:
            raise ValueError("the eval split produced no examples (sum of masks is 0)")
        loss = sums["loss"] / sums["tokens"]
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                   "bits_per_token": loss / math.log(2),
                   "accuracy": sums["accuracy"] / sums["tokens"],
                   "count": int(round(sums["count"]))}
        if self.bytes_per_token > 0:
            metrics["bits_per_byte"] = metrics["bits_per_token"] / self.bytes_per_token
        return metrics
