"""What the config files share: the schema (`base_config`, defined in zoo/training/schema.py
so that the installed package validates configs without this folder) and helpers that set up
common parts of a run (context parallelism, ImageNet data, big_vision-style arguments).

Launch, big_vision style:
  python train.py --config configs/vit.py:smoke --workdir /tmp/run --config.total_steps=50
"""
import ml_collections

from zoo.training.schema import base_config  # noqa: F401  (the config files' entry point)


def with_context_parallelism(c: ml_collections.ConfigDict, size: int, *,
                             strategy: str = "ring") -> ml_collections.ConfigDict:
    """Adds a `sequence` mesh axis of `size` (after `data`) and splits every activation's
    sequence (`activation_length`) over it, so attention runs context-parallel with
    `strategy`. The data axis keeps the remaining devices (-1)."""
    axes = list(c.mesh_axes)
    shape = list(c.mesh_shape)
    if "sequence" in axes:
        shape[axes.index("sequence")] = size
    else:
        at = axes.index("data") + 1 if "data" in axes else 0
        axes.insert(at, "sequence")
        shape.insert(at, size)
    c.mesh_axes, c.mesh_shape = tuple(axes), tuple(shape)
    rules = [tuple(rule) for rule in c.logical_axis_rules if rule[0] != "activation_length"]
    c.logical_axis_rules = tuple(rules) + (("activation_length", "sequence"),)
    c.context_parallel.strategy = strategy
    return c


def imagenet_data(c: ml_collections.ConfigDict, source: str,
                  image_size: int) -> ml_collections.ConfigDict:
    """Points `c.data` at ImageNet-1k: "tfds" = TFDS's on-disk imagenet2012 (read without
    TensorFlow; set data.path to its dir), "image_folder" = <path>/train/<class>/*.JPEG and
    <path>/val/<class>/*.JPEG. Crop-and-flip augmentation, 8 grain workers."""
    c.data.source = source
    if source == "tfds":
        c.data.name = "imagenet2012"
        c.data.path = "~/tensorflow_datasets"
        c.data.eval_split = "validation"
    else:
        c.data.path = "/data/imagenet"
        c.data.eval_split = "val"
    c.data.train_split = "train"
    c.data.image_size = image_size
    c.data.num_classes = 1000
    c.data.augment = "crop_flip"
    c.data.worker_count = 8
    return c


def parse_arg(arg: str | None, *, file: str, defaults: dict[str, str],
              allowed: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Parses a config argument, big_vision style: "h1" or "variant=h1,data=image_folder".

    A bare item sets "variant". `defaults` lists every option a config file takes; `allowed`
    restricts the values of some of them. Errors name the file, the option and what is allowed.
    """
    options = dict(defaults)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = "variant", item
        if key not in options:
            raise ValueError(f"unknown {file} option {key!r} in {arg!r}; allowed: "
                             f"{sorted(options)} (e.g. {file}:variant={allowed['variant'][-1]})")
        options[key] = value
    for key, values in allowed.items():
        if options[key] not in values:
            raise ValueError(f"{file} {key} must be one of {values}, got {options[key]!r}")
    return options
