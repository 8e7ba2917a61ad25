"""Input pipelines for the training loop: grain datasets that yield sharded global batches.

  train: range(N) -> shuffle(seed) -> repeat   one global order, reshuffled every epoch
      -> global batch k = positions [kB, (k+1)B)  the same for any process count
      -> process p loads rows [pB/P, (p+1)B/P)    decode + augment, RNG from (seed, epoch, index)
      -> to_iter_dataset [-> mp_prefetch]        worker processes when data.worker_count > 0
      -> jax.make_array_from_process_local_data -> {"image": [B,S,S,3], "label": [B]} global
  eval: source[process_index::process_count], padded to equal batch counts with a 0 mask

A run on one process and on N processes therefore trains on identical global batches.
Batching happens before the iterator (on the MapDataset), so batch k holds the same examples
whatever the number of worker processes: grain hands whole batches to workers round-robin. The
augmentation RNG depends on the example, not on the position of a worker, for the same reason.
The train iterator's state is therefore just the number of batches consumed, which is also
independent of the worker count and can be restored into a pipeline with a different one.

Sources (config.data.source): "generated" (synthetic, learnable, no files), "image_folder"
(root/<split>/<class>/*.jpg|jpeg|png), "array_record" (serialized tf.train.Example records with
an encoded "image" and an int64 "label", read without TensorFlow) and "tfds" (the ArrayRecord
shards of a TFDS-prepared data_dir).

What a task reads from an example and how it is prepared lives in the `_DATA_TASKS` table
(keyed by config.task); language modelling, novel-view synthesis or diffusion add an entry with
their own sources, example preparation and batch spec, and reuse the sharding, shuffling,
resume and device placement here.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import io
import math
import os
import re
import sys
import zlib
from typing import Any, Callable, Iterator, Mapping

import grain
import jax
import numpy as np

from zoo.training import records

SOURCES = ("generated", "image_folder", "array_record", "tfds")
AUGMENTS = ("none", "flip", "crop_flip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Feature names of the TFDS image-classification convention.
IMAGE_FEATURE, LABEL_FEATURE = "image", "label"

IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), np.float32) * 255.0
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), np.float32) * 255.0
# Eval (and un-cropped train) images: the centre square covering this fraction of the shorter
# side, resized to image_size (the usual "resize to S/0.875, centre-crop S").
CENTER_CROP_FRACTION = 0.875
CROP_SCALE = (0.08, 1.0)  # random-resized-crop area fraction (Inception / timm default)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect ratio range

# The generated set is a fixed "dataset": its content does not change with config.seed (which
# drives shuffling and augmentation), just as a real dataset does not.
_GENERATED_DATASET_SEED = 0x5EED
_AUGMENT_STREAM = 1  # keeps augmentation draws apart from any other use of config.seed


# ================================================================================================
# Sources: random access (len + getitem) to raw examples {"image": ndarray | bytes, "label": int}
# ================================================================================================

class GeneratedImages:
    """Synthetic image classification computed from (split, index), no files.

    Class c has a fixed smooth template: a base colour, a low-frequency colour field and an
    oriented stripe texture. An example is its class template, randomly shifted (cyclically,
    up to 1/8 of the side), maybe mirrored, plus pixel noise; the label is index % num_classes,
    so classes are balanced. Small models learn it in ~100 steps; even a nearest-class-mean
    classifier on raw pixels is far above chance.
    """

    def __init__(self, *, num_examples: int, image_size: int, num_classes: int, split: str):
        self.num_examples = num_examples
        self.image_size = image_size
        self.num_classes = num_classes
        self.split = split
        self._split_stream = zlib.crc32(split.encode())

    def __len__(self) -> int:
        return self.num_examples

    def template(self, label: int) -> np.ndarray:
        """float32 [S, S, 3] in [0, 1]."""
        side = self.image_size
        rng = np.random.default_rng([_GENERATED_DATASET_SEED, label])
        base = rng.uniform(0.2, 0.8, size=3)
        grid = rng.normal(0.0, 0.15, size=(4, 4, 3))
        upsample = _linear_upsampling_matrix(side, 4)
        field = np.einsum("ya,abc,xb->yxc", upsample, grid, upsample)
        frequency, angle, phase = rng.uniform(1.0, 4.0), rng.uniform(0, np.pi), rng.uniform(0, 6.3)
        coords = np.arange(side) / side
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        stripes = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        texture = 0.12 * stripes[..., None] * rng.uniform(-1.0, 1.0, size=3)
        return np.clip(base + field + texture, 0.0, 1.0).astype(np.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        label = index % self.num_classes
        rng = np.random.default_rng([_GENERATED_DATASET_SEED, self._split_stream, index])
        max_shift = max(1, self.image_size // 8)
        shift = rng.integers(-max_shift, max_shift + 1, size=2)
        image = np.roll(self.template(label), tuple(shift), axis=(0, 1))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = image + rng.normal(0.0, 0.08, size=image.shape)
        pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        return {"image": pixels, "label": label, "origin": f"generated {self.split}[{index}]"}


def _linear_upsampling_matrix(size: int, grid: int) -> np.ndarray:
    """[size, grid] weights that linearly interpolate `grid` samples onto `size` pixels."""
    position = np.clip((np.arange(size) + 0.5) / size * grid - 0.5, 0, grid - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, grid - 1)
    frac = position - low
    weights = np.zeros((size, grid))
    weights[np.arange(size), low] += 1.0 - frac
    weights[np.arange(size), high] += frac
    return weights


class ImageFiles:
    """Encoded image files with their labels; decoding happens in the pipeline's map step (in
    the worker processes when there are any)."""

    def __init__(self, files: list[str], labels: list[int]):
        self.files = files
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[int(index)]
        with open(path, "rb") as f:
            encoded = f.read()
        return {"image": encoded, "label": self.labels[int(index)], "origin": path}


class ExampleRecords:
    """ArrayRecord files of serialized tf.train.Example with an encoded image and a label."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._records = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        features = records.decode_example(self._records[int(index)])
        image, label = features.get(IMAGE_FEATURE), features.get(LABEL_FEATURE)
        valid_label = (isinstance(label, np.ndarray) and label.dtype == np.int64
                       and label.shape == (1,))
        if not isinstance(image, list) or not image or not valid_label:
            raise ValueError(
                    f"record {index} of {self.paths[0] if len(self.paths) == 1 else self.paths} "
                    f"needs a bytes feature {IMAGE_FEATURE!r} and one int64 {LABEL_FEATURE!r}; "
                    f"it has {sorted(features)}")
        return {"image": image[0], "label": int(label[0]), "origin": f"record {index}"}


# --- locating files ------------------------------------------------------------------------------

def _require_path(path: str) -> str:
    if not path:
        raise ValueError(f"config.data.path={path!r} is empty; config.data.source needs a "
                         f"folder, file glob or data dir")
    return os.path.expanduser(path)


def _list_class_folders(root: str, split: str) -> dict[str, list[str]]:
    """class name -> sorted image files under root/split/class (searched recursively)."""
    if not os.path.isdir(root):
        raise ValueError(f"config.data.path={root!r} does not exist or is not a directory")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        found = sorted(e.name for e in os.scandir(root) if e.is_dir())
        raise ValueError(f"config.data.path={root!r} has no split folder {split!r} (image_folder "
                         f"expects root/<split>/<class>/*.jpg|jpeg|png); folders there: {found}")
    classes = _class_folders_cached(split_dir, _folder_signature(split_dir))
    if not classes:
        raise ValueError(f"config.data.path={root!r}: {split_dir} has no class folders")
    for name, files in classes.items():
        if not files:
            raise ValueError(f"config.data.path={root!r}: class folder "
                             f"{os.path.join(split_dir, name)} has no {'/'.join(IMAGE_EXTENSIONS)} "
                             f"files")
    return classes


def _folder_signature(split_dir: str) -> tuple:
    """Modification times of the split folder and its class folders: the listing cache key, so
    files added between two calls are seen (each eval rebuilds its pipeline)."""
    entries = sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(split_dir) if e.is_dir())
    return (os.stat(split_dir).st_mtime_ns, tuple(entries))


@functools.lru_cache(maxsize=8)
def _class_folders_cached(split_dir: str, signature: tuple) -> dict[str, list[str]]:
    del signature  # part of the cache key only
    classes = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        files = []
        for folder, subfolders, names in os.walk(entry.path):
            subfolders.sort()
            files += [os.path.join(folder, n) for n in sorted(names)
                      if n.lower().endswith(IMAGE_EXTENSIONS)]
        classes[entry.name] = files
    return classes


def _array_record_files(path: str, split: str) -> list[str]:
    """Files of `split`: `path` may contain "{split}"; a directory means its
    `*<split>.array_record*` files (TFDS shard names), or all `*.array_record*` files when the
    directory itself was named through "{split}"."""
    path = _require_path(path)
    pattern = path.replace("{split}", split)
    if os.path.isdir(pattern):
        name = "*.array_record*" if "{split}" in path else f"*{split}.array_record*"
        files = sorted(glob.glob(os.path.join(pattern, name)))
        if not files:
            present = sorted(os.listdir(pattern))[:10]
            raise ValueError(f"config.data.path={path!r}: directory {pattern} has no {name} files "
                             f"for split {split!r}; it contains {present}")
        return files
    if "{split}" not in path:
        raise ValueError(f"config.data.path={path!r} is neither a directory nor a file glob "
                         f"containing '{{split}}' (needed to tell the train and eval files apart, "
                         f"e.g. '/data/foo-{{split}}.array_record-*')")
    files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    if not files:
        raise ValueError(f"config.data.path={path!r} matches no files for split {split!r} "
                         f"(glob {pattern!r}; does it exist?)")
    return files


def _version_key(name: str) -> tuple[int, ...] | None:
    return tuple(int(p) for p in name.split(".")) if re.fullmatch(r"\d+(\.\d+)*", name) else None


def _tfds_files(data_dir: str, name: str, split: str) -> list[str]:
    """`<data_dir>/<name>[/<config>]/<version>/<name>-<split>.array_record-*`; the highest
    version unless `name` pins one as "name:1.2.3" (TFDS spelling)."""
    data_dir = _require_path(data_dir)
    if not name:
        raise ValueError("config.data.name='' is empty; the tfds source needs a dataset name "
                         "(e.g. 'cifar10' or 'imagenet2012:5.1.0')")
    if not os.path.isdir(data_dir):
        raise ValueError(f"config.data.path={data_dir!r} (the TFDS data dir) does not exist")
    name, _, pinned = name.partition(":")
    dataset_dir = os.path.join(data_dir, name)
    if not os.path.isdir(dataset_dir):
        present = sorted(e.name for e in os.scandir(data_dir) if e.is_dir())
        raise ValueError(f"config.data.name={name!r}: no folder {dataset_dir}; datasets in "
                         f"config.data.path={data_dir!r}: {present}")
    versions = sorted((v for v in os.listdir(dataset_dir) if _version_key(v)), key=_version_key)
    if pinned:
        if pinned not in versions:
            raise ValueError(f"config.data.name={name + ':' + pinned!r}: version {pinned} not "
                             f"found in {dataset_dir}; versions there: {versions}")
        version = pinned
    elif versions:
        version = versions[-1]
    else:
        raise ValueError(f"config.data.name={name!r}: {dataset_dir} has no version folders "
                         f"(like 1.0.0); it contains {sorted(os.listdir(dataset_dir))}")
    version_dir = os.path.join(dataset_dir, version)
    prefix = name.split("/")[0]  # TFDS names shards after the builder, without its config
    files = sorted(glob.glob(os.path.join(version_dir, f"{prefix}-{split}.array_record-*")))
    if not files:
        present = sorted(f for f in os.listdir(version_dir) if ".array_record" in f)
        raise ValueError(f"config.data.name={name!r} version {version}: no "
                         f"{prefix}-{split}.array_record-* shards in {version_dir} (split "
                         f"{split!r}); ArrayRecord files there: {present[:10]}")
    return files


def open_source(config, split: str):
    """The random-access source of raw examples for `split` of config.data.source."""
    d = config.data
    if d.source == "generated":
        count = d.num_train_examples if split == d.train_split else d.num_eval_examples
        return GeneratedImages(num_examples=count, image_size=d.image_size,
                               num_classes=d.num_classes, split=split)
    if d.source == "image_folder":
        root = _require_path(d.path)
        # Label ids come from the class names of both splits, so train and eval agree even when
        # a class is missing from one of them.
        listed = {s: _list_class_folders(root, s) for s in (d.train_split, d.eval_split, split)}
        names = sorted(set().union(*listed.values()))
        if len(names) != d.num_classes:
            raise ValueError(f"config.data.num_classes={d.num_classes} but config.data.path="
                             f"{d.path!r} has {len(names)} class folders across splits "
                             f"{d.train_split!r}/{d.eval_split!r}: {names[:10]}")
        label_of = {name: i for i, name in enumerate(names)}
        files, labels = [], []
        for name, paths in listed[split].items():
            files += paths
            labels += [label_of[name]] * len(paths)
        return ImageFiles(files, labels)
    if d.source == "array_record":
        return ExampleRecords(_array_record_files(d.path, split))
    if d.source == "tfds":
        return ExampleRecords(_tfds_files(d.path, d.name, split))
    raise ValueError(f"config.data.source={d.source!r} is invalid; allowed: {SOURCES}")


# ================================================================================================
# Example preparation (classification): decode, augment, normalise
# ================================================================================================

def _rgb_uint8(array: np.ndarray, origin: str) -> np.ndarray:
    """[H, W] or [H, W, 1|3|4] pixels -> uint8 [H, W, 3] (grey repeated, alpha dropped)."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{origin}: image array of shape {array.shape}; expected [H, W] or "
                         f"[H, W, 1|3|4]")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    return np.ascontiguousarray(array.astype(np.uint8))


def _decode_image(encoded: bytes, origin: str):
    """Encoded JPEG/PNG bytes -> RGB PIL image."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(encoded)).convert("RGB")
    except Exception as error:  # noqa: BLE001  (PIL raises many types for bad files)
        raise ValueError(f"{origin}: cannot decode image ({len(encoded)} bytes): {error}"
                         ) from None


def _center_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred square covering `fraction` of the short side."""
    side = max(1, int(round(min(height, width) * fraction)))
    top, left = (height - side) // 2, (width - side) // 2
    return left, top, left + side, top + side


def _random_resized_box(height: int, width: int, rng: np.random.Generator
                        ) -> tuple[int, int, int, int]:
    """A crop of random area fraction in CROP_SCALE and aspect ratio in CROP_RATIO (log-uniform);
    after 10 misses, the largest centred crop whose ratio is in range."""
    area = height * width
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(log_low, log_high))
        crop_w = int(round(math.sqrt(target * ratio)))
        crop_h = int(round(math.sqrt(target / ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, left + crop_w, top + crop_h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        crop_w, crop_h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        crop_w, crop_h = int(round(height * CROP_RATIO[1])), height
    else:
        crop_w, crop_h = width, height
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return left, top, left + crop_w, top + crop_h


@dataclasses.dataclass(frozen=True)
class ClassificationExample:
    """raw {"image", "label"} -> {"image": float32 [S, S, 3] normalised, "label": int32}.

    Train (an RNG given): "crop_flip" takes a random-resized crop, "flip" and "crop_flip" mirror
    half the images. Otherwise the centre square covering `center_fraction` of the shorter side
    is resized to S (identity for generated images, which are already S x S).
    Picklable: it is shipped to grain's worker processes.
    """
    image_size: int
    num_classes: int
    augment: str
    center_fraction: float

    def __call__(self, raw: Mapping[str, Any], rng: np.random.Generator | None
                 ) -> dict[str, np.ndarray]:
        from PIL import Image

        origin = str(raw.get("origin", "example"))
        label = int(raw["label"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{origin}: label {label} is outside [0, config.data.num_classes="
                             f"{self.num_classes})")
        side = self.image_size
        array, image = None, None
        if isinstance(raw["image"], np.ndarray):
            array = _rgb_uint8(raw["image"], origin)
            height, width = array.shape[:2]
        else:
            image = _decode_image(raw["image"], origin)
            width, height = image.size
        if rng is not None and self.augment == "crop_flip":
            box = _random_resized_box(height, width, rng)
        else:
            box = _center_box(height, width, self.center_fraction)
        if box == (0, 0, side, side) and (height, width) == (side, side):
            pixels = array if array is not None else np.asarray(image)
        else:
            image = image if image is not None else Image.fromarray(array)
            pixels = np.asarray(image.resize((side, side), Image.BILINEAR, box=box))
        if rng is not None and self.augment in ("flip", "crop_flip") and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        normalised = (pixels.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
        return {"image": normalised, "label": np.int32(label)}


def _check_classification(config) -> None:
    d = config.data
    if d.augment not in AUGMENTS:
        raise ValueError(f"config.data.augment={d.augment!r} is invalid; allowed: {AUGMENTS}")
    if d.image_size < 1:
        raise ValueError(f"config.data.image_size={d.image_size!r} is invalid; allowed: an "
                         f"integer >= 1")
    if d.num_classes < 1:
        raise ValueError(f"config.data.num_classes={d.num_classes!r} is invalid; allowed: an "
                         f"integer >= 1")


def _classification_preparer(config) -> ClassificationExample:
    generated = config.data.source == "generated"
    return ClassificationExample(image_size=int(config.data.image_size),
                                 num_classes=int(config.data.num_classes),
                                 augment=str(config.data.augment),
                                 center_fraction=1.0 if generated else CENTER_CROP_FRACTION)


def _classification_spec(config) -> dict[str, tuple[tuple[int, ...], Any]]:
    side = int(config.data.image_size)
    return {"image": ((side, side, 3), np.float32), "label": ((), np.int32)}


# ================================================================================================
# The per-task table: the extension point for other tasks' data
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class DataTask:
    """The task-specific half of the input pipeline.

    sources: the config.data.source values this task reads.
    check_config(config): raise ValueError for settings this task's data cannot use.
    open_split(config, split): random-access source (len + getitem) of raw examples.
    make_preparer(config): picklable callable (raw example, rng or None at eval) -> dict of
        numpy arrays, one per batch key, with the shapes of `example_spec`.
    example_spec(config): batch key -> (per-example shape, numpy dtype).
    """
    sources: tuple[str, ...]
    check_config: Callable[[Any], None]
    open_split: Callable[[Any, str], Any]
    make_preparer: Callable[[Any], Callable[[Mapping[str, Any], Any], dict[str, np.ndarray]]]
    example_spec: Callable[[Any], dict[str, tuple[tuple[int, ...], Any]]]


_DATA_TASKS: dict[str, DataTask] = {
        "classification": DataTask(sources=SOURCES, check_config=_check_classification,
                                   open_split=open_source,
                                   make_preparer=_classification_preparer,
                                   example_spec=_classification_spec),
}


def register_data_task(name: str, task: DataTask) -> None:
    """Adds a task's data half (called by the module that registers the task)."""
    if name in _DATA_TASKS:
        raise ValueError(f"data task {name!r} is registered twice")
    _DATA_TASKS[name] = task


def _data_task(config) -> DataTask:
    from zoo.training import tasks  # the modules registering tasks also register their data
    tasks.list_tasks()
    if config.task not in _DATA_TASKS:
        raise ValueError(f"config.task={config.task!r} has no data pipeline; allowed: "
                         f"{sorted(_DATA_TASKS)}")
    return _DATA_TASKS[config.task]


# ================================================================================================
# Validation and shapes
# ================================================================================================

def validate_data_config(config, *, process_count: int | None = None) -> None:
    """Raises ValueError (naming the config field) for data settings that cannot work: unknown
    source/augment/task, missing or empty paths, a split with fewer examples than processes.
    Lists folders and opens record files, but reads no example."""
    d = config.data
    task = _data_task(config)
    if d.source not in task.sources:
        raise ValueError(f"config.data.source={d.source!r} is invalid for config.task="
                         f"{config.task!r}; allowed: {task.sources}")
    task.check_config(config)
    if d.worker_count < 0:
        raise ValueError(f"config.data.worker_count={d.worker_count!r} is invalid; allowed: an "
                         f"integer >= 0")
    if d.worker_buffer_size < 1:
        raise ValueError(f"config.data.worker_buffer_size={d.worker_buffer_size!r} is invalid; "
                         f"allowed: an integer >= 1")
    if d.source == "generated":
        for field in ("num_train_examples", "num_eval_examples"):
            if d[field] < 1:
                raise ValueError(f"config.data.{field}={d[field]!r} is invalid; allowed: an "
                                 f"integer >= 1")
    if not d.train_split or not d.eval_split:
        raise ValueError(f"config.data.train_split={d.train_split!r} / config.data.eval_split="
                         f"{d.eval_split!r}: both must be non-empty split names")
    processes = jax.process_count() if process_count is None else process_count
    for field, size in (("batch_size", config.batch_size),
                        ("eval.batch_size", config.eval.batch_size)):
        if size < 1 or size % processes:
            raise ValueError(f"config.{field}={size!r} is invalid; allowed: a positive multiple "
                             f"of the {processes} processes")
    count = len(task.open_split(config, d.train_split))
    if count < processes:
        raise ValueError(f"config.data.train_split={d.train_split!r} has {count} examples, fewer "
                         f"than the {processes} processes that each read a share of it")
    if len(task.open_split(config, d.eval_split)) < 1:
        raise ValueError(f"config.data.eval_split={d.eval_split!r} has no examples")


def batch_spec(config, *, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of one batch (train: config.batch_size; eval:
    config.eval.batch_size plus the float32 "mask")."""
    size = int(config.batch_size if train else config.eval.batch_size)
    spec = {k: jax.ShapeDtypeStruct((size,) + shape, dtype)
            for k, (shape, dtype) in _data_task(config).example_spec(config).items()}
    if not train:
        spec["mask"] = jax.ShapeDtypeStruct((size,), np.float32)
    return spec


# ================================================================================================
# grain pipelines (process-local numpy batches)
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class _LoadTrainBatch:
    """Local batch k -> this process's rows of global batch k, prepared and stacked.

    Global batch k is positions [k*B, (k+1)*B) of the global index stream; process p takes the
    rows [p*B/P, (p+1)*B/P). Augmentation randomness comes from (seed, epoch, example index)
    only, so a batch does not depend on the number of processes or workers either.
    """
    source: Any
    prepare: Callable
    indices: Any  # the endless global index stream (random access)
    seed: int
    num_examples: int
    global_batch: int
    local_batch: int
    process_index: int

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        start = batch * self.global_batch + self.process_index * self.local_batch
        examples = []
        for position in range(start, start + self.local_batch):
            index = int(self.indices[position])
            epoch = position // self.num_examples
            rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, epoch, index])
            examples.append(self.prepare(self.source[index], rng))
        return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


@dataclasses.dataclass(frozen=True)
class _LoadEvalExample:
    """Position in this process's padded eval pass -> prepared example + "mask" (1 = real)."""
    source: Any
    prepare: Callable
    process_index: int
    process_count: int
    num_local: int
    padding: Mapping[str, np.ndarray]

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        if position >= self.num_local:
            return {**self.padding, "mask": np.float32(0.0)}
        index = self.process_index + position * self.process_count
        return {**self.prepare(self.source[index], None), "mask": np.float32(1.0)}


def _process_share(num_examples: int, process_index: int, process_count: int):
    """Global example indices read by one process (a strided slice: disjoint, and together the
    whole set)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, process_count="
                         f"{process_count})")
    return grain.MapDataset.range(num_examples)[process_index::process_count]


def _global_index_stream(num_examples: int, *, seed: int, shuffle: bool):
    """Endless MapDataset of example indices in the global order, reshuffled every epoch
    (grain's shuffle-then-repeat), the same for any number of processes."""
    indices = grain.MapDataset.range(num_examples)
    if shuffle:
        indices = indices.shuffle(seed=seed)
    return indices.repeat(None)


def _local_train_batches(config, *, process_index: int, process_count: int):
    """Endless MapDataset of this process's train batches: its batch_size // process_count
    rows of every global batch. The global batches are the same for any process count, so a
    run on one host and on a pod slice see the same data in the same order."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, process_count="
                         f"{process_count})")
    task = _data_task(config)
    source = task.open_split(config, config.data.train_split)
    if len(source) < process_count:
        raise ValueError(f"config.data.train_split={config.data.train_split!r} has {len(source)} "
                         f"examples, fewer than the {process_count} processes")
    indices = _global_index_stream(len(source), seed=int(config.seed),
                                   shuffle=bool(config.data.shuffle))
    load = _LoadTrainBatch(source=source, prepare=task.make_preparer(config), indices=indices,
                           seed=int(config.seed), num_examples=len(source),
                           global_batch=int(config.batch_size),
                           local_batch=int(config.batch_size) // process_count,
                           process_index=process_index)
    return grain.MapDataset.range(sys.maxsize).map(load)


def _eval_batch_count(num_examples: int, local_batch: int, process_count: int,
                      cap: int) -> int:
    """Batches every process yields (the same on all of them, as collectives require)."""
    largest_share = -(-num_examples // process_count)
    count = -(-largest_share // local_batch)
    return min(count, cap) if cap > 0 else count


def _local_eval_batches(config, *, process_index: int, process_count: int):
    """Finite MapDataset of this process's eval batches, the last one padded (mask 0)."""
    task = _data_task(config)
    source = task.open_split(config, config.data.eval_split)
    local_batch = config.eval.batch_size // process_count
    num_batches = _eval_batch_count(len(source), local_batch, process_count,
                                    int(config.eval.num_batches))
    num_local = len(_process_share(len(source), process_index, process_count))
    padding = {k: np.zeros(shape, dtype) for k, (shape, dtype) in
               task.example_spec(config).items()}
    load = _LoadEvalExample(source=source, prepare=task.make_preparer(config),
                            process_index=process_index, process_count=process_count,
                            num_local=num_local, padding=padding)
    return grain.MapDataset.range(num_batches * local_batch).map(load).batch(local_batch)


def _allow_worker_processes_without_absl_main() -> None:
    """grain 0.2.18's worker processes read absl flags and raise UnparsedFlagAccessError unless
    the flags were parsed (grain #1355, fixed after 0.2.18). train.py parses them through
    absl.app.run; tests and notebooks do not, so mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _iterate(batches, config):
    """A grain iterator over a MapDataset of batches: a few threads in this process, or
    config.data.worker_count worker processes each producing whole batches."""
    workers = int(config.data.worker_count)
    threads = 1 if workers else max(1, min(4, os.cpu_count() or 1))
    # Elements are whole batches, so the buffer is kept to about one batch per thread.
    dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                        prefetch_buffer_size=threads))
    if workers:
        _allow_worker_processes_without_absl_main()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=int(config.data.worker_buffer_size)))
    return iter(dataset)


# ================================================================================================
# Global batches for the loop
# ================================================================================================

def _to_global(local: Mapping[str, np.ndarray], data_sharding, global_batch: int
               ) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v),
                                                      (global_batch,) + np.shape(v)[1:])
            for k, v in local.items()}


def _check_sharding(mesh, data_sharding) -> None:
    if mesh is not None and getattr(data_sharding, "mesh", mesh) != mesh:
        raise ValueError("data_sharding must be a NamedSharding on `mesh` (the batch is placed on "
                         "the mesh the train step runs on)")


class TrainIterator:
    """Endless iterator of global train batches; resumable through get_state/set_state.

    The state, {"next_batch": k, "batch_size": B}, is the number of batches consumed: batch k
    depends only on the config (seed, data, batch size, process count), so a restored iterator
    continues exactly where the saved one was, whatever data.worker_count either of them used.
    The grain iterator is created on first use (and recreated by set_state), so restoring right
    after construction does not start worker processes twice.
    """

    def __init__(self, config, data_sharding, *, process_index: int | None = None,
                 process_count: int | None = None):
        self._config = config
        self._data_sharding = data_sharding
        self._process_count = jax.process_count() if process_count is None else process_count
        self._process_index = jax.process_index() if process_index is None else process_index
        self._batches = _local_train_batches(config, process_index=self._process_index,
                                             process_count=self._process_count)
        self._global_batch = int(config.batch_size)
        self._next_batch = 0
        self._grain_iterator = None

    @property
    def grain_iterator(self):
        """The underlying grain DatasetIterator, positioned at the next batch. Its own
        get_state counts from the position it was created at; checkpoint this TrainIterator's
        get_state instead."""
        if self._grain_iterator is None:
            self._grain_iterator = _iterate(self._batches[self._next_batch:], self._config)
        return self._grain_iterator

    def __iter__(self) -> "TrainIterator":
        return self

    def next_local(self) -> dict[str, np.ndarray]:
        """This process's share of the next batch, as numpy arrays."""
        local = next(self.grain_iterator)
        self._next_batch += 1
        return local

    def __next__(self) -> dict[str, jax.Array]:
        return _to_global(self.next_local(), self._data_sharding, self._global_batch)

    def get_state(self) -> dict:
        return {"next_batch": self._next_batch, "batch_size": self._global_batch}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "next_batch" not in state:
            raise ValueError(f"TrainIterator.set_state: expected a dict with 'next_batch' (from "
                             f"get_state), got {state!r}")
        saved_batch = state.get("batch_size", self._global_batch)
        if saved_batch != self._global_batch:
            raise ValueError(f"the data position was saved with batch_size={saved_batch}, but "
                             f"config.batch_size={self._global_batch}; resuming would skip or "
                             f"repeat data (keep the batch size of the run being resumed)")
        next_batch = int(state["next_batch"])
        if next_batch < 0:
            raise ValueError(f"TrainIterator.set_state: next_batch={next_batch} must be >= 0")
        self.close()
        self._next_batch = next_batch

    def close(self) -> None:
        """Stops worker processes, if any (grain also does on garbage collection)."""
        if self._grain_iterator is not None:
            self._grain_iterator.close()
            self._grain_iterator = None


def make_train_iterator(config, mesh, data_sharding) -> TrainIterator:
    """Endless global train batches of config.batch_size, sharded by `data_sharding` (a
    NamedSharding of [global_batch, ...] arrays on `mesh`); each process reads and prepares
    batch_size // process_count examples per batch."""
    _check_sharding(mesh, data_sharding)
    return TrainIterator(config, data_sharding)


def make_eval_iterator(config, mesh, data_sharding) -> Iterator[dict[str, jax.Array]]:
    """One pass over config.data.eval_split in global batches of config.eval.batch_size, with a
    float32 "mask" (0 on the padding of the last batch); config.eval.num_batches > 0 caps the
    number of batches."""
    _check_sharding(mesh, data_sharding)
    batches = _local_eval_batches(config, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    return _eval_batches(batches, config, data_sharding)


def _eval_batches(batches, config, data_sharding) -> Iterator[dict[str, jax.Array]]:
    iterator = _iterate(batches, config)
    try:
        for local in iterator:
            yield _to_global(local, data_sharding, int(config.eval.batch_size))
    finally:
        iterator.close()
