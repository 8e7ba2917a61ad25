"""Writes the reference-parity fixture for NViST: tests/fixtures/nvist_small_random.npz.

Runs the official modules (wbjang/nvist_official: `models/mae_original_model.py`,
`models/decoder.py`, `models/renderer.py`, loaded from a checkout given with --reference,
never copied into this project) in PyTorch on CPU, wired as the official `Model.forward`:
encoder.forward_encoder_only(images in [0, 1]) -> decoder(latent, camera_params) ->
renderer(rays_o, rays_d, planes, lines, is_train=False). Small configuration: 20 x 10 images,
patch 5 (8 patches), encoder width 16 / depth 1 / 2 heads (MAE inpainting decoder deleted as
NViST does), decoder width 16 / depth 2 / 2 heads, 6^3 field of 32 channels, 8 samples per
ray on [0.4, 2.2]. Every parameter is redrawn at random (LayerNorm scales around 1). Saved:
the state_dict under the official Model's names (encoder., decoder., renderer.), the inputs,
and the reference's rgb / depth / distortion loss.

  /tmp/timmenv/bin/python tools/make_nvist_fixture.py --reference /path/to/nvist_official

Needs torch, timm, torchvision, torch_efficient_distloss and easydict; `cv2`, imported by the
reference's utils.py for functions not used here, is stubbed if missing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import types
from functools import partial

import numpy as np
import torch

SPEC = dict(image_size=[20, 10], patch_size=5, encoder_dim=16, encoder_depth=1,
            encoder_heads=2, decoder_dim=16, decoder_depth=2, decoder_heads=2, resolution=6,
            decoder_patch_size=3, channels=32, num_samples=8, near_far=[0.4, 2.2])
BATCH, RAYS = 2, 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="nvist_official checkout")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1]
                                             / "tests" / "fixtures" / "nvist_small_random.npz"))
    args = parser.parse_args()
    if importlib.util.find_spec("cv2") is None:
        stub = types.ModuleType("cv2")
        stub.COLORMAP_JET = 2  # only a default argument of an unused function
        sys.modules["cv2"] = stub
    sys.path.insert(0, args.reference)
    from models.decoder import Decoder
    from models.mae_original_model import MaskedAutoencoderViT
    from models.renderer import Renderer

    s = SPEC
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.encoder = MaskedAutoencoderViT(
            img_size=s["image_size"], patch_size=s["patch_size"], embed_dim=s["encoder_dim"],
            depth=s["encoder_depth"], num_heads=s["encoder_heads"], decoder_embed_dim=8,
            decoder_depth=1, decoder_num_heads=2, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    for name in ("decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred"):
        delattr(model.encoder, name)  # as NViST's delete_mae_inpainting_decoder
    num_patches = model.encoder.patch_embed.num_patches
    model.decoder = Decoder(resolution=s["resolution"], decoder_patch_size=s["decoder_patch_size"],
                            input_feature_dim=s["encoder_dim"], decoder_embed_dim=s["decoder_dim"],
                            decoder_depth=s["decoder_depth"], decoder_num_heads=s["decoder_heads"],
                            decoder_output_dim=s["channels"],
                            num_encoded_visible_patches=num_patches)
    model.renderer = Renderer(aabb=torch.tensor([[-0.8] * 3, [0.8] * 3]),
                              near_far=s["near_far"], resolution=s["resolution"],
                              decoder_output_dim=s["channels"], nSamples=s["num_samples"])
    model.eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue  # the fixed sin-cos codes
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(".weight") and param.ndim == 1:  # LayerNorm scales
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.3 * noise)
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 1, (BATCH, *s["image_size"], 3)).astype(np.float32)
    camera = np.array([[1.3, 1.2], [1.1, 0.9]], np.float32)
    rays_o = np.tile(np.array([0.0, 0.0, -1.3], np.float32), (BATCH, RAYS, 1))
    rays_o += rng.normal(0, 0.05, rays_o.shape).astype(np.float32)
    rays_d = np.concatenate([rng.normal(0, 0.3, (BATCH, RAYS, 2)),
                             np.ones((BATCH, RAYS, 1))], -1).astype(np.float32)
    with torch.no_grad():
        latent = model.encoder.forward_encoder_only(torch.from_numpy(images).permute(0, 3, 1, 2))
        matrices, vectors = model.decoder(latent, torch.from_numpy(camera))
        out = model.renderer(torch.from_numpy(rays_o), torch.from_numpy(rays_d), matrices,
                             vectors, is_train=False)
    arrays = {f"state/{k}": v.numpy() for k, v in model.state_dict().items()}
    np.savez_compressed(args.out, images=images, camera_params=camera, rays_o=rays_o,
                        rays_d=rays_d, rgb=out.rgb_map.numpy().reshape(BATCH, RAYS, 3),
                        depth=out.depth_map.numpy().reshape(BATCH, RAYS),
                        distloss=np.float32(out.distloss.item()),
                        planes=matrices.numpy(), lines=vectors.numpy(),
                        spec=np.array(json.dumps(SPEC)),
                        torch_version=np.array(torch.__version__), **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays, rgb std {out.rgb_map.std():.3f}, "
          f"planes std {matrices.std():.3f}, {pathlib.Path(args.out).stat().st_size} bytes")


if __name__ == "__main__":
    main()
