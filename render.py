r"""Renders novel views from a novel-view-synthesis checkpoint (NViST) of a train.py run.

  python render.py --config configs/nvist.py:smoke --workdir /tmp/nvist_smoke
  python render.py --config configs/nvist.py:smoke --workdir /tmp/nvist_smoke \
      --image photo.png --distance 1.3 --focal 48 --orbit 12

Writes, next to the checkpoints:
  views_<step>.png  one row per held-out example (the first --num_examples of the eval split):
                    input | target view | rendered target view; prints their PSNR/SSIM;
  orbit_<step>.png  --orbit views on a circle around the object's vertical axis through the
                    input camera (the input view first), from the first held-out example's
                    input image or from --image (resized to the model's input size; then
                    --distance and --focal, in pixels of the resized image, give the camera).
"""
from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from zoo.tasks import novel_view_synthesis as multiview
from zoo.training import image_ops, reporting
from zoo.training.evaluate import load_model

_CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file and variant the run was trained with.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 4, "Held-out examples in views_*.png.")
_ORBIT = flags.DEFINE_integer("orbit", 8, "Views of the orbit (0 = no orbit).")
_IMAGE = flags.DEFINE_string("image", None, "Input image for the orbit (default: held-out).")
_DISTANCE = flags.DEFINE_float("distance", 1.3, "Camera distance to the object (--image).")
_FOCAL = flags.DEFINE_float("focal", 0.0, "Focal length in pixels (--image; 0 = 1.2 * H).")


def orbit_pose(theta: float, distance: float) -> np.ndarray:
    """c2w (OpenCV) of the input camera rotated by theta about the y axis through the origin."""
    c, s = math.cos(theta), math.sin(theta)
    rotation = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = rotation @ np.array([0.0, 0.0, -distance])
    return pose


def render_checkpoint(config, workdir: str, *, step, num_examples: int, orbit: int,
                      image_path, distance: float, focal: float) -> dict:
    if config.task != multiview.TASK:
        raise ValueError(f"config.task={config.task!r}: render.py renders "
                         f"{multiview.TASK!r} models")
    step, model = load_model(config, workdir, step)
    h, w = multiview._image_shape(config)
    source = multiview.open_split(config, config.data.eval_split)
    prepare = multiview.PrepareViews(h, w, int(config.data.target_views),
                                     int(config.data.rays_per_view))
    examples = [prepare(source[i], None) for i in range(min(num_examples, len(source)))]
    batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
    render = jax.jit(lambda m, img, cam, ro, rd: m(img, cam, ro, rd)["rgb"])
    rendered = render(model, batch["image"], batch["camera_params"], batch["view_rays_o"],
                      batch["view_rays_d"]).reshape(-1, h, w, 3)
    rendered = jnp.clip(rendered, 0, 1)
    scores = {"psnr": [float(v) for v in multiview.psnr(jnp.mean(
                      jnp.square(rendered - batch["view_rgb"]), axis=(1, 2, 3)))],
              "ssim": [float(v) for v in multiview.ssim(rendered, batch["view_rgb"])]}
    to_uint8, unnormalise = image_ops.unit_to_uint8, image_ops.unnormalise
    rows = [[to_uint8(unnormalise(batch["image"][i])), to_uint8(batch["view_rgb"][i]),
             to_uint8(rendered[i])] for i in range(len(examples))]
    views_path = os.path.join(workdir, f"views_{step}.png")
    image_ops.save_png(image_ops.image_grid(rows), views_path)
    result = {"step": step, "views": views_path, **scores}
    if orbit > 0:
        if image_path:
            from PIL import Image
            pixels = np.asarray(Image.open(image_path).convert("RGB").resize((w, h)),
                                np.float32)
            normalised = image_ops.normalise(pixels)
            focal = focal or multiview.FOCAL_PER_HEIGHT * h
            camera = np.asarray([distance, focal / h], np.float32)
            input_view = to_uint8(pixels / 255.0)
        else:
            normalised = np.asarray(batch["image"][0])
            camera = np.asarray(batch["camera_params"][0])
            distance = float(camera[0])
            focal = float(camera[1]) * h
            input_view = rows[0][0]
        frames = []
        for k in range(orbit):
            origins, dirs = multiview.pixel_rays(orbit_pose(2 * math.pi * k / orbit, distance),
                                                 focal, h, w)
            frame = render(model, jnp.asarray(normalised)[None], jnp.asarray(camera)[None],
                           jnp.asarray(origins, jnp.float32)[None],
                           jnp.asarray(dirs, jnp.float32)[None])
            frames.append(to_uint8(frame.reshape(h, w, 3)))
        orbit_path = os.path.join(workdir, f"orbit_{step}.png")
        image_ops.save_png(image_ops.image_grid([[input_view] + frames]), orbit_path)
        result["orbit"] = orbit_path
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    reporting.quiet_library_logs()
    try:
        result = render_checkpoint(_CONFIG.value, _WORKDIR.value, step=_STEP.value,
                                   num_examples=_NUM_EXAMPLES.value, orbit=_ORBIT.value,
                                   image_path=_IMAGE.value, distance=_DISTANCE.value,
                                   focal=_FOCAL.value)
    except (ValueError, FileNotFoundError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    logging.info("rendered %s", result)
    print(result, flush=True)


if __name__ == "__main__":
    app.run(main)
