"""The grain input pipelines: sources (generated, image folders, ArrayRecord, TFDS layout), the
tf.train.Example codec, per-process sharding, deterministic resume, eval padding, and global
batches on 8 fake devices."""
from __future__ import annotations

import json
import io
import math

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from PIL import Image

from configs import common
from training_helpers import apply_changes
from zoo.training import image_ops, pipeline, records, sources, tasks


def _task(config):
    return tasks.get_task(config)


def _validate(config) -> None:
    pipeline.validate_data_config(config, _task(config))


def _iterator(config, process_index: int = 0, process_count: int = 1):
    return pipeline.TrainIterator(config, _task(config), None, process_index=process_index,
                                  process_count=process_count)


def _config(**changes):
    """Small generated-data config; `changes` as dotted keys."""
    c = common.base_config()
    c.data.image_size = 8
    c.data.num_classes = 4
    c.data.num_train_examples = 24
    c.data.num_eval_examples = 10
    c.batch_size = 8
    c.eval.batch_size = 4
    return apply_changes(c, changes)


def _take(iterator, count):
    return [iterator.next_local() for _ in range(count)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _fingerprints(images):
    return [np.asarray(image).tobytes() for image in images]


# ================================================================================================
# tf.train.Example codec
# ================================================================================================

def _example_classes(syntax: str):
    """tf.train.Example built from a descriptor at test time (TensorFlow is not installed):
    proto3 packs repeated scalars, proto2 does not, so both wire forms are exercised."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    package = f"zoo_test_{syntax}"
    proto = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package,
                                               syntax=syntax)

    def message(name, fields, nested=()):
        msg = proto.message_type.add(name=name)
        for field in fields:
            msg.field.add(**field)
        for nested_msg in nested:
            msg.nested_type.add().CopyFrom(nested_msg)
        return msg

    repeated = F.LABEL_REPEATED
    message("BytesList", [dict(name="value", number=1, label=repeated, type=F.TYPE_BYTES)])
    message("FloatList", [dict(name="value", number=1, label=repeated, type=F.TYPE_FLOAT)])
    message("Int64List", [dict(name="value", number=1, label=repeated, type=F.TYPE_INT64)])
    feature = message("Feature", [
            dict(name="bytes_list", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                 type_name=f".{package}.BytesList", oneof_index=0),
            dict(name="float_list", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                 type_name=f".{package}.FloatList", oneof_index=0),
            dict(name="int64_list", number=3, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                 type_name=f".{package}.Int64List", oneof_index=0)])
    feature.oneof_decl.add(name="kind")
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
    entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=f".{package}.Feature")
    entry.options.map_entry = True
    message("Features", [dict(name="feature", number=1, label=repeated, type=F.TYPE_MESSAGE,
                              type_name=f".{package}.Features.FeatureEntry")], nested=[entry])
    message("Example", [dict(name="features", number=1, label=F.LABEL_OPTIONAL,
                             type=F.TYPE_MESSAGE, type_name=f".{package}.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Example"))


FEATURES = {
        "image": b"\x89PNG\x00\xff" * 50,
        "label": 7,
        "ids": [0, 1, -1, 2**40, -(2**63), 2**63 - 1],
        "scores": [0.5, -1.25, 3.0e7],
        "names": [b"a", b"", "caf\u00e9"],
}


@pytest.mark.parametrize("syntax", ["proto3", "proto2"])
def test_example_codec_agrees_with_protobuf(syntax):
    Example = _example_classes(syntax)
    # Ours -> protobuf.
    parsed = Example.FromString(records.encode_example(FEATURES))
    feature = parsed.features.feature
    assert feature["image"].bytes_list.value == [FEATURES["image"]]
    assert feature["label"].int64_list.value == [7]
    assert feature["ids"].int64_list.value == FEATURES["ids"]
    np.testing.assert_allclose(feature["scores"].float_list.value, FEATURES["scores"])
    assert feature["names"].bytes_list.value == [b"a", b"", "caf\u00e9".encode()]
    # protobuf -> ours (proto2 writes repeated scalars unpacked, proto3 packed).
    message = Example()
    message.features.feature["ids"].int64_list.value.extend(FEATURES["ids"])
    message.features.feature["scores"].float_list.value.extend(FEATURES["scores"])
    message.features.feature["image"].bytes_list.value.append(FEATURES["image"])
    message.features.feature["empty"].bytes_list.SetInParent()
    decoded = records.decode_example(message.SerializeToString())
    np.testing.assert_array_equal(decoded["ids"], FEATURES["ids"])
    assert decoded["ids"].dtype == np.int64
    np.testing.assert_allclose(decoded["scores"], FEATURES["scores"], rtol=1e-7)
    assert decoded["image"] == [FEATURES["image"]]
    assert decoded["empty"] == []


def test_example_codec_round_trip_and_errors():
    decoded = records.decode_example(records.encode_example(FEATURES))
    assert decoded["image"] == [FEATURES["image"]]
    assert decoded["label"].tolist() == [7]
    assert decoded["ids"].tolist() == FEATURES["ids"]
    np.testing.assert_allclose(decoded["scores"], FEATURES["scores"], rtol=1e-7)
    assert decoded["names"] == [b"a", b"", "caf\u00e9".encode()]
    # Deterministic bytes: keys are written in sorted order.
    shuffled = dict(reversed(list(FEATURES.items())))
    assert records.encode_example(shuffled) == records.encode_example(FEATURES)
    with pytest.raises(ValueError, match="feature .bad. mixes"):
        records.encode_example({"bad": [1, b"x"]})
    with pytest.raises(ValueError, match="truncated"):
        records.decode_example(records.encode_example(FEATURES)[:-3])


# ================================================================================================
# Generated data: determinism, learnability, sharding, resume
# ================================================================================================

def test_train_batches_are_deterministic_from_the_seed():
    first = _take(_iterator(_config()), 4)
    again = _take(_iterator(_config()), 4)
    _assert_same_batches(first, again)
    other = _take(_iterator(_config(seed=1)), 4)
    assert not all(np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))
    assert first[0]["image"].shape == (8, 8, 8, 3) and first[0]["image"].dtype == np.float32
    assert first[0]["label"].dtype == np.int32


def test_generated_images_are_normalised_and_learnable():
    """Nearest class mean on raw pixels (train split -> eval split) is far above chance."""
    num_classes, side = 10, 16
    train = sources.GeneratedImages(num_examples=300, image_size=side, num_classes=num_classes,
                                 split="train")
    held_out = sources.GeneratedImages(num_examples=100, image_size=side, num_classes=num_classes,
                                    split="eval")

    def pixels(source):
        images = np.stack([source[i]["image"] for i in range(len(source))]).astype(np.float32)
        return images.reshape(len(source), -1), np.arange(len(source)) % num_classes

    x, y = pixels(train)
    x_test, y_test = pixels(held_out)
    means = np.stack([x[y == k].mean(axis=0) for k in range(num_classes)])
    predictions = np.argmin(((x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = float(np.mean(predictions == y_test))
    assert accuracy > 0.6, accuracy  # chance is 0.1
    # Splits differ; examples are not copies of each other.
    assert not np.array_equal(train[0]["image"], held_out[0]["image"])
    assert not np.array_equal(train[0]["image"], train[num_classes]["image"])
    # After normalisation the images are roughly zero-mean, unit-variance.
    batch = _iterator(_config()).next_local()
    assert abs(float(batch["image"].mean())) < 0.75
    assert 0.5 < float(batch["image"].std()) < 1.5


@pytest.mark.parametrize("num_examples", [30, 31, 7])
def test_global_order_covers_every_example_once_per_epoch(num_examples):
    stream = pipeline._global_index_stream(num_examples, seed=3, shuffle=True)
    first = [stream[i] for i in range(num_examples)]
    second = [stream[i] for i in range(num_examples, 2 * num_examples)]
    assert sorted(first) == sorted(second) == list(range(num_examples))
    if num_examples > 10:
        assert first != second  # reshuffled every epoch


# Every host-side augmentation on: crop/flip, RandAugment, random erasing (timm's ImageNet set).
ALL_AUGMENTATION = {"data.augment": "crop_flip", "data.rand_augment": "rand-m9-mstd0.5-inc1",
                    "data.random_erasing.prob": 0.5}


@pytest.mark.parametrize("augment", ["none", "crop_flip", "all"])
@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_the_same_global_batches_as_one_process(process_count, augment):
    """Data order does not depend on the host count: the rows each process loads, stacked in
    process order, are the single-process global batch (augmentation included), across an
    epoch boundary (24 examples = 3 batches of 8; 5 batches read)."""
    config = _config(**(ALL_AUGMENTATION if augment == "all" else {"data.augment": augment}))
    single = _take(_iterator(config), 5)
    shares = [_take(_iterator(config, p, process_count), 5)
              for p in range(process_count)]
    for k, expected in enumerate(single):
        for key in expected:
            rows = np.concatenate([share[k][key] for share in shares])
            np.testing.assert_array_equal(rows, expected[key], err_msg=f"batch {k} {key}")


def test_train_pipeline_on_two_simulated_processes_reads_the_set_once_per_epoch():
    config = _config(**{"data.augment": "none"})  # images then equal the source's exactly
    source = sources.open_source(config, config.data.train_split)
    prepare = _task(config).make_preparer(config)
    expected = sorted(_fingerprints(prepare(source[i], None)["image"] for i in range(24)))
    seen = []
    for index in range(2):
        iterator = _iterator(config, index, 2)
        # 24 examples / 2 processes = 12 per process = 3 local batches of 8 // 2.
        for batch in _take(iterator, 3):
            assert batch["image"].shape[0] == 4
            seen += _fingerprints(batch["image"])
    assert sorted(seen) == expected


def test_resume_continues_with_identical_batches():
    config = _config(**ALL_AUGMENTATION)
    iterator = _iterator(config)
    _take(iterator, 5)  # beyond one epoch (3 batches): resume crosses an epoch boundary
    state = json.loads(json.dumps(iterator.get_state()))  # what the checkpoint stores
    expected = _take(iterator, 4)
    restored = _iterator(config)
    restored.set_state(state)
    _assert_same_batches(_take(restored, 4), expected)
    with pytest.raises(ValueError, match="batch_size=8"):
        _iterator(_config(batch_size=16)).set_state(state)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume_exactly():
    """worker_count=2 yields the in-process batches, and a position saved by one pipeline
    restores exactly into the other (one worker pool is started, to keep the test short)."""
    config = _config(**{"data.augment": "crop_flip"})
    in_process = _iterator(config)
    _take(in_process, 2)
    state = json.loads(json.dumps(in_process.get_state()))
    expected = _take(in_process, 4)
    config.data.worker_count = 2
    workers = _iterator(config)
    workers.set_state(state)
    try:
        _assert_same_batches(_take(workers, 4), expected)
        assert workers.get_state() == in_process.get_state() == {"next_batch": 6,
                                                                 "batch_size": 8,
                                                                 "bad_examples": 0}
    finally:
        workers.close()


# ================================================================================================
# Eval: one padded pass with an exact mask
# ================================================================================================

@pytest.mark.parametrize("process_count, cap, expected_masks", [
        (1, 0, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]),
        (1, 2, [[1, 1, 1, 1], [1, 1, 1, 1]]),
        (2, 0, [[[1, 1], [1, 1], [1, 0]], [[1, 1], [1, 1], [1, 0]]]),
])
def test_eval_pass_is_padded_with_an_exact_mask(process_count, cap, expected_masks):
    config = _config(**{"eval.num_batches": cap})  # 10 eval examples, eval batch 4
    source = sources.open_source(config, config.data.eval_split)
    prepare = _task(config).make_preparer(config)
    reference = {fp: int(source[i]["label"]) for i in range(len(source))
                 for fp in _fingerprints([prepare(source[i], None)["image"]])}
    if process_count == 1:
        expected_masks = [expected_masks]
    real = []
    for index in range(process_count):
        batches = list(pipeline._local_eval_batches(config, _task(config), process_index=index,
                                                process_count=process_count))
        assert [b["mask"].tolist() for b in batches] == expected_masks[index]
        for batch in batches:
            for image, label, mask in zip(batch["image"], batch["label"], batch["mask"]):
                if mask:
                    real.append(image.tobytes())
                    assert reference[image.tobytes()] == label
                else:
                    assert not image.any() and label == 0
    if cap == 0:
        assert sorted(real) == sorted(reference)  # every eval example exactly once
    else:
        assert len(set(real)) == len(real) == cap * 4


# ================================================================================================
# Global arrays on the 8 fake devices
# ================================================================================================

@pytest.mark.parametrize("shape, axes, data_axes", [
        ((8,), ("data",), ("data",)),
        ((4, 2, 1), ("data", "fsdp", "tensor"), ("data", "fsdp")),
        ((2, 1, 4), ("data", "fsdp", "tensor"), ("data",)),
])
def test_global_batches_have_the_requested_sharding(shape, axes, data_axes):
    assert jax.device_count() == 8
    mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes))
    sharding = NamedSharding(mesh, P(data_axes))
    config = _config(batch_size=16, **{"eval.batch_size": 8})
    batch = next(pipeline.make_train_iterator(config, _task(config), mesh, sharding))
    spec = pipeline.batch_spec(config, _task(config), train=True)
    assert batch.keys() == spec.keys()
    shards = math.prod(mesh.shape[a] for a in data_axes)
    for key, array in batch.items():
        assert array.shape == spec[key].shape and array.dtype == spec[key].dtype
        assert array.sharding == sharding
        assert array.addressable_shards[0].data.shape[0] == 16 // shards
    expected = _iterator(config).next_local()
    np.testing.assert_array_equal(np.asarray(batch["image"]), expected["image"])
    eval_batches = list(pipeline.make_eval_iterator(config, _task(config), mesh, sharding))
    assert len(eval_batches) == 2  # 10 examples in batches of 8
    assert eval_batches[-1].keys() == pipeline.batch_spec(config, _task(config), train=False).keys()
    assert eval_batches[-1]["mask"].sharding == sharding
    assert float(np.asarray(eval_batches[-1]["mask"]).sum()) == 2.0


# ================================================================================================
# Files: image folders, ArrayRecord, TFDS layout
# ================================================================================================

COLOURS = {"ant": (200, 30, 30), "bee": (30, 200, 30), "cat": (30, 30, 200),
           "dog": (120, 120, 120)}


def _write_image_folder(root, *, counts=None):
    """root/<split>/<class>/ with solid-colour PNG and JPEG files of assorted sizes."""
    counts = counts or {"train": 3, "eval": 2}
    for split, count in counts.items():
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (20 + 7 * i, 14 + 3 * i)
                image = Image.new("RGB", size, colour)
                if i % 2:
                    image.save(folder / f"{i}.JPG", quality=95)
                else:
                    # Grey images as 1-channel PNGs: decoding must still give RGB.
                    image.convert("L" if name == "dog" else "RGB").save(folder / f"{i}.png")
            (folder / "notes.txt").write_text("not an image")


def _denormalised_means(images):
    pixels = images * image_ops.IMAGENET_STD + image_ops.IMAGENET_MEAN
    return pixels.reshape(len(images), -1, 3).mean(axis=1)


def test_image_folder_source(tmp_path):
    _write_image_folder(tmp_path)
    config = _config(**{"data.source": "image_folder", "data.path": str(tmp_path),
                        "data.num_classes": 4, "data.augment": "crop_flip", "eval.batch_size": 4})
    pipeline.validate_data_config(config, _task(config))
    eval_batches = list(pipeline._local_eval_batches(config, _task(config), process_index=0, process_count=1))
    labels = np.concatenate([b["label"] for b in eval_batches])
    masks = np.concatenate([b["mask"] for b in eval_batches])
    assert labels[masks > 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # sorted names
    images = np.concatenate([b["image"] for b in eval_batches])[masks > 0]
    assert images.shape == (8, 8, 8, 3)
    means = _denormalised_means(images)
    for mean, label in zip(means, labels[masks > 0]):
        np.testing.assert_allclose(mean, COLOURS[sorted(COLOURS)[label]], atol=4)
    train = _iterator(config).next_local()
    assert train["image"].shape == (8, 8, 8, 3)
    # Random crops of a solid colour keep the colour: labels and pixels stay consistent.
    for mean, label in zip(_denormalised_means(train["image"]), train["label"]):
        np.testing.assert_allclose(mean, COLOURS[sorted(COLOURS)[label]], atol=4)


def _write_records(path, labels, *, side=6):
    encoded = []
    for label in labels:
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), (label * 40, 100, 50)).save(buffer, format="PNG")
        encoded.append(records.encode_example({"image": buffer.getvalue(), "label": label}))
    records.write_array_record(path, encoded)


def test_array_record_source_reads_tfds_style_examples(tmp_path):
    _write_records(tmp_path / "toy-train.array_record-00000-of-00002", [0, 1, 2])
    _write_records(tmp_path / "toy-train.array_record-00001-of-00002", [3, 0])
    _write_records(tmp_path / "toy-eval.array_record-00000-of-00001", [2, 1, 0])
    for path in (str(tmp_path), str(tmp_path / "toy-{split}.array_record-*")):
        config = _config(**{"data.source": "array_record", "data.path": path,
                            "eval.batch_size": 4})
        pipeline.validate_data_config(config, _task(config))
        train_source = sources.open_source(config, "train")
        assert [train_source[i]["label"] for i in range(len(train_source))] == [0, 1, 2, 3, 0]
        batches = list(pipeline._local_eval_batches(config, _task(config), process_index=0, process_count=1))
        assert [b["label"].tolist() for b in batches] == [[2, 1, 0, 0]]
        assert batches[0]["mask"].tolist() == [1, 1, 1, 0]
        red = _denormalised_means(batches[0]["image"][:3])[:, 0]
        np.testing.assert_allclose(red, [80, 40, 0], atol=1)


def test_tfds_layout_picks_the_highest_version(tmp_path):
    for version, label in (("1.0.0", 0), ("1.10.0", 3), ("1.9.2", 1)):
        folder = tmp_path / "toy" / version
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            _write_records(folder / f"toy-{split}.array_record-00000-of-00001", [label] * 2)
    (tmp_path / "toy" / "downloads").mkdir()
    config = _config(**{"data.source": "tfds", "data.path": str(tmp_path), "data.name": "toy",
                        "data.eval_split": "test"})
    pipeline.validate_data_config(config, _task(config))
    assert sources.open_source(config, "test")[0]["label"] == 3  # 1.10.0 > 1.9.2 > 1.0.0
    config.data.name = "toy:1.9.2"
    assert sources.open_source(config, "train")[1]["label"] == 1


# ================================================================================================
# Errors before any work
# ================================================================================================

def _error_cases(tmp_path):
    _write_image_folder(tmp_path / "folders", counts={"train": 1})
    (tmp_path / "folders" / "eval" / "ant").mkdir(parents=True)
    (tmp_path / "records").mkdir()
    (tmp_path / "tfds" / "toy" / "2.0.0").mkdir(parents=True)
    missing = str(tmp_path / "missing")
    return [
            ({"data.source": "imagenet"}, "config.data.source='imagenet'"),
            ({"data.augment": "mixup"}, "config.data.augment='mixup'"),
            ({"task": "segmentation"}, "config.task='segmentation'"),
            ({"data.num_train_examples": 0}, "config.data.num_train_examples=0"),
            ({"data.worker_count": -1}, "config.data.worker_count=-1"),
            ({"data.source": "image_folder", "data.path": ""}, "config.data.path=''"),
            ({"data.source": "image_folder", "data.path": missing},
             f"config.data.path='{missing}' does not exist"),
            ({"data.source": "image_folder", "data.path": str(tmp_path / "records")},
             "no split folder 'train'"),
            ({"data.source": "image_folder", "data.path": str(tmp_path / "folders"),
              "data.num_classes": 4}, "/eval/ant has no"),
            ({"data.source": "array_record", "data.path": str(tmp_path / "records")},
             "has no *train.array_record* files"),
            ({"data.source": "array_record", "data.path": missing + "/x-*"},
             "neither a directory nor a file glob containing '{split}'"),
            ({"data.source": "array_record", "data.path": missing + "/x-{split}*"},
             "matches no files for split 'train'"),
            ({"data.source": "tfds", "data.path": str(tmp_path / "tfds"), "data.name": "other"},
             "datasets in config.data.path"),
            ({"data.source": "tfds", "data.path": str(tmp_path / "tfds"), "data.name": "toy"},
             "no toy-train.array_record-* shards"),
            ({"data.source": "tfds", "data.path": str(tmp_path / "tfds"),
              "data.name": "toy:1.0.0"}, "versions there: ['2.0.0']"),
    ]


def test_bad_data_configs_raise_a_clear_value_error(tmp_path):
    for changes, message in _error_cases(tmp_path):
        with pytest.raises(ValueError) as info:
            _validate(_config(**changes))
        assert message in str(info.value), (changes, str(info.value))


def test_image_folder_class_count_must_match(tmp_path):
    _write_image_folder(tmp_path)
    config = _config(**{"data.source": "image_folder", "data.path": str(tmp_path),
                        "data.num_classes": 3})
    with pytest.raises(ValueError, match="num_classes=3 but .* has 4 class folders"):
        pipeline.validate_data_config(config, _task(config))


def test_out_of_range_labels_and_undecodable_images_name_the_example(tmp_path):
    _write_records(tmp_path / "a-train.array_record", [0, 9])
    config = _config(**{"data.source": "array_record", "data.path": str(tmp_path)})
    source = sources.open_source(config, "train")
    prepare = _task(config).make_preparer(config)
    with pytest.raises(ValueError, match=r"record 1: label 9 is outside \[0, "
                                         r"config.data.num_classes=4\)"):
        prepare(source[1], None)
    with pytest.raises(ValueError, match="x.png: cannot decode image"):
        prepare({"image": b"not a png", "label": 0, "origin": "x.png"}, None)


def test_random_resized_crop_stays_inside_the_image_with_valid_ratios():
    rng = np.random.default_rng(0)
    for height, width in ((40, 60), (10, 200), (32, 32)):
        for _ in range(50):
            left, top, right, bottom = image_ops.random_resized_box(height, width, rng)
            assert 0 <= left < right <= width and 0 <= top < bottom <= height
            ratio = (right - left) / (bottom - top)
            assert 0.7 < ratio < 1.4, (height, width, ratio)


def test_extension_table_and_batch_spec():
    config = _config()
    spec = pipeline.batch_spec(config, _task(config), train=False)
    # The lookup imported the task modules, which registered their tasks (each with its data).
    assert set(tasks.list_tasks()) == {"classification", "language_modeling", "image_diffusion",
                                     "novel_view_synthesis", "masked_image_modeling"}
    assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {
            "image": ((4, 8, 8, 3), np.float32), "label": ((4,), np.int32),
            "mask": ((4,), np.float32)}
