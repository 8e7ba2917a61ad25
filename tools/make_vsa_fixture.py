"""Writes the reference-parity fixture for VSA: tests/fixtures/vsa_small_random.npz.

Runs the official Swin-T + VSA module (ViTAE-Transformer/QFormer,
`models/swin/swin_transformer_vsa.py`, passed with --reference; it is loaded from that path,
never copied into this project) in PyTorch on CPU:
  * a small `SwinTransformerVSA` (28 px, patch 2, embed 16, depths (2, 2), heads (2, 4),
    window 7: 14x14 and 7x7 maps, a patch merging), and
  * a stand-alone `VSAAttention` (dim 16, 2 heads, window 7) on a 12x10 map, which the
    reference zero-pads to 14x14 (non-square, padded: checks the x/y conventions and the
    padding path).
Every parameter is redrawn at random, the window regressors included (with a spread that
pushes some sampling points outside the map), so scales, offsets, bilinear weights and zero
padding all move the outputs. The reference calls `.cuda()` on a few constant tensors; this
script maps that to a no-op so it runs on CPU. Saved: both state_dicts under the reference's
key names, the inputs and the reference outputs (eval mode).

  /tmp/timmenv/bin/python tools/make_vsa_fixture.py \
      --reference /path/to/QFormer/models/swin/swin_transformer_vsa.py

Needs torch, timm and einops (the reference's imports), from a separate venv.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib

import numpy as np
import torch

MODEL = dict(img_size=28, patch_size=2, in_chans=3, num_classes=10, embed_dim=16,
             depths=[2, 2], num_heads=[2, 4], window_size=7, mlp_ratio=4.0,
             drop_path_rate=0.0)
ATTENTION = dict(dim=16, num_heads=2, window_size=7, height=12, width=10)
BATCH = 2


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("qformer_swin_vsa", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                param.copy_(1.0 + 0.2 * noise)
            elif "transform" in name:
                param.copy_(0.5 * noise)  # scales/offsets of order 1: some points fall outside
            elif "relative_position_bias_table" in name:
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.15 * noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True,
                        help="path to QFormer's models/swin/swin_transformer_vsa.py")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1]
                                             / "tests" / "fixtures" / "vsa_small_random.npz"))
    args = parser.parse_args()
    torch.Tensor.cuda = lambda self, *a, **k: self  # the reference's constants, on CPU
    reference = load_reference(args.reference)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)

    model = reference.SwinTransformerVSA(**MODEL).eval()
    randomise(model, generator)
    image = np.random.default_rng(2).standard_normal(
            (BATCH, MODEL["img_size"], MODEL["img_size"], 3)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(image).permute(0, 3, 1, 2)).numpy()

    a = ATTENTION
    attention = reference.VSAAttention(a["dim"], num_heads=a["num_heads"], qkv_bias=True,
                                       window_size=a["window_size"], rpe="v1",
                                       coords_lambda=0).eval()
    randomise(attention, generator)
    tokens = np.random.default_rng(3).standard_normal(
            (BATCH, a["height"], a["width"], a["dim"])).astype(np.float32)
    with torch.no_grad():
        attended = attention(torch.from_numpy(tokens).reshape(BATCH, -1, a["dim"]),
                             a["height"], a["width"]).numpy()
    attended = attended.reshape(BATCH, a["height"], a["width"], a["dim"])

    arrays = {f"model/{k}": v.numpy() for k, v in model.state_dict().items()}
    arrays.update({f"attention/{k}": v.numpy() for k, v in attention.state_dict().items()})
    np.savez_compressed(args.out, image=image, logits=logits, tokens=tokens,
                        attended=attended, model_spec=np.array(json.dumps(MODEL)),
                        attention_spec=np.array(json.dumps(ATTENTION)),
                        torch_version=np.array(torch.__version__), **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays, logits std {logits.std():.3f}, attended "
          f"std {attended.std():.3f}, {pathlib.Path(args.out).stat().st_size} bytes")


if __name__ == "__main__":
    main()
