r"""Samples from a checkpoint of a train.py run: text from language models, images from
diffusion denoisers (the task's `write_samples`, zoo/tasks/).

  python sample.py --config configs/ssa.py:smoke --workdir /tmp/ssa_smoke \
      --prompt "def main(" --max_new_tokens 200 --temperature 0.8 --top_k 40
  python sample.py --config configs/fit.py:denoiser_smoke --workdir /tmp/fit_dn \
      --num_samples 16 --steps 100 --sampler ddim      # -> <workdir>/samples_<step>.png

Only the model's variables are read from the checkpoint (no optimizer state), onto the first
local device; each task takes the flags it needs and ignores the others.
  * Language models: byte-level models (lm.vocab_size = 256) take the prompt as UTF-8 text and
    print decoded text; models over another vocabulary take --prompt_ids (comma-separated token
    ids) and print ids, since no tokenizer ships with the zoo. Generation uses the model's KV
    cache (zoo.generate.generate); the samples are also written to <workdir>/samples_<step>.txt.
  * Diffusion denoisers: zoo.diffusion.sample from pure noise, written as a PNG grid (4 per row;
    class-conditional models cycle through the labels).
The summary (paths) is the last line of stdout.
"""
from __future__ import annotations

from absl import flags

from zoo.training import cli

_RUN = cli.define_run_flags(lock_config=False, step=True)
_OPTIONS = {
        "prompt": flags.DEFINE_string("prompt", "\n", "Prompt text (byte-level models)."),
        "prompt_ids": flags.DEFINE_string("prompt_ids", None,
                                          "Comma-separated prompt token ids (any vocabulary)."),
        "max_new_tokens": flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate."),
        "temperature": flags.DEFINE_float("temperature", 1.0, "Softmax temperature (> 0)."),
        "top_k": flags.DEFINE_integer("top_k", 0,
                                      "Sample among the k most likely tokens (0 = all)."),
        "greedy": flags.DEFINE_boolean("greedy", False,
                                       "Take the most likely token at every step."),
        "num_samples": flags.DEFINE_integer("num_samples", 1, "Independent samples."),
        "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
        "steps": flags.DEFINE_integer("steps", 100, "Diffusion sampling steps (image models)."),
        "sampler": flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm"],
                                     "Diffusion sampler (image models)."),
}

if __name__ == "__main__":
    cli.run(cli.main(_RUN, cli.write_samples(_OPTIONS)))
