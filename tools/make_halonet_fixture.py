"""Writes the timm-parity fixtures for HaloNet: tests/fixtures/halonet_*.npz.

Each fixture is a reduced-size HaloNet built with timm's own classes from timm's `halonet_h1`
config (`timm.models.byoanet.model_cfgs["halonet_h1"]`, narrowed and shallower so the file
stays small), with every BatchNorm given random affine parameters and running statistics
(timm zero-initialises the last BN of each block, which would hide the attention branch) and
a unit-scale classifier,
its state_dict, a fixed NHWC input and timm's eval-mode logits. `tests/models/test_halonet.py`
converts the state_dict with `zoo.convert.from_timm` and compares logits.

  h1_small      halonet_h1 structure (7x7 stem, 4 stages of self-attention blocks, strided
                queries), widths 16-128, block 4, halo 2, 128 px.
  oddblock      block 3 (not divisible by the stride: full-resolution attention then 2x2
                average pooling), halo 1, a final 1x1 conv (timm `num_features`), 96 px.

Needs torch and timm, which the project does not depend on; run it from a separate venv:

  python3 -m venv /tmp/timmenv
  /tmp/timmenv/bin/pip install torch==2.14.1 torchvision==0.29.1
  /tmp/timmenv/bin/pip install timm
  /tmp/timmenv/bin/python tools/make_halonet_fixture.py
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np
import timm
import torch
from timm.models.byoanet import model_cfgs
from timm.models.byobnet import ByoBlockCfg, ByobNet

FIXTURES = {
        "h1_small": dict(stage_widths=(16, 32, 64, 128), depths=(1, 2, 2, 1), stem_width=16,
                         block_size=4, halo_size=2, num_heads=4, num_features=0,
                         image_size=128, num_classes=10),
        "oddblock": dict(stage_widths=(16, 24, 32, 48), depths=(1, 1, 1, 1), stem_width=16,
                         block_size=3, halo_size=1, num_heads=4, num_features=40,
                         image_size=96, num_classes=7),
}
BATCH = 2


def build_timm_model(spec: dict) -> ByobNet:
    """timm's halonet_h1 config with narrower/shallower stages and the given halo geometry."""
    base = model_cfgs["halonet_h1"]
    blocks = tuple(
            ByoBlockCfg(type="self_attn", d=depth, c=width, s=1 if i == 0 else 2, gs=0,
                        br=1.0)
            for i, (depth, width) in enumerate(zip(spec["depths"], spec["stage_widths"])))
    cfg = dataclasses.replace(
            base, blocks=blocks, stem_chs=spec["stem_width"], num_features=spec["num_features"],
            self_attn_kwargs=dict(block_size=spec["block_size"], halo_size=spec["halo_size"],
                                  num_heads=spec["num_heads"]))
    return ByobNet(cfg, num_classes=spec["num_classes"], img_size=spec["image_size"])


def randomise_batch_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def make_fixture(name: str, spec: dict, seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_timm_model(spec)
    randomise_batch_norms(model, generator)
    # timm's N(0, 0.01) classifier gives logits ~0.1; unit-scale logits make the test sharper.
    fc = model.head.fc
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator)
                        / fc.in_features ** 0.5)
        fc.bias.copy_(0.1 * torch.randn(fc.bias.shape, generator=generator))
    model.eval()
    size = spec["image_size"]
    image_nhwc = torch.randn(BATCH, size, size, 3, generator=generator)
    with torch.no_grad():
        logits = model(image_nhwc.permute(0, 3, 1, 2).contiguous())
    arrays = {f"state/{key}": value.detach().numpy()
              for key, value in model.state_dict().items()
              if not key.endswith("num_batches_tracked")}
    meta = dict(name=name, timm_model="halonet_h1", timm_version=timm.__version__,
                torch_version=torch.__version__, seed=seed,
                params=sum(p.numel() for p in model.parameters()), **spec)
    arrays["meta_json"] = np.array(json.dumps(meta))
    arrays["image_nhwc"] = image_nhwc.numpy()
    arrays["logits"] = logits.numpy()
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(pathlib.Path(__file__).resolve().parents[1]
                                                 / "tests" / "fixtures"))
    args = parser.parse_args()
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for seed, (name, spec) in enumerate(FIXTURES.items()):
        arrays = make_fixture(name, spec, seed)
        path = out_dir / f"halonet_{name}.npz"
        np.savez_compressed(path, **arrays)
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, "
              f"{json.loads(str(arrays['meta_json']))['params']:,} params, "
              f"logits {arrays['logits'].shape}")


if __name__ == "__main__":
    main()
