"""Writes the timm-parity fixture for Swin: tests/fixtures/swin_small_random.npz.

A small timm `SwinTransformer` (embed 16, depths (2, 2), heads (1, 2), window 4, patch 2,
32 px, 10 classes) so that both stages contain a shifted block (16x16 and 8x8 maps, window 4)
and a patch merging. Every parameter (LayerNorms and relative position tables included) is
redrawn at random, because timm's init (unit norms, zero biases, 0.02 tables) would leave the
norm affine terms and the position bias nearly untested. The file holds the state_dict with
timm's key names (buffers `relative_position_index` / `attn_mask` are not persistent in timm
>= 0.9 and so are absent), a fixed NHWC input and timm's eval-mode logits.
`tests/models/test_swin.py` converts the state_dict with `zoo.convert.from_timm` and compares.

Needs torch and timm, which the project does not depend on; run it from a separate venv:

  /tmp/timmenv/bin/python tools/make_swin_fixture.py
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
import timm
import torch
from timm.models.swin_transformer import SwinTransformer

SPEC = dict(img_size=32, patch_size=2, in_chans=3, num_classes=10, embed_dim=16,
            depths=(2, 2), num_heads=(1, 2), window_size=4, mlp_ratio=4.0)
BATCH = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1]
                                             / "tests" / "fixtures" / "swin_small_random.npz"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SwinTransformer(**SPEC).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm scales around 1, everything else O(0.1-0.5): signals stay O(1) through the
            # residual stream while every term moves the logits.
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight") or ".norm1.weight" in name or \
                    ".norm2.weight" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif "relative_position_bias_table" in name:
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.1 * noise)
    image = np.random.default_rng(2).standard_normal(
            (BATCH, SPEC["img_size"], SPEC["img_size"], 3)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(image).permute(0, 3, 1, 2)).numpy()
    arrays = {f"state/{k}": v.numpy() for k, v in model.state_dict().items()}
    np.savez_compressed(args.out, image=image, logits=logits,
                        spec=np.array(json.dumps(SPEC)), timm_version=np.array(timm.__version__),
                        **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays, logits std {logits.std():.3f}, "
          f"{pathlib.Path(args.out).stat().st_size} bytes")


if __name__ == "__main__":
    main()
