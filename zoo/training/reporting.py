"""What a run tells its user: the model summary, FLOPs and MFU, and the metric stream
(metrics.jsonl, TensorBoard, a tqdm progress bar).

Only process 0 writes. metrics.jsonl holds one JSON object per log step and per evaluation;
on resume, entries after the restored step are dropped so that the file reads as one
uninterrupted run.

In a bucket (`gs://...` workdir, zoo/storage.py) objects cannot be appended to: metrics.jsonl is
kept in memory and the object rewritten at every write (it holds one line per log step, small
next to a checkpoint), and TensorBoard's event files are written by `_BucketEventFile`, which
rewrites its object at every flush and continues in a new part file (".0001", ...; TensorBoard
reads every events file of the directory, in name order) past PART_BYTES.

FLOPs come from the compiled step's own cost analysis (XLA counts the partitioned program, i.e.
FLOPs per device), and MFU is reported against a small table of peak dense bf16 FLOP/s, printed
with its denominator so nobody has to guess which peak was used.
"""
from __future__ import annotations

import json
import logging as std_logging
import math
from typing import Any, Mapping

import jax
from absl import logging
from flax import nnx

from zoo import storage

# Peak dense bf16 FLOP/s per device (vendor data sheets). Matched as substrings of the
# lower-cased `device_kind`, first match wins, so more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, str, float], ...] = (
        ("h100 pcie", "NVIDIA H100 PCIe", 756e12),
        ("h100", "NVIDIA H100 SXM", 989e12),
        ("h200", "NVIDIA H200", 989e12),
        ("a100", "NVIDIA A100", 312e12),
        ("tpu v4", "TPU v4", 275e12),
        ("tpu v5 lite", "TPU v5e", 197e12),
        ("tpu v5e", "TPU v5e", 197e12),
        ("tpu v5p", "TPU v5p", 459e12),
        ("tpu v5", "TPU v5p", 459e12),
        ("tpu v6 lite", "TPU v6e", 918e12),
        ("tpu v6e", "TPU v6e", 918e12),
)


def device_peak_flops(device_kind: str) -> tuple[str, float] | None:
    """(table name, peak bf16 FLOP/s) for a device kind, or None when it is not in the table."""
    kind = device_kind.lower()
    for pattern, name, peak in PEAK_BF16_FLOPS:
        if pattern in kind:
            return name, peak
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs per device of one call of a compiled function (None if XLA does not say)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (some backends do not implement cost analysis)
        return None
    if isinstance(analysis, (list, tuple)):  # older jax returned one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def throughput_line(flops_per_device: float | None, seconds_per_step: float,
                    device_kind: str) -> str:
    """"x TFLOP/s/device, MFU y% of <device> peak z TFLOP/s (bf16 dense)" or why not."""
    if flops_per_device is None or seconds_per_step <= 0:
        return "TFLOP/s/device n/a (no FLOP count from the compiler)"
    achieved = flops_per_device / seconds_per_step
    text = f"{achieved / 1e12:.4g} TFLOP/s/device"
    peak = device_peak_flops(device_kind)
    if peak is None:
        return text + f", MFU n/a (no peak FLOP/s known for device kind {device_kind!r})"
    name, value = peak
    return text + (f", MFU {100 * achieved / value:.2f}% of {name} peak "
                   f"{value / 1e12:.0f} TFLOP/s (bf16 dense)")


def model_summary(model_state_abstract: nnx.State, model_name: str) -> str:
    """Parameter counts per top-level module and in total (plus non-trainable variables)."""
    per_module: dict[str, int] = {}
    other = 0
    for path, variable in nnx.to_flat_state(model_state_abstract):
        size = math.prod(variable.shape)
        if isinstance(variable, nnx.Param):
            top = str(path[0])
            per_module[top] = per_module.get(top, 0) + size
        else:
            other += size
    total = sum(per_module.values())
    width = max([len(k) for k in per_module] + [len("total")])
    lines = [f"model {model_name}: trainable parameters per top-level module"]
    lines += [f"  {name:<{width}}  {count:>14,}" for name, count in per_module.items()]
    lines.append(f"  {'total':<{width}}  {total:>14,}")
    if other:
        lines.append(f"  (+ {other:,} non-trainable state values, e.g. batch statistics)")
    return "\n".join(lines)


class _DropLibraryInfo(std_logging.Filter):
    """Drops INFO records logged from inside orbax (a dozen lines per checkpoint save)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def quiet_library_logs() -> None:
    """Keeps the run's own INFO lines readable; orbax warnings and errors still show."""
    logging.get_absl_handler().addFilter(_DropLibraryInfo())


def _describe(shape_dtype) -> str:
    return f"{jax.numpy.dtype(shape_dtype.dtype).name}{list(shape_dtype.shape)}"


def io_summary(skeleton, input_spec: Mapping[str, jax.ShapeDtypeStruct]) -> str:
    """"inputs image float32[64, 32, 32, 3] -> outputs float32[64, 10]", traced abstractly
    (the task's input spec, passed positionally in its order)."""

    def forward(model_state, *inputs):
        return skeleton.build(model_state)(*inputs)

    outputs = jax.eval_shape(forward, skeleton.abstract_pure(), *input_spec.values())
    shown_in = ", ".join(f"{name} {_describe(s)}" for name, s in input_spec.items())
    shown_out = ", ".join(_describe(s) for s in jax.tree.leaves(outputs))
    return f"  inputs {shown_in} -> outputs {shown_out}"


def _scalar(value: Any) -> Any:
    value = jax.device_get(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


PART_BYTES = 8 << 20


class _BucketEventFile:
    """A TensorBoard event file in a bucket: what tensorboardX writes is kept, and each flush
    rewrites the object (buckets cannot append); past PART_BYTES it goes on in a new part."""

    def __init__(self, path: str):
        self.path, self._part, self._buffer = path, 0, bytearray()

    def _object(self) -> str:
        return self.path if self._part == 0 else f"{self.path}.{self._part:04d}"

    def write(self, data: bytes) -> None:
        self._buffer += data

    def flush(self) -> None:
        if self._buffer:
            storage.write_bytes(self._object(), bytes(self._buffer))
        if len(self._buffer) > PART_BYTES:
            self._part, self._buffer = self._part + 1, bytearray()

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    """tensorboardX writer factory for URLs (its own GCS writer needs google-cloud-storage
    credentials and fails half-built without them)."""

    def open(self, path: str) -> _BucketEventFile:
        return _BucketEventFile(path)

    def directory_check(self, path: str) -> None:
        storage.makedirs(path)


def _tensorboard_writer(logdir: str, **kwargs):
    from tensorboardX import SummaryWriter
    if storage.is_remote(logdir):
        from tensorboardX import record_writer
        record_writer.register_writer_factory(logdir.split("://")[0], _BucketEventFiles())
    return SummaryWriter(logdir, **kwargs)


class MetricWriter:
    """metrics.jsonl + optional TensorBoard + optional tqdm bar, on process 0 only."""

    def __init__(self, workdir: str, *, tensorboard: bool, progress_bar: bool,
                 total_steps: int, initial_step: int):
        self.enabled = jax.process_index() == 0
        self.path = storage.join(workdir, "metrics.jsonl")
        # A bucket's metrics.jsonl is rewritten whole from these lines (module docstring).
        self._lines: list[str] | None = [] if storage.is_remote(workdir) else None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        storage.makedirs(workdir)
        self._truncate_after(initial_step)
        if tensorboard:
            # On resume, TensorBoard hides the events a crashed run wrote after the restored
            # checkpoint (a START session log with purge_step), just as metrics.jsonl drops them:
            # otherwise the redone steps would draw a second, overlapping curve.
            purge = {"purge_step": initial_step + 1} if initial_step > 0 else {}
            self._tb = _tensorboard_writer(storage.join(workdir, "tensorboard"), **purge)
        if progress_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                             dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Drops entries newer than `step` (written before a crash, redone after resume)."""
        if not storage.exists(self.path):
            return
        lines = [line + "\n" for line in storage.read_text(self.path).splitlines()
                 if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if self._lines is not None:
            self._lines = kept
        if len(kept) != len(lines):
            storage.write_text(self.path, "".join(kept))

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Logs scalars under their names (e.g. "train/loss", "eval/top1") for `step`."""
        record = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        if self._lines is None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self._lines.append(json.dumps(record) + "\n")
            storage.write_text(self.path, "".join(self._lines))
        if self._tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, float):
                    self._tb.add_scalar(name, value, int(step))
            self._tb.flush()
        return record

    def advance(self, steps: int = 1, postfix: Mapping[str, str] | None = None) -> None:
        if self._bar is not None:
            if postfix is not None:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
