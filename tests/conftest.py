"""Test set-up shared by the suite: 8 fake CPU devices for mesh/sharding tests.

XLA reads the flag once, when the backend starts, so it is set here before anything imports jax.
"""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs reads this when imported: without it, its first call per bucket waits for a gRPC
# time-out against the local GCS emulator (tests/gcs_emulator.py).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Shared helpers (tests/cli_runs.py, tests/training/training_helpers.py) import by bare name from
# any test folder.
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

for _folder in (Path(__file__).parent, Path(__file__).parent / "training"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, request) -> Path:
    """A directory shared by all pytest-xdist workers of this session (the plain session
    directory without xdist), so the reference run and the compilation cache are made once
    whichever worker gets which test."""
    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        return tmp_path_factory.mktemp("train_cli_shared")
    return tmp_path_factory.getbasetemp().parent


@pytest.fixture(scope="session")
def run_env(shared_dir):
    """Environment of a train.py/eval.py process: `devices` fake CPU devices and the
    session's persistent compilation cache."""
    cache = shared_dir / "jax_cache"

    def env(devices: int = 8) -> dict:
        values = dict(os.environ)
        values.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                      JAX_COMPILATION_CACHE_DIR=str(cache),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        return values

    return env


@pytest.fixture(scope="session")
def reference_run(shared_dir, run_env):
    """The uninterrupted run of tests/cli_runs.py: (workdir, its stdout, its stderr), made
    once per session whichever xdist worker asks first."""
    import cli_runs

    workdir = shared_dir / "reference_run"
    record = shared_dir / "reference_run.json"
    with cli_runs.exclusive(shared_dir / "reference_run.lock"):
        if not record.exists():
            result = cli_runs.run(cli_runs.train_command(workdir,
                                                         "--config.logging.tensorboard=True"),
                                  run_env())
            record.write_text(json.dumps({"returncode": result.returncode,
                                          "stdout": result.stdout, "stderr": result.stderr}))
    outcome = json.loads(record.read_text())
    assert outcome["returncode"] == 0, outcome["stderr"][-5000:]
    return workdir, outcome["stdout"], outcome["stderr"]


@pytest.fixture(scope="session")
def gcs_emulator():
    """The environment (a dict of variables) that sends gcsfs and tensorstore to this worker's
    local GCS emulator (tests/gcs_emulator.py), which holds the bucket `zoo-test`."""
    import gcs_emulator

    server, url = gcs_emulator.start("zoo-test")
    environment = gcs_emulator.environment(url)
    environment["_server"] = server
    yield environment
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch) -> str:
    """gs://zoo-test, emptied, with this process's gcsfs/tensorstore pointed at the emulator;
    a subprocess gets the same through `gcs_env(environment)`."""
    import fsspec

    gcs_emulator["_server"].wipe(keep_buckets=True)
    for name, value in gcs_env({}, gcs_emulator).items():
        monkeypatch.setenv(name, value)
    fsspec.AbstractFileSystem.clear_instance_cache()  # none may point at an older endpoint
    return "gs://zoo-test"


def gcs_env(environment: dict, emulator: dict) -> dict:
    """`environment` plus the emulator's variables (for a subprocess)."""
    return {**environment, **{k: v for k, v in emulator.items() if not k.startswith("_")}}
