r"""SSA GPT configs: a CPU smoke run, the vanilla-vs-SSA ablation on the embedded corpus, and
GPT-2 small/medium pre-training on nanoGPT token files.

  python train.py --config configs/ssa.py:smoke --workdir /tmp/ssa_smoke
  python train.py --config configs/ssa.py:variant=ablation,ssa=off --workdir /tmp/abl_off
  python train.py --config configs/ssa.py:gpt2_small --workdir /runs/ssa_gpt2 \
      --config.data.path=/data/openwebtext
  python sample.py --config configs/ssa.py:smoke --workdir /tmp/ssa_smoke --prompt "def "
  python train.py --config configs/ssa.py:variant=long_context,sequence=8,cp=ring \
      --workdir /runs/ssa_32k --config.data.path=/data/openwebtext
  python train.py --config configs/ssa.py:variant=gpt2_finetune,tune=ssa,ssa=position \
      --workdir /runs/gpt2_pts --config.init_from.path=/ckpt/gpt2/model.safetensors \
      --config.data.path=/data/wikitext

Options (big_vision style, after the colon):
  variant   smoke | ablation | gpt2_small | gpt2_medium | long_context | gpt2_finetune
  sequence  devices on the `sequence` mesh axis (long_context only; default 8)
  cp        ring | all_to_all: the context-parallel strategy (long_context only; README)
  tune      ssa | full: what gpt2_finetune trains (only the selective-attention parameters,
            or everything; see below)
  ssa       on (all three temperatures, weight-shared: the paper's < 0.5% variant)
            | unshared (same, own projections) | position (the official code: position term
            only) | off (vanilla GPT-2). Everything else, the seed included, is identical
            between these, so runs differing only in `ssa` form an ablation.

Variants:
  smoke       byte-level (vocab 256) on the embedded stdlib corpus; width 64, depth 2, 4 heads,
              64-byte context; 150 steps in about 15 s on a 2-core CPU.
  ablation    byte-level, width 128, depth 4, 4 heads, 128-byte context, 800 steps (about 8
              min on a 2-core CPU): the experiment behind docs/ssa_ablation.md
              (bench/ssa_ablation.py runs the arms).
  gpt2_small  GPT-2 124M (+SSA) on OpenWebText-style token files `{data.path}/train.bin`,
  gpt2_medium `val.bin` (uint16 GPT-2 BPE ids, vocab 50257, as nanoGPT's prepare.py writes).
              Recipe: nanoGPT's GPT-2 reproduction (context 1024, 480 sequences = 491,520
              tokens per step, AdamW lr 6e-4 (medium 3e-4), betas (0.9, 0.95), weight decay
              0.1 on all >= 2-D weights, clip 1.0, 2000 warmup steps, cosine to 10% over
              600k steps). The SSA paper's own pre-training hyper-parameters are
              [unverified]; beta trains with the global schedule here (the official
              fine-tuning recipes give it its own optimizer: gpt2_finetune).
  gpt2_finetune  SSA added to pre-trained GPT-2 small, the official fine-tuning recipe
              (umich-sota/selective_attention finetune/full_gpt2_PTS.py = tune=ssa,
              full_gpt2_FT_PTS.py = tune=full). The weights come from Hugging Face's GPT-2
              (`config.init_from.path`: gpt2's model.safetensors or pytorch_model.bin, source
              "hf:gpt2"); the SSA parameters start at their initialisation. nanoGPT-format token
              files `{data.path}/train.bin`, `val.bin` (the scripts' default data_dir is
              data/alpaca). 5000 steps of 64 sequences x 1024 tokens, constant learning rates
              (the scripts' decay_lr=False: no warmup, no decay), no gradient clipping, seed
              1337, evaluation every 100 steps on 400 sequences (eval_iters=100 micro-batches
              of 4), checkpoints every 500.
                tune=ssa:  only the selective-attention parameters train, with Adam lr 1e-4,
                           betas (0.9, 0.95); every GPT-2 weight is frozen.
                tune=full: the same Adam for the SSA parameters, and AdamW lr 3e-5, betas
                           (0.9, 0.95), weight decay 0.01 for every GPT-2 weight.
              The official code has only the position term (pass ssa=position for exactly
              it, beta init 1.5 as gpt_2_PTS.py); with ssa=on the token and value temperatures
              train in the same group as beta. Deliberate differences: torch's AdamW there
              decays biases and LayerNorm scales too, our loop never decays 1-D parameters (wd
              0.01 x lr 3e-5 x 5000 steps shrinks them by 0.15% at most); and its accumulation
              loop steps the optimizers after every micro-batch but the last (`if not
              is_accumulating`), where we take one step per 64 sequences, the batch it states.
  long_context  gpt2_small (+SSA) with a 32768-token context, where SSA's position term
              (log n) matters most, trained context-parallel: a `sequence` mesh axis of
              `sequence` devices splits every sequence (4096 tokens per device at 8), attention
              runs the `cp` strategy (ring: zigzag-balanced causal ring; all_to_all: 12 heads,
              so `sequence` must divide 12), and the data axis takes the remaining devices.
              16 sequences (524,288 tokens) per step; otherwise the gpt2_small recipe, with
              remat off (activations per device are those of a 4K context).
"""
from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = ("smoke", "ablation", "gpt2_small", "gpt2_medium", "long_context", "gpt2_finetune")
CP_STRATEGIES = ("ring", "all_to_all")
TUNE = ("ssa", "full")
# Every selective-attention parameter: beta (position term) and the token temperatures.
SSA_PARAMETERS = r"(^|/)beta$|(^|/)(query|value)_temperature/"
LONG_CONTEXT = 32768
SSA_MODES = ("on", "unshared", "position", "off")

_SSA_SWITCHES = {
        "on": dict(ssa_query_position=True, ssa_query_token=True, ssa_value=True,
                   ssa_weight_sharing=True),
        "unshared": dict(ssa_query_position=True, ssa_query_token=True, ssa_value=True,
                         ssa_weight_sharing=False),
        "position": dict(ssa_query_position=True, ssa_query_token=False, ssa_value=False,
                         ssa_weight_sharing=True),
        "off": dict(ssa_query_position=False, ssa_query_token=False, ssa_value=False,
                    ssa_weight_sharing=True),
}
_GPT2_VOCAB = 50257


def parse_arg(arg: str | None) -> dict[str, str]:
    return common.parse_arg(arg, file="configs/ssa.py",
                            defaults={"variant": "smoke", "ssa": "on", "sequence": "8",
                                      "cp": "ring", "tune": "ssa"},
                            allowed={"variant": VARIANTS, "ssa": SSA_MODES,
                                     "cp": CP_STRATEGIES, "tune": TUNE})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = parse_arg(arg)
    variant = options["variant"]
    if variant in ("smoke", "ablation"):
        c = _byte_level(variant)
    elif variant == "long_context":
        c = _long_context(options["sequence"], options["cp"])
    elif variant == "gpt2_finetune":
        c = _gpt2_finetune(options["tune"])
    else:
        c = _gpt2(variant)
    c.model.overrides.update(_SSA_SWITCHES[options["ssa"]])
    return c


def _long_context(sequence: str, strategy: str) -> ml_collections.ConfigDict:
    if not sequence.isdigit() or int(sequence) < 1:
        raise ValueError(f"configs/ssa.py sequence must be a positive integer (devices on the "
                         f"sequence axis), got {sequence!r}")
    c = _gpt2("gpt2_small")
    c.lm.seq_len = LONG_CONTEXT
    c.model.overrides.max_seq_len = LONG_CONTEXT
    c.batch_size = 16
    c.eval.batch_size = 8
    c.eval.num_batches = 50
    return common.with_context_parallelism(c, int(sequence), strategy=strategy)


def _gpt2_finetune(tune: str) -> ml_collections.ConfigDict:
    c = _gpt2("gpt2_small")
    c.init_from.path = "/ckpt/gpt2/model.safetensors"
    c.init_from.source = "hf:gpt2"
    c.data.path = "/data/wikitext"
    c.seed = 1337
    c.batch_size = 64
    c.total_steps = 5000
    c.schedule.name = "constant"
    c.schedule.warmup_steps = 0
    c.optimizer.learning_rate = 3e-5
    c.optimizer.weight_decay = 0.01
    c.optimizer.b1, c.optimizer.b2 = 0.9, 0.95
    c.optimizer.grad_clip_norm = 0.0
    # Group names are matched in sorted order: "selective" before "transformer".
    c.optimizer.groups = ml_collections.ConfigDict({
            "selective": dict(pattern=SSA_PARAMETERS, name="adamw", learning_rate=1e-4,
                              weight_decay=0.0, b1=0.9, b2=0.95)})
    if tune == "ssa":
        c.optimizer.groups.transformer = ml_collections.ConfigDict(dict(pattern=".",
                                                                        freeze=True))
    c.checkpoint_every = 500
    c.eval_every = 100
    c.eval.batch_size = 16
    c.eval.num_batches = 25
    return c


def _byte_level(variant: str) -> ml_collections.ConfigDict:
    c = common.base_config("language_modeling")
    c.data.source = "embedded_text"
    c.lm.vocab_size = 256
    if variant == "smoke":
        size = dict(width=64, depth=2, num_heads=4)
        c.lm.seq_len, c.batch_size, c.total_steps = 64, 32, 150
        c.checkpoint_every = c.eval_every = 75
        c.eval.num_batches = 4
    else:
        size = dict(width=128, depth=4, num_heads=4)
        c.lm.seq_len, c.batch_size, c.total_steps = 128, 32, 800
        c.checkpoint_every = 400
        c.eval_every = 100
        c.eval.num_batches = 16
    c.model.name = "ssa_gpt2_small"
    c.model.overrides = ml_collections.ConfigDict(dict(
            vocab_size=256, max_seq_len=c.lm.seq_len, **size))
    c.eval.batch_size = 64
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.1
    c.optimizer.b2 = 0.95
    c.optimizer.no_decay = ()  # nanoGPT: decay every >= 2-D weight, embeddings included
    c.schedule.warmup_steps = 20 if variant == "smoke" else 50
    c.schedule.end_factor = 0.1
    c.log_every = 25
    c.logging.progress_bar = False
    return c


def _gpt2(variant: str) -> ml_collections.ConfigDict:
    c = common.base_config("language_modeling")
    c.model.name = f"ssa_{variant}"
    c.model.overrides = ml_collections.ConfigDict(dict(vocab_size=_GPT2_VOCAB,
                                                       max_seq_len=1024))
    c.data.source = "token_files"
    c.data.path = "/data/openwebtext"
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.lm.seq_len = 1024
    c.lm.vocab_size = _GPT2_VOCAB
    c.lm.token_dtype = "uint16"
    c.lm.bytes_per_token = 0.0  # set it (OpenWebText + GPT-2 BPE: ~4.5 [unverified])
    c.batch_size = 480
    c.total_steps = 600_000
    c.optimizer.learning_rate = 6e-4 if variant == "gpt2_small" else 3e-4
    c.optimizer.weight_decay = 0.1
    c.optimizer.b2 = 0.95
    c.optimizer.no_decay = ()
    c.schedule.warmup_steps = 2000
    c.schedule.end_factor = 0.1
    c.precision.compute_dtype = "bfloat16"
    c.checkpoint_every = 2000
    c.eval_every = 2000
    c.eval.batch_size = 64
    c.eval.num_batches = 200
    c.log_every = 10
    return c
