"""Data sets in a bucket (the local GCS emulator): image folders, token files, multi-view
folders, ArrayRecord shards and the TFDS layout read through the sources the training pipeline
uses give the same examples as the same files on a local disk; a bucket folder is listed once
per run (zoo/training/sources.py `cached_listing`, cache in <workdir>/data_listing/)."""
from __future__ import annotations

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from configs import common
from training_helpers import apply_changes
from zoo import storage
from zoo.tasks import language_modeling as lm
from zoo.tasks import novel_view_synthesis as multiview
from zoo.training import pipeline, records, sources, tasks

COLOURS = {"ant": (200, 30, 30), "bee": (30, 200, 30), "cat": (30, 30, 200)}


@pytest.fixture(autouse=True)
def fresh_listings(monkeypatch):
    """No listing remembered from another test (the bucket is emptied between tests) and no
    listing cache unless a test sets one."""
    monkeypatch.setattr(sources, "_bucket_listings", {})
    monkeypatch.setattr(sources, "_listing_cache_dir", None)


def _image_config(path, **changes):
    c = common.base_config()
    c.data.source = "image_folder"
    c.data.path = str(path)
    c.data.image_size = 8
    c.data.num_classes = len(COLOURS)
    c.batch_size = 4
    c.eval.batch_size = 4
    return apply_changes(c, changes)


def _write_image_folder(root) -> None:
    """root/<split>/<class>/ with PNG and JPEG files, a nested folder and a non-image file."""
    for split, count in (("train", 3), ("eval", 2)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            (folder / "more").mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", (10 + 3 * i, 8 + i), colour)
                image.save(folder / (f"{i}.JPG" if i % 2 else f"{i}.png"))
            Image.new("RGB", (9, 9), colour).save(folder / "more" / "z.png")
            (folder / "notes.txt").write_text("not an image")


def _relative(files, root):
    return [f[len(str(root)):].lstrip("/") for f in files]


def _assert_same_image_sources(local, remote, local_root, remote_root):
    assert len(local) == len(remote)
    assert remote.labels == local.labels
    assert _relative(remote.files, remote_root) == _relative(local.files, local_root)
    for i in range(len(local)):
        assert remote[i]["image"] == local[i]["image"]
        assert remote[i]["origin"].startswith("gs://")


def test_image_folder_from_a_bucket_equals_the_local_folder(gcs_bucket, tmp_path):
    _write_image_folder(tmp_path / "images")
    remote_root = f"{gcs_bucket}/images"
    storage.upload_tree(tmp_path / "images", remote_root)
    local_config = _image_config(tmp_path / "images")
    remote_config = _image_config(remote_root)
    task = tasks.get_task(remote_config)
    pipeline.validate_data_config(remote_config, task, process_count=1)
    for split in ("train", "eval"):
        _assert_same_image_sources(sources.open_source(local_config, split),
                                   sources.open_source(remote_config, split),
                                   tmp_path / "images", remote_root)
    assert len(sources.open_source(remote_config, "train")) == 3 * (3 + 1)  # + more/z.png
    # Decoded and batched by the pipeline: the same arrays.
    local_batches, remote_batches = (
            list(pipeline._local_eval_batches(config, task, process_index=0, process_count=1))
            for config in (local_config, remote_config))
    for a, b in zip(local_batches, remote_batches, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_missing_bucket_folders_name_the_path(gcs_bucket, tmp_path):
    _write_image_folder(tmp_path / "images")
    storage.upload_tree(tmp_path / "images" / "train", f"{gcs_bucket}/only_train/train")
    with pytest.raises(ValueError, match=f"config.data.path='{gcs_bucket}/missing' does not "
                                         f"exist"):
        sources.open_source(_image_config(f"{gcs_bucket}/missing"), "train")
    with pytest.raises(ValueError, match=r"no split folder 'eval' .* folders there: \['train'\]"):
        sources.open_source(_image_config(f"{gcs_bucket}/only_train"), "train")


def test_a_bucket_folder_is_listed_once_and_the_listing_cached_in_the_workdir(
        gcs_bucket, tmp_path, monkeypatch):
    _write_image_folder(tmp_path / "images")
    remote_root = f"{gcs_bucket}/images"
    storage.upload_tree(tmp_path / "images", remote_root)
    config = _image_config(remote_root)
    workdir = f"{gcs_bucket}/run"
    sources.set_listing_cache(workdir)
    walked = []
    walk = sources._bucket_image_files
    monkeypatch.setattr(sources, "_bucket_image_files",
                        lambda folder: walked.append(folder) or walk(folder))
    first = {split: sources.open_source(config, split) for split in ("train", "eval")}
    assert len(walked) == 2 * len(COLOURS)  # every class folder of both splits, once
    cached = storage.glob(storage.join(workdir, sources.LISTING_CACHE_FOLDER, "*.json"))
    assert len(cached) == 2 and all("image_folder-" in path for path in cached)
    # The same process (every eval rebuilds its pipeline): no new walk.
    sources.open_source(config, "train")
    assert len(walked) == 2 * len(COLOURS)

    # A restarted run (nothing in memory) reads the listing from the workdir.
    monkeypatch.setattr(sources, "_bucket_listings", {})

    def no_walk(folder):
        raise AssertionError(f"{folder} was listed again")

    monkeypatch.setattr(sources, "_bucket_image_files", no_walk)
    for split, source in first.items():
        again = sources.open_source(config, split)
        assert again.files == source.files and again.labels == source.labels

    # A class added to the bucket changes the fingerprint: that split is listed again.
    monkeypatch.setattr(sources, "_bucket_listings", {})
    monkeypatch.setattr(sources, "_bucket_image_files", walk)
    storage.write_bytes(f"{remote_root}/train/dog/0.png", storage.read_bytes(first["train"]
                                                                              .files[0]))
    grown = sources.open_source(_image_config(remote_root, **{"data.num_classes": 4}), "train")
    assert len(grown) == len(first["train"]) + 1 and grown.labels[-1] == 3

    # Local folders keep their in-memory listing: nothing is written to the workdir for them.
    before = storage.glob(storage.join(workdir, sources.LISTING_CACHE_FOLDER, "*.json"))
    sources.open_source(_image_config(tmp_path / "images"), "train")
    assert storage.glob(storage.join(workdir, sources.LISTING_CACHE_FOLDER, "*.json")) == before


def _lm_config(path, **changes):
    c = common.base_config("language_modeling")
    c.data.source = "token_files"
    c.data.path = str(path)
    c.lm.seq_len = 16
    c.lm.vocab_size = 1000
    return apply_changes(c, changes)


def test_token_files_from_a_bucket_equal_the_local_files(gcs_bucket, tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 500), ("eval", 100)):
        tokens = rng.integers(0, 1000, count)
        lm.write_token_file(str(tmp_path / f"{split}.bin"), tokens)
        lm.write_token_file(f"{gcs_bucket}/tokens/{split}.bin", tokens)
    local_config = _lm_config(tmp_path)
    remote_config = _lm_config(f"{gcs_bucket}/tokens")
    pipeline.validate_data_config(remote_config, tasks.get_task(remote_config), process_count=1)
    for split in ("train", "eval"):
        local, remote = lm.open_split(local_config, split), lm.open_split(remote_config, split)
        assert isinstance(local.stream, np.memmap)  # local files stay memory-mapped
        assert isinstance(remote.stream, lm.BucketTokens)
        assert len(local) == len(remote)
        expected = [local[i]["tokens"] for i in range(len(local))]
        for i, window in enumerate(expected):
            np.testing.assert_array_equal(remote[i]["tokens"], window)
        # Several reader threads, and a copy pickled for a grain worker process.
        copy = pickle.loads(pickle.dumps(remote))
        with ThreadPoolExecutor(4) as pool:
            read = list(pool.map(lambda i: copy[i]["tokens"], range(len(copy))))
        for window, expect in zip(read, expected, strict=True):
            np.testing.assert_array_equal(window, expect)
    storage.write_bytes(f"{gcs_bucket}/odd/train.bin", b"\x01\x02\x03")
    with pytest.raises(ValueError, match="odd/train.bin has 3 bytes, not a multiple of"):
        lm.open_split(_lm_config(f"{gcs_bucket}/odd"), "train")
    with pytest.raises(ValueError, match=f"token file {gcs_bucket}/none/train.bin for split "
                                         f"'train' does not exist"):
        lm.open_split(_lm_config(f"{gcs_bucket}/none"), "train")


def _views_config(path):
    c = common.base_config("novel_view_synthesis")
    c.data.source = "multiview_folder"
    c.data.path = str(path)
    c.data.image_size = 12
    c.data.image_width = 10
    c.views.target_views = 1
    c.views.rays_per_view = 4
    return c


def test_multiview_folder_from_a_bucket_equals_the_local_folder(gcs_bucket, tmp_path,
                                                                monkeypatch):
    scenes = multiview.generate_scenes(2, 3, 12, 10, seed=3)
    multiview.write_multiview_dataset(str(tmp_path), "train", scenes)
    multiview.write_multiview_dataset(f"{gcs_bucket}/views", "train", scenes)
    storage.write_text(f"{gcs_bucket}/views/train/not_a_scene/readme.txt", "no transforms.json")
    (tmp_path / "train" / "not_a_scene").mkdir()
    local = multiview.open_split(_views_config(tmp_path), "train")
    sources.set_listing_cache(str(tmp_path / "run"))
    remote = multiview.open_split(_views_config(f"{gcs_bucket}/views"), "train")
    assert [os.path.basename(f) for f in local.folders] == ["scene_0000", "scene_0001"]
    assert remote.folders == [f"{gcs_bucket}/views/train/scene_0000",
                              f"{gcs_bucket}/views/train/scene_0001"]
    for i in range(len(local)):
        a, b = local[i], remote[i]
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(remote[1]["images"], scenes[1]["images"])
    # Listed once: a restart finds the listing in the (local) workdir.
    assert len(os.listdir(tmp_path / "run" / sources.LISTING_CACHE_FOLDER)) == 1
    monkeypatch.setattr(sources, "_bucket_listings", {})
    monkeypatch.setattr(storage, "isfile", lambda path: pytest.fail(f"checked {path} again"))
    assert multiview.open_split(_views_config(f"{gcs_bucket}/views"), "train").folders \
        == remote.folders


def _write_records(path, labels):
    encoded = []
    for label in labels:
        buffer = io.BytesIO()
        Image.new("RGB", (6, 6), (label * 40, 100, 50)).save(buffer, format="PNG")
        encoded.append(records.encode_example({"image": buffer.getvalue(), "label": label}))
    records.write_array_record(path, encoded)


def test_array_record_shards_and_the_tfds_layout_from_a_bucket(gcs_bucket, tmp_path,
                                                               monkeypatch):
    # array_record reads gs:// itself (google-cloud-cpp); this sends it to the emulator.
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", os.environ["STORAGE_EMULATOR_HOST"])
    folder = tmp_path / "tfds" / "toy" / "1.0.0"
    folder.mkdir(parents=True)
    _write_records(folder / "toy-train.array_record-00000-of-00002", [0, 1, 2])
    _write_records(folder / "toy-train.array_record-00001-of-00002", [3, 0])
    _write_records(folder / "toy-eval.array_record-00000-of-00001", [2, 1])
    storage.upload_tree(tmp_path / "tfds", f"{gcs_bucket}/tfds")
    shards = f"{gcs_bucket}/tfds/toy/1.0.0"
    cases = [({"data.source": "array_record", "data.path": str(folder)},
              {"data.source": "array_record", "data.path": shards}),
             ({"data.source": "array_record", "data.path": str(folder / "toy-{split}.arr*")},
              {"data.source": "array_record", "data.path": shards + "/toy-{split}.arr*"}),
             ({"data.source": "tfds", "data.path": str(tmp_path / "tfds"), "data.name": "toy"},
              {"data.source": "tfds", "data.path": f"{gcs_bucket}/tfds", "data.name": "toy"})]
    for local_changes, remote_changes in cases:
        local_config = _image_config("", **local_changes, **{"data.num_classes": 4})
        remote_config = _image_config("", **remote_changes, **{"data.num_classes": 4})
        pipeline.validate_data_config(remote_config, tasks.get_task(remote_config),
                                      process_count=1)
        for split in ("train", "eval"):
            local = sources.open_source(local_config, split)
            remote = sources.open_source(remote_config, split)
            assert remote.paths == [p.replace(str(folder), shards) for p in local.paths]
            assert [remote[i] for i in range(len(remote))] == \
                [local[i] for i in range(len(local))]
    with pytest.raises(ValueError, match=f"directory {gcs_bucket}/tfds has no "
                                         r"\*train.array_record\* files"):
        sources.open_source(_image_config(f"{gcs_bucket}/tfds", **{"data.source":
                                                                   "array_record"}), "train")
    with pytest.raises(ValueError, match=r"datasets in config.data.path='gs://zoo-test/tfds': "
                                         r"\['toy'\]"):
        sources.open_source(_image_config(f"{gcs_bucket}/tfds", **{
                "data.source": "tfds", "data.name": "other"}), "train")
