r"""Input pipeline throughput: images/s per CPU core for decode, random-resized-crop/flip and
RandAugment, ours (grain + zoo/training) against timm's (create_transform + torch DataLoader).

  .venv/bin/python bench/input_pipeline.py --timm_python /tmp/timmenv/bin/python
  .venv/bin/python bench/input_pipeline.py --images 512 --workers 2 --timm_python ''  # ours only

Both sides read the same folder of generated JPEGs (ImageNet-like: 500x375, quality 90, in an
ImageNet folder layout; written once to --folder) and produce 224 px training crops:
  * decode             JPEG -> RGB (PIL)
  * + crop/flip        random-resized crop to 224 (scale 0.08-1, ratio 3/4-4/3) + flip
  * + RandAugment      rand-m9-mstd0.5-inc1 (then normalisation; timm also converts to a tensor)
Per core: one process, no workers, images/s over 3 passes of the folder after a warm-up (the
two sides draw different RandAugment ops, so few images would compare luck).
Workers: the full augmentation through each library's worker pool with --workers processes
(ours: grain's mp_prefetch over the real train pipeline, batches of 64; timm: a torch
DataLoader over an ImageFolder with batch 64), images/s of the pool.

timm runs in a separate interpreter (--timm_python: a venv with torch and timm, which the
project does not depend on); this script re-runs itself there in "--side timm" mode.

Finally the images/s one accelerator would consume training swin_t at batch 128, from the
train step's FLOPs (XLA cost analysis of our swin_t at 224 px) and a stated peak and MFU, so a
reader sees whether the pipeline keeps up per host.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
SIZE = 224
# Accelerator peaks (dense bf16) and an assumed model FLOPs utilisation for the requirement.
PEAKS = {"H100 SXM (989 TFLOP/s bf16)": 989e12, "TPU v5e chip (197 TFLOP/s bf16)": 197e12}
ASSUMED_MFU = 0.4


def make_folder(folder: pathlib.Path, count: int) -> None:
    """`count` 500x375 JPEGs in <folder>/train/<class>/ (4 classes), smooth random content."""
    from PIL import Image

    marker = folder / f".complete_{count}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    for index in range(count):
        class_dir = folder / "train" / f"class{index % 4}"
        class_dir.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        noise = rng.normal(0, 12, (375, 500, 3))
        pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(class_dir / f"{index:05d}.JPEG", quality=90)
    marker.write_text("ok")


def files_of(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((folder / "train").rglob("*.JPEG"))


REPEATS = 3  # passes over the folder per single-core figure (op draws differ per pass)


def rate(fn, items, repeats: int = REPEATS) -> float:
    """Images/s of fn over items (after one warm-up pass over the first few)."""
    for item in items[:8]:
        fn(item)
    start = time.perf_counter()
    for _ in range(repeats):
        for item in items:
            fn(item)
    return repeats * len(items) / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Ours (project venv)


def ours(folder: pathlib.Path, workers: int) -> dict:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs import common
    from zoo.training import pipeline, tasks

    files = files_of(folder)
    blobs = [path.read_bytes() for path in files]

    def config_for(**augment):
        c = common.base_config()
        c.model.name = "swin_t"
        c.data.source = "image_folder"
        c.data.path = str(folder)
        c.data.train_split = c.data.eval_split = "train"
        c.data.image_size = SIZE
        c.data.num_classes = 4
        c.data.augment = "crop_flip"
        c.data.rand_augment = augment.get("rand_augment", "")
        c.batch_size = 64
        c.data.worker_count = workers
        return c

    from zoo.training import image_ops

    def decode(blob):
        return image_ops.decode_image(blob, "bench")

    results = {"decode": rate(decode, blobs)}
    rng = np.random.default_rng(0)
    for name, augment in (("crop_flip", {}), ("randaugment", {"rand_augment": RAND_AUGMENT})):
        config = config_for(**augment)
        task = tasks.get_task(config)
        prepare = task.make_preparer(config)
        results[name] = rate(lambda blob: prepare({"image": blob, "label": 0}, rng), blobs)
    if workers:
        config = config_for(rand_augment=RAND_AUGMENT)
        task = tasks.get_task(config)
        batches = pipeline._local_train_batches(config, task, process_index=0, process_count=1)
        iterator = pipeline._iterate(batches, config)
        next(iterator)  # workers started and warm
        count = max(8, 2 * len(files) // 64)
        start = time.perf_counter()
        for _ in range(count):
            next(iterator)
        results["workers"] = count * 64 / (time.perf_counter() - start)
    return results


# ---------------------------------------------------------------------------------------------
# timm (its own venv)


def timm_side(folder: pathlib.Path, workers: int) -> dict:
    import torch
    from PIL import Image
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    from timm.data import auto_augment

    files = files_of(folder)
    torch.set_num_threads(1)
    # timm 1.0.31 calls ImageOps.posterize(img, 0) for PosterizeIncreasing at magnitude 10,
    # which Pillow >= 10 rejects, so its RandAugment crashes on ~1% of images. Patch in what
    # older Pillow did (and zoo/training/augment.py does): an all-zero image.
    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        return img.point(lambda _: 0) if bits_to_keep <= 0 else original(img, bits_to_keep,
                                                                          **kwargs)

    auto_augment.posterize = posterize
    for table in (auto_augment.NAME_TO_OP,):
        for name, fn in table.items():
            if fn is original:
                table[name] = posterize

    def decode(path):
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")

    crop_flip = create_transform(SIZE, is_training=True, color_jitter=None, re_prob=0.0)
    full = create_transform(SIZE, is_training=True, auto_augment=RAND_AUGMENT, re_prob=0.0)
    results = {"decode": rate(decode, files),
               "crop_flip": rate(lambda p: crop_flip(decode(p)), files),
               "randaugment": rate(lambda p: full(decode(p)), files)}
    if workers:
        dataset = ImageFolder(str(folder / "train"), transform=full)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True,
                                             num_workers=workers, persistent_workers=True,
                                             drop_last=True)
        iterator = iter(loader)
        next(iterator)
        count = max(8, 2 * len(files) // 64)
        start = time.perf_counter()
        done = 0
        while done < count:
            try:
                next(iterator)
            except StopIteration:
                iterator = iter(loader)
                continue
            done += 1
        results["workers"] = count * 64 / (time.perf_counter() - start)
    import timm
    results["versions"] = f"timm {timm.__version__}, torch {torch.__version__}"
    return results


# ---------------------------------------------------------------------------------------------


def swin_t_train_flops_per_image() -> float:
    """FLOPs of one swin_t training step per image (XLA cost analysis, batch 2, CPU)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import zoo

    model = zoo.create_model("swin_t", rngs=nnx.Rngs(0), attn_impl="xla")
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32)

    def loss(state, x):
        return jnp.mean(nnx.merge(graphdef, state)(x, train=True, rngs=nnx.Rngs(0)) ** 2)

    compiled = jax.jit(jax.grad(loss)).lower(state, images).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", default="/tmp/zoo_bench_jpegs")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timm_python", default="/tmp/timmenv/bin/python")
    parser.add_argument("--side", default="ours", choices=("ours", "timm"))
    parser.add_argument("--skip_flops", action="store_true")
    args = parser.parse_args()
    folder = pathlib.Path(args.folder)
    if args.side == "timm":
        print(json.dumps(timm_side(folder, args.workers)))
        return
    make_folder(folder, args.images)
    mine = ours(folder, args.workers)
    theirs = None
    if args.timm_python:
        result = subprocess.run([args.timm_python, __file__, "--side", "timm", "--folder",
                                 str(folder), "--workers", str(args.workers)],
                                capture_output=True, text=True, check=False)
        if result.returncode:
            print(f"timm side failed:\n{result.stderr[-2000:]}")
        else:
            theirs = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"# {datetime.date.today()} · {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores · {len(files_of(folder))} JPEGs 500x375 -> {SIZE} px · "
          f"{theirs['versions'] if theirs else 'timm not run'}\n")
    print("| stage | ours img/s | timm img/s | ours / timm |")
    print("|---|---:|---:|---:|")
    labels = {"decode": "decode (1 core)", "crop_flip": "+ crop/flip (1 core)",
              "randaugment": f"+ RandAugment {RAND_AUGMENT} (1 core)",
              "workers": f"full, {args.workers} worker processes"}
    for key, label in labels.items():
        if key not in mine:
            continue
        other = theirs.get(key) if theirs else None
        ratio = f"{mine[key] / other:.2f}x" if other else "–"
        print(f"| {label} | {mine[key]:.1f} | {other:.1f} | {ratio} |" if other else
              f"| {label} | {mine[key]:.1f} | – | – |")
    if not args.skip_flops:
        flops = swin_t_train_flops_per_image()
        print(f"\nswin_t training step: {flops / 1e9:.1f} GFLOP per image (XLA cost analysis). "
              f"At {ASSUMED_MFU:.0%} MFU one accelerator consumes:")
        per_core = mine["randaugment"]
        for name, peak in PEAKS.items():
            needed = peak * ASSUMED_MFU / flops
            print(f"- {name}: {needed:,.0f} images/s = {needed / per_core:,.0f} cores of our "
                  f"full augmentation per chip")


if __name__ == "__main__":
    main()
