r"""Samples from a checkpoint of a train.py run: text from language models, images from
diffusion denoisers.

  python sample.py --config configs/ssa.py:smoke --workdir /tmp/ssa_smoke \
      --prompt "def main(" --max_new_tokens 200 --temperature 0.8 --top_k 40
  python sample.py --config configs/fit.py:denoiser_smoke --workdir /tmp/fit_dn \
      --num_samples 16 --steps 100 --sampler ddim      # -> <workdir>/samples_<step>.png

Images (config.task "image_diffusion"): `zoo.diffusion.sample` from pure noise, written as a
PNG grid (4 per row; class-conditional models cycle through the labels). Text:

Only the model's variables are read from the checkpoint (no optimizer state), onto the first
local device. Byte-level models (data.vocab_size = 256) take the prompt as UTF-8 text and print
decoded text; models over another vocabulary take `--prompt_ids` (comma-separated token ids)
and print ids, since no tokenizer ships with the zoo. Generation uses the model's KV cache
through `zoo.generate.generate`. The samples are also written to <workdir>/samples_<step>.txt.
"""
from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from zoo import diffusion
from zoo import generate as generate_lib
from zoo.training import evaluate, image_ops, reporting

_CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file and variant the run was trained with.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to sample from (default: latest).")
_PROMPT = flags.DEFINE_string("prompt", "\n", "Prompt text (byte-level models).")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", None,
                                  "Comma-separated prompt token ids (any vocabulary).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_GREEDY = flags.DEFINE_boolean("greedy", False, "Take the most likely token at every step.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Independent samples of the prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEPS = flags.DEFINE_integer("steps", 100, "Diffusion sampling steps (image models).")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm"],
                             "Diffusion sampler (image models).")

BYTE_VOCAB = 256


def prompt_tokens(config, text: str, ids: str | None) -> np.ndarray:
    """The prompt as int32 ids: parsed `ids`, else the UTF-8 bytes of `text` (byte vocab)."""
    vocab = int(config.data.vocab_size)
    if ids is not None:
        try:
            tokens = np.asarray([int(t) for t in ids.split(",") if t.strip()], np.int32)
        except ValueError as error:
            raise ValueError(f"--prompt_ids={ids!r} must be comma-separated integers") from error
    elif vocab == BYTE_VOCAB:
        tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    else:
        raise ValueError(f"this model has a {vocab}-token vocabulary (config.data.vocab_size), "
                         f"not bytes: pass the prompt as --prompt_ids")
    if tokens.size == 0:
        raise ValueError("the prompt is empty: give --prompt text or --prompt_ids")
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"prompt ids must be in [0, {vocab}), got min {tokens.min()} max "
                         f"{tokens.max()}")
    return tokens


def decode(config, tokens: np.ndarray) -> str:
    if int(config.data.vocab_size) == BYTE_VOCAB:
        return bytes(tokens.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
    return ",".join(str(int(t)) for t in tokens)


def sample_images(config, workdir: str, *, step: int | None, num_samples: int, steps: int,
                  sampler: str, seed: int) -> str:
    """Writes <workdir>/samples_<step>.png; returns its path."""
    if num_samples < 1:
        raise ValueError(f"--num_samples={num_samples} must be >= 1")
    step, model = evaluate.load_model(config, workdir, step)
    cond = None
    if getattr(model, "cond_dim", 0):
        labels = np.arange(num_samples) % model.cond_dim
        cond = jax.nn.one_hot(labels, model.cond_dim)
    logging.info("sampling %d images from the model of step %d (%s, %d steps)", num_samples,
                 step, sampler, steps)
    images = diffusion.sample(model, jax.random.key(seed), num_samples, steps=steps,
                              sampler=sampler, cond=cond)
    pixels = image_ops.signed_to_uint8(images)
    per_row = 4
    path = os.path.join(workdir, f"samples_{step}.png")
    image_ops.save_png(image_ops.image_grid(
            [list(pixels[i:i + per_row]) for i in range(0, len(pixels), per_row)]), path)
    return path


def sample_checkpoint(config, workdir: str, *, step: int | None, prompt: str,
                      prompt_ids: str | None, max_new_tokens: int, temperature: float,
                      top_k: int, greedy: bool, num_samples: int, seed: int) -> list[str]:
    if config.task != "language_modeling":
        raise ValueError(f"config.task={config.task!r}: sample.py samples language models "
                         f"(task 'language_modeling')")
    if num_samples < 1:
        raise ValueError(f"--num_samples={num_samples} must be >= 1")
    tokens = prompt_tokens(config, prompt, prompt_ids)
    step, model = evaluate.load_model(config, workdir, step)
    logging.info("sampling from the model of step %d", step)
    prompts = np.repeat(tokens[None, :], num_samples, axis=0)
    out = generate_lib.generate(model, jax.numpy.asarray(prompts),
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k or None, greedy=greedy,
                                rng=jax.random.key(seed))
    samples = [decode(config, row) for row in np.asarray(out)]
    with open(os.path.join(workdir, f"samples_{step}.txt"), "w") as f:
        f.write("\n\n=====\n\n".join(samples) + "\n")
    return samples


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    reporting.quiet_library_logs()
    try:
        if _CONFIG.value.task == "image_diffusion":
            path = sample_images(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                                 num_samples=_NUM_SAMPLES.value, steps=_STEPS.value,
                                 sampler=_SAMPLER.value, seed=_SEED.value)
            print(f"wrote {path}", flush=True)
            return
        samples = sample_checkpoint(
                _CONFIG.value, _WORKDIR.value, step=_STEP.value, prompt=_PROMPT.value,
                prompt_ids=_PROMPT_IDS.value, max_new_tokens=_MAX_NEW_TOKENS.value,
                temperature=_TEMPERATURE.value, top_k=_TOP_K.value, greedy=_GREEDY.value,
                num_samples=_NUM_SAMPLES.value, seed=_SEED.value)
    except (ValueError, FileNotFoundError) as error:  # bad flags, bad config, no checkpoint
        print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    for i, text in enumerate(samples):
        print(f"----- sample {i} -----\n{text}", flush=True)


if __name__ == "__main__":
    app.run(main)
