"""Image-classification sources: random access (len + getitem) to raw examples
{"image": uint8 ndarray | encoded bytes, "label": int, "origin": str}.

config.data.source selects one:
  * "generated": synthetic, learnable classes computed from (split, index); no files;
  * "image_folder": root/<split>/<class>/*.jpg|jpeg|png (searched recursively);
  * "array_record": serialized tf.train.Example records with an encoded "image" and an int64
    "label", read without TensorFlow (`path` a directory or a glob containing "{split}");
  * "tfds": the ArrayRecord shards of a TFDS-prepared data dir
    (<path>/<name>[/<config>]/<version>/<name>-<split>.array_record-*).
Decoding and augmentation happen later, in the task's example preparation (grain's map step,
possibly in worker processes).

Every path may be local or in a bucket (`gs://...`): listings and reads go through zoo.storage,
and ArrayRecord shards in a bucket are read by array_record's own GCS client (credentials from
the environment, as gcloud's application-default ones). Local folders are listed as before (in
memory, keyed by the folders' modification times). A bucket folder is listed once per run
(one listing call per directory, 16 at a time): `cached_listing` keeps the listing in memory and,
once `set_listing_cache(workdir)` was called, in <workdir>/data_listing/<kind>-<hash>.json, so
a restarted run does not list again. The cache is reused while a cheap fingerprint (the names of
the subfolders: classes, scenes) is unchanged; files added to or removed from an existing
subfolder are not seen: delete <workdir>/data_listing/ to list again.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
import posixpath
import re
import time
import zlib
from typing import Any, Callable

import grain
import numpy as np
from absl import logging

from zoo import storage
from zoo.training import records

SOURCES = ("generated", "image_folder", "array_record", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Feature names of the TFDS image-classification convention.
IMAGE_FEATURE, LABEL_FEATURE = "image", "label"
# The generated set is a fixed "dataset": its content does not change with config.seed (which
# drives shuffling and augmentation), just as a real dataset does not.
_GENERATED_DATASET_SEED = 0x5EED


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
        encoded = storage.read_bytes(path)
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


# --- listings of bucket folders ------------------------------------------------------------------

LISTING_CACHE_FOLDER = "data_listing"  # in the run directory
LISTING_THREADS = 16  # concurrent listing calls to a bucket
_listing_cache_dir: str | None = None
# (kind, folder, listing cache dir) -> (fingerprint, expanded listing): one listing per
# process and folder (the cache dir in the key: a listing made before set_listing_cache is
# looked up, or made and written, again once there is a cache).
_bucket_listings: dict[tuple[str, str, str | None], tuple[Any, Any]] = {}


def set_listing_cache(workdir: str | None) -> None:
    """Keeps the listings of bucket folders in <workdir>/data_listing/ (written by process 0),
    where a restarted run finds them; None = in memory only. The trainer calls it with the run
    directory before the data config is validated."""
    global _listing_cache_dir
    _listing_cache_dir = (None if workdir is None
                          else storage.join(workdir, LISTING_CACHE_FOLDER))


def parallel_map(function: Callable, items: list) -> list:
    """[function(item) for item in items], LISTING_THREADS at a time (calls to a bucket wait
    on the network, not on the interpreter)."""
    if len(items) < 2:
        return [function(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(min(LISTING_THREADS, len(items))) as pool:
        return list(pool.map(function, items))


def bucket_walk(top: str):
    """os.walk of a bucket folder, top-down: (folder relative to `top`, '' for `top` itself,
    subfolder names, file names), one listing call per folder (which tells folders from files:
    no call per object). Sorting the subfolder names in place orders the descent, as in os.walk.
    A folder that does not exist yields ('', [], [])."""
    def strip(path):
        return os.fspath(path).split("://", 1)[-1].rstrip("/")

    base = strip(top)
    for root, folders, names in storage.walk(top):
        yield strip(root)[len(base):].lstrip("/"), folders, names


def bucket_subfolders(folder: str) -> list[str]:
    """Sorted names of the subfolders of a bucket folder (one listing call)."""
    for _, folders, _ in bucket_walk(folder):
        return sorted(folders)
    return []


def _listing_file(kind: str, folder: str) -> str:
    digest = hashlib.sha256(folder.encode()).hexdigest()[:16]
    return storage.join(_listing_cache_dir, f"{kind}-{digest}.json")


def _read_listing(kind: str, folder: str, fingerprint) -> Any | None:
    """The cached listing of `folder`, None when there is none or its fingerprint differs."""
    if _listing_cache_dir is None:
        return None
    path = _listing_file(kind, folder)
    try:
        if not storage.exists(path):
            return None
        cached = json.loads(storage.read_text(path))
    except (OSError, ValueError) as error:
        logging.warning("ignoring the listing cache %s (%s); listing %s again", path, error,
                        folder)
        return None
    if cached.get("folder") != folder or cached.get("fingerprint") != fingerprint:
        logging.info("the listing cache %s is stale (the subfolders of %s changed); listing "
                     "again", path, folder)
        return None
    logging.info("%s: using the listing cached in %s", folder, path)
    return cached.get("listing")


def _write_listing(kind: str, folder: str, fingerprint, listing) -> None:
    import jax  # only to know the lead process

    if _listing_cache_dir is None or jax.process_index() != 0:
        return
    path = _listing_file(kind, folder)
    try:
        storage.makedirs(_listing_cache_dir)
        storage.write_text(path, json.dumps({"kind": kind, "folder": folder,
                                             "fingerprint": fingerprint, "listing": listing}))
    except OSError as error:  # the run can go on; a restart lists again
        logging.warning("could not write the listing cache %s: %s", path, error)


def cached_listing(kind: str, folder: str, fingerprint, make: Callable[[], Any],
                   expand: Callable[[Any], Any] = lambda listing: listing) -> Any:
    """expand(make()) for the bucket folder `folder`, listed once: kept in memory for this
    process and in the run's listing cache (`set_listing_cache`), each reused while
    `fingerprint` (JSON: a cheap summary such as the subfolder names) is unchanged. `make`
    returns the JSON listing (paths relative to `folder`, to keep the file small); `expand`
    turns it into what the caller uses (full paths)."""
    key = (kind, folder, _listing_cache_dir)
    known = _bucket_listings.get(key)
    if known is not None and known[0] == fingerprint:
        return known[1]
    listing = _read_listing(kind, folder, fingerprint)
    if listing is None:
        start = time.perf_counter()
        listing = make()
        logging.info("listed %s in %.1fs", folder, time.perf_counter() - start)
        _write_listing(kind, folder, fingerprint, listing)
    value = expand(listing)
    _bucket_listings[key] = (fingerprint, value)
    return value


# --- locating files ------------------------------------------------------------------------------

def _require_path(path: str) -> str:
    if not path:
        raise ValueError(f"config.data.path={path!r} is empty; config.data.source needs a "
                         f"folder, file glob or data dir")
    return os.path.expanduser(path)


def _subfolders(path: str) -> list[str]:
    if storage.is_remote(path):
        return bucket_subfolders(path)
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _list_class_folders(root: str, split: str) -> dict[str, list[str]]:
    """class name -> sorted image files under root/split/class (searched recursively)."""
    if not storage.isdir(root):
        raise ValueError(f"config.data.path={root!r} does not exist or is not a directory")
    split_dir = storage.join(root, split)
    if not storage.isdir(split_dir):
        found = _subfolders(root)
        raise ValueError(f"config.data.path={root!r} has no split folder {split!r} (image_folder "
                         f"expects root/<split>/<class>/*.jpg|jpeg|png); folders there: {found}")
    if storage.is_remote(split_dir):
        classes = _bucket_class_folders(split_dir)
    else:
        classes = _class_folders_cached(split_dir, _folder_signature(split_dir))
    if not classes:
        raise ValueError(f"config.data.path={root!r}: {split_dir} has no class folders")
    for name, files in classes.items():
        if not files:
            raise ValueError(f"config.data.path={root!r}: class folder "
                             f"{storage.join(split_dir, name)} has no "
                             f"{'/'.join(IMAGE_EXTENSIONS)} files")
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


def _bucket_image_files(class_dir: str) -> list[str]:
    """Image files under a bucket class folder, relative to it, in the order of the local
    listing (os.walk top-down with sorted names)."""
    files = []
    for folder, subfolders, names in bucket_walk(class_dir):
        subfolders.sort()
        files += [posixpath.join(folder, n) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def _bucket_class_folders(split_dir: str) -> dict[str, list[str]]:
    """_class_folders_cached for a bucket: the class folders are walked (in parallel) once per
    run (`cached_listing`, fingerprint: the class names)."""
    names = bucket_subfolders(split_dir)

    def make():
        listed = parallel_map(lambda name: _bucket_image_files(storage.join(split_dir, name)),
                              names)
        return dict(zip(names, listed))

    def expand(listing):
        return {name: [storage.join(split_dir, name, f) for f in files]
                for name, files in listing.items()}

    return cached_listing("image_folder", split_dir, names, make, expand)


def _existing_files(paths: list[str]) -> list[str]:
    """The paths that are files (not folders), in order; bucket paths checked in parallel."""
    if paths and storage.is_remote(paths[0]):
        return [p for p, is_file in zip(paths, parallel_map(storage.isfile, paths)) if is_file]
    return [p for p in paths if os.path.isfile(p)]


def _array_record_files(path: str, split: str) -> list[str]:
    """Files of `split`: `path` may contain "{split}"; a directory means its
    `*<split>.array_record*` files (TFDS shard names), or all `*.array_record*` files when the
    directory itself was named through "{split}"."""
    path = _require_path(path)
    pattern = path.replace("{split}", split)
    if storage.isdir(pattern):
        name = "*.array_record*" if "{split}" in path else f"*{split}.array_record*"
        files = storage.glob(storage.join(pattern, name))
        if not files:
            present = sorted(storage.listdir(pattern))[:10]
            raise ValueError(f"config.data.path={path!r}: directory {pattern} has no {name} files "
                             f"for split {split!r}; it contains {present}")
        return files
    if "{split}" not in path:
        raise ValueError(f"config.data.path={path!r} is neither a directory nor a file glob "
                         f"containing '{{split}}' (needed to tell the train and eval files apart, "
                         f"e.g. '/data/foo-{{split}}.array_record-*')")
    files = _existing_files(storage.glob(pattern))
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
    if not storage.isdir(data_dir):
        raise ValueError(f"config.data.path={data_dir!r} (the TFDS data dir) does not exist")
    name, _, pinned = name.partition(":")
    dataset_dir = storage.join(data_dir, name)
    if not storage.isdir(dataset_dir):
        present = _subfolders(data_dir)
        raise ValueError(f"config.data.name={name!r}: no folder {dataset_dir}; datasets in "
                         f"config.data.path={data_dir!r}: {present}")
    versions = sorted((v for v in storage.listdir(dataset_dir) if _version_key(v)),
                      key=_version_key)
    if pinned:
        if pinned not in versions:
            raise ValueError(f"config.data.name={name + ':' + pinned!r}: version {pinned} not "
                             f"found in {dataset_dir}; versions there: {versions}")
        version = pinned
    elif versions:
        version = versions[-1]
    else:
        raise ValueError(f"config.data.name={name!r}: {dataset_dir} has no version folders "
                         f"(like 1.0.0); it contains {sorted(storage.listdir(dataset_dir))}")
    version_dir = storage.join(dataset_dir, version)
    prefix = name.split("/")[0]  # TFDS names shards after the builder, without its config
    files = storage.glob(storage.join(version_dir, f"{prefix}-{split}.array_record-*"))
    if not files:
        present = sorted(f for f in storage.listdir(version_dir) if ".array_record" in f)
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
