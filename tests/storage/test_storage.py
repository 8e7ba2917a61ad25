"""zoo.storage on a local disk and in a bucket of the local GCS emulator: the same calls,
the same answers."""
import pytest

from zoo import storage


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs_bucket") + "/root"


def test_files_and_directories(root):
    assert not storage.exists(root)
    storage.makedirs(storage.join(root, "a", "b"))
    storage.write_text(storage.join(root, "a", "x.json"), '{"v": 1}\n')
    storage.write_bytes(storage.join(root, "a", "b", "y.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "a", "x.json"), '{"v": 2}\n')  # replaced whole
    assert storage.read_text(storage.join(root, "a", "x.json")) == '{"v": 2}\n'
    assert storage.read_bytes(storage.join(root, "a", "b", "y.bin")) == b"\x00\x01"
    assert storage.getsize(storage.join(root, "a", "b", "y.bin")) == 2
    assert storage.isdir(storage.join(root, "a")) and storage.isfile(storage.join(root, "a",
                                                                                  "x.json"))
    assert sorted(storage.listdir(storage.join(root, "a"))) == ["b", "x.json"]
    assert [storage.basename(p) for p in storage.glob(storage.join(root, "a", "*.json"))] \
        == ["x.json"]
    assert [storage.basename(p) for p in storage.glob(storage.join(root, "*", "b", "*.bin"))] \
        == ["y.bin"]
    storage.move(storage.join(root, "a", "b"), storage.join(root, "moved"))
    assert storage.read_bytes(storage.join(root, "moved", "y.bin")) == b"\x00\x01"
    assert not storage.exists(storage.join(root, "a", "b", "y.bin"))
    with storage.open(storage.join(root, "a", "x.json")) as f:
        assert f.read() == '{"v": 2}\n'
    with pytest.raises(ValueError, match="buckets cannot append"):
        with storage.open(storage.join(root, "a", "x.json"), "a"):
            pass
    storage.remove(storage.join(root, "a", "x.json"))
    storage.remove(storage.join(root, "a", "x.json"))  # missing: not an error
    storage.rmtree(root)
    assert not storage.exists(root)


def test_paths():
    assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
    assert storage.abspath("gs://b/run") == "gs://b/run"
    assert storage.dirname("gs://b/run/checkpoints/") == "gs://b/run"
    assert storage.is_remote("gs://b") and not storage.is_remote("/tmp/x")
