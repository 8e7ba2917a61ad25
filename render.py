r"""Renders novel views from a novel-view-synthesis checkpoint (NViST) of a train.py run.

  python render.py --config configs/nvist.py:smoke --workdir /tmp/nvist_smoke
  python render.py --config configs/nvist.py:smoke --workdir /tmp/nvist_smoke \
      --image photo.png --distance 1.3 --focal 48 --orbit 12

Writes, next to the checkpoints (the task's `write_samples`, zoo/tasks/novel_view_synthesis.py):
  views_<step>.png  one row per held-out example (the first --num_examples of the eval split):
                    input | target view | rendered target view; prints their PSNR/SSIM;
  orbit_<step>.png  --orbit views on a circle around the object's vertical axis through the
                    input camera (the input view first), from the first held-out example's
                    input image or from --image (resized to the model's input size; then
                    --distance and --focal, in pixels of the resized image, give the camera).
The summary (paths, PSNR and SSIM per view) is the last line of stdout.
"""
from __future__ import annotations

from absl import flags

from zoo.training import cli

_RUN = cli.define_run_flags(lock_config=False, step=True)
_OPTIONS = {
        "num_examples": flags.DEFINE_integer("num_examples", 4,
                                             "Held-out examples in views_*.png."),
        "orbit": flags.DEFINE_integer("orbit", 8, "Views of the orbit (0 = no orbit)."),
        "image": flags.DEFINE_string("image", None,
                                     "Input image for the orbit (default: held-out)."),
        "distance": flags.DEFINE_float("distance", 1.3,
                                       "Camera distance to the object (--image)."),
        "focal": flags.DEFINE_float("focal", 0.0,
                                    "Focal length in pixels (--image; 0 = 1.2 * H)."),
}

if __name__ == "__main__":
    cli.run(cli.main(_RUN, cli.write_samples(_OPTIONS)))
