"""Writes the Hugging Face parity fixture for GPT-2 import: tests/fixtures/gpt2_small_random.npz.

A small random `transformers.GPT2LMHeadModel` (2 layers, width 32, 4 heads of 8, vocab 100,
32 positions; GPT-2's own activation "gelu_new" and LayerNorm eps 1e-5). Weights are redrawn
with larger values than GPT-2's N(0, 0.02) init (LayerNorm scales around 1, biases non-zero) so
every term moves the logits. The file holds the state_dict under HF's key names (with the
tied `lm_head.weight` and, where the installed version keeps them, the `attn.bias` buffers),
fixed input ids and HF's eval-mode logits. `tests/models/test_ssa.py` imports the state_dict
with `zoo.convert.from_gpt2(..., ssa=False)` and compares the logits.

Needs torch and transformers, which the project does not depend on; run it from a separate
venv:

  /tmp/timmenv/bin/python tools/make_gpt2_fixture.py
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import torch
import transformers

SPEC = dict(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=0, eos_token_id=0)
BATCH, LENGTH = 2, 24


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1]
                                             / "tests" / "fixtures" / "gpt2_small_random.npz"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.GPT2Config(**SPEC, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)
    ids = np.random.default_rng(2).integers(0, SPEC["vocab_size"], (BATCH, LENGTH))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.numpy()
    arrays = {f"state/{k}": v.numpy() for k, v in model.state_dict().items()}
    np.savez_compressed(args.out, input_ids=ids.astype(np.int32), logits=logits,
                        spec=np.array(json.dumps(SPEC)),
                        transformers_version=np.array(transformers.__version__), **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays, logits std {logits.std():.3f}, "
          f"{pathlib.Path(args.out).stat().st_size} bytes")


if __name__ == "__main__":
    main()
