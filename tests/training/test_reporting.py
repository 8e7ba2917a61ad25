"""Run reporting: the MFU peak table and its printed denominator, the model summary, the
metrics.jsonl resume truncation, and the multi-host start-up argument check."""
from __future__ import annotations

import json
import re

import pytest
from flax import nnx

import zoo
from training_helpers import tiny_config
from zoo.training import mesh as mesh_lib
from zoo.training import reporting, state as state_lib, tasks


@pytest.mark.parametrize("kind, name, peak", [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM", 989e12),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", "NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312e12),
        ("TPU v4", "TPU v4", 275e12),
        ("TPU v5 lite", "TPU v5e", 197e12),
        ("TPU v5p", "TPU v5p", 459e12),
        ("TPU v6 lite", "TPU v6e", 918e12),
])
def test_peak_table(kind, name, peak):
    assert reporting.device_peak_flops(kind) == (name, peak)


def test_throughput_line_prints_mfu_with_its_denominator():
    line = reporting.throughput_line(4.945e12, 0.01, "NVIDIA H100 80GB HBM3")
    assert line == ("494.5 TFLOP/s/device, MFU 50.00% of NVIDIA H100 SXM peak 989 TFLOP/s "
                    "(bf16 dense)")
    cpu = reporting.throughput_line(2e9, 0.5, "cpu")
    assert cpu.startswith("0.004 TFLOP/s/device, MFU n/a (no peak FLOP/s known for device kind")
    assert "n/a" in reporting.throughput_line(None, 0.5, "cpu")


def test_model_summary_counts_match_the_registry():
    config = tiny_config()
    skeleton = state_lib.ModelSkeleton(config)
    text = reporting.model_summary(skeleton.abstract_state, "vit_ti16")
    expected = zoo.count_params(nnx.eval_shape(lambda: zoo.create_model(
            "vit_ti16", rngs=nnx.Rngs(0), **dict(config.model.overrides))))
    assert re.search(rf"\n  total +{expected:,}$", text), text
    for module in ("blocks", "head", "patch_embed", "pos_embed", "cls_token"):
        assert f"  {module}" in text
    io = reporting.io_summary(skeleton, tasks.get_task(config).input_spec(4))
    assert io == "  inputs image float32[4, 16, 16, 3] -> outputs float32[4, 10]"


def test_metrics_after_the_restored_step_are_dropped_on_resume(tmp_path):
    writer = reporting.MetricWriter(str(tmp_path), tensorboard=False, progress_bar=False,
                                    total_steps=10, initial_step=0)
    for step in (2, 4, 6):
        writer.write(step, {"train/loss": float(step)})
    writer.write(4, {"eval/top1": 0.5})
    writer.close()
    resumed = reporting.MetricWriter(str(tmp_path), tensorboard=False, progress_bar=False,
                                     total_steps=10, initial_step=4)
    resumed.write(6, {"train/loss": 6.5})
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 2, "train/loss": 2.0}, {"step": 4, "train/loss": 4.0},
                       {"step": 4, "eval/top1": 0.5}, {"step": 6, "train/loss": 6.5}]


def _tensorboard_events(directory) -> list:
    """Every Event record of the tensorboardX files in `directory` (TFRecord framing: 8-byte
    length, 4-byte crc, payload, 4-byte crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12:offset + 12 + length])
            events.append(event)
            offset += 12 + length + 4
    return events


def test_tensorboard_hides_steps_after_the_restored_checkpoint_on_resume(tmp_path):
    from tensorboardX.proto.event_pb2 import SessionLog

    writer = reporting.MetricWriter(str(tmp_path), tensorboard=True, progress_bar=False,
                                    total_steps=10, initial_step=0)
    writer.write(2, {"train/loss": 2.0})
    writer.close()
    first = _tensorboard_events(tmp_path / "tensorboard")
    assert not any(e.HasField("session_log") for e in first)
    resumed = reporting.MetricWriter(str(tmp_path), tensorboard=True, progress_bar=False,
                                     total_steps=10, initial_step=4)
    resumed.close()
    purges = [e for e in _tensorboard_events(tmp_path / "tensorboard")
              if e.HasField("session_log")]
    # TensorBoard drops earlier events with step >= this START's step: the metrics of step 4
    # (saved with the checkpoint) stay, anything a crashed run logged after it goes.
    assert [(e.session_log.status, e.step) for e in purges] == [(SessionLog.START, 5)]


def test_distributed_flags_must_come_together(monkeypatch):
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "ZOO_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="must be given together"):
        mesh_lib.initialize_distributed(coordinator_address="localhost:1234")
    # Nothing given and no cluster environment: a single-process run, nothing initialised.
    assert mesh_lib.initialize_distributed() is False
    assert not mesh_lib._cluster_detected()
    # The TPU-VM recipe's opt-in (the worker list is in VM metadata, not the environment).
    monkeypatch.setenv("ZOO_DISTRIBUTED", "1")
    assert mesh_lib._cluster_detected()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
    monkeypatch.setenv("ZOO_DISTRIBUTED", "0")
    assert mesh_lib._cluster_detected()
