"""The training loop: one generic, sharded, resumable loop for every model and task.

`train_and_evaluate(config, workdir, profile_steps=...)` reads top to bottom (big_vision style):
config checks, mesh, model and optimizer, sharded state shapes, the train step compiled ahead of
time, data and restore-or-init (the checkpoint also holds the iterator's position), then the
loop with logging, evaluation, checkpoints and preemption. `train.py` is its command line; tests
and notebooks call it directly.

Run directory: checkpoints/ (orbax), metrics.jsonl, tensorboard/, config.json, profile/; a
local path or a bucket (`gs://...`, through zoo/storage.py; orbax writes there directly).
Where the wall time went (compile, data waits, checkpoint saves and restores, eval, and the
goodput: the fraction spent in train steps) is logged as `perf/goodput/...` on every train log
record and summarised at the end; zoo/training/goodput.py defines each figure.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from kernels_pallas.sharding import ShardingError
from zoo import storage
from zoo.training import checkpoint as ckpt_lib
from zoo.training import config as config_lib
from zoo.training import ema as ema_lib
from zoo.training import goodput as goodput_lib
from zoo.training import init_from
from zoo.training import mesh as mesh_lib
from zoo.training import optim as optim_lib
from zoo.training import pipeline, reporting, sources
from zoo.training import state as state_lib
from zoo.training import step as step_lib
from zoo.training import tasks, workdir_lock
from zoo.training.errors import CheckpointError, ConfigError


class TrainingDiverged(RuntimeError):
    """The loss or a norm became NaN/inf; the last good checkpoint is kept."""


def parse_profile_steps(text: str, from_config) -> tuple[int, int] | None:
    """--profile_steps "first,last" (or the config's pair when the flag is empty)."""
    if not text:
        return tuple(from_config) or None
    try:
        first, last = (int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--profile_steps={text!r} is invalid; allowed: 'first,last' (two "
                          f"integers)") from None
    if not 1 <= first <= last:
        raise ConfigError(f"--profile_steps={text!r} is invalid; allowed: 1 <= first <= last")
    return first, last


def _restore(checkpointer, state_target, train_iter, state_shardings, *,
             allow_restart_from_scratch: bool = False):
    """`checkpointer.restore_latest`, plus EMA switched on in a run whose checkpoints have
    none: the model is restored and the average starts from it (nothing is moved or lost
    when the first attempt fails: restore_latest only quarantines when an older step reads).

    When no checkpoint is readable the CheckpointError stands (the run refuses to overwrite
    them), unless `allow_restart_from_scratch`: then all are moved to the quarantine folder and
    None is returned (a fresh start)."""
    try:
        return _restore_with_ema_fallback(checkpointer, state_target, train_iter,
                                          state_shardings)
    except CheckpointError as error:
        if not allow_restart_from_scratch:
            raise CheckpointError(f"{error}; to start again from step 0, pass "
                                  f"--allow_restart_from_scratch (the checkpoints are then "
                                  f"moved to {checkpointer.quarantine_dir})") from error
        moved = checkpointer.quarantine_all()
        logging.warning("%s; --allow_restart_from_scratch: moved steps %s to %s and starting "
                        "from step 0", error, moved, checkpointer.quarantine_dir)
        return None


def _restore_with_ema_fallback(checkpointer, state_target, train_iter, state_shardings):
    try:
        return checkpointer.restore_latest(state_target, train_iter)
    except CheckpointError:
        if "ema" not in state_target:
            raise
        without = {k: v for k, v in state_target.items() if k != "ema"}
        try:
            restored = checkpointer.restore_latest(without, train_iter)
        except CheckpointError:
            restored = None  # not the EMA's fault: report the original error
        if restored is None:
            raise
        step, state = restored
        logging.warning("checkpoint at step %d has no EMA weights (config.ema was off); the "
                        "average starts from the restored model", step)
        ema = jax.jit(lambda model: jax.tree.map(jnp.copy, model),
                      out_shardings=state_shardings["ema"])(state["model"])
        return step, {**state, "ema": ema}


def train_and_evaluate(config, workdir: str, *, profile_steps: tuple[int, int] | None,
                       allow_restart_from_scratch: bool = False) -> None:
    """Trains `config` in `workdir` (resuming from its latest readable checkpoint), evaluating
    and checkpointing as the config says. Raises ConfigError before any compilation for a
    config it cannot run, CheckpointError when the workdir has checkpoints and none can be
    restored (unless `allow_restart_from_scratch`, which moves them aside and starts over),
    TrainingDiverged when the loss or a norm becomes NaN/inf. A second run on a workdir that a
    live run owns is a ConfigError (zoo/training/workdir_lock.py)."""
    goodput = goodput_lib.GoodputRecorder()  # the run's wall clock starts here
    # Listings of bucket data folders are kept in the run directory, for restarts; set before
    # the config checks, which already list the data.
    sources.set_listing_cache(workdir)
    # ------------------------------------------------------------------------------------------
    # Config checks: every mistake is one line, before any compilation.
    # ------------------------------------------------------------------------------------------
    config_lib.validate_config(config, num_devices=jax.device_count(),
                               num_processes=jax.process_count())
    with workdir_lock.hold(workdir):
        _train_and_evaluate(config, workdir, profile_steps=profile_steps,
                            allow_restart_from_scratch=allow_restart_from_scratch,
                            goodput=goodput)


class _Profile:
    """jax.profiler traces into `directory`. The profiler writes files itself, to local paths
    only: for a bucket the trace goes to a temporary local folder, copied up and deleted when
    the trace stops (the one local write of a run with a bucket workdir, and only on request)."""

    def __init__(self, directory: str):
        self.directory = directory
        self._local: str | None = None

    def start(self) -> None:
        if storage.is_remote(self.directory):
            self._local = tempfile.mkdtemp(prefix="zoo-profile-")
        jax.profiler.start_trace(self._local or self.directory)

    def stop(self) -> None:
        jax.profiler.stop_trace()
        if self._local is not None:
            try:
                storage.upload_tree(self._local, self.directory)
            finally:
                shutil.rmtree(self._local, ignore_errors=True)
                self._local = None


def _train_and_evaluate(config, workdir: str, *, profile_steps: tuple[int, int] | None,
                        allow_restart_from_scratch: bool,
                        goodput: goodput_lib.GoodputRecorder) -> None:
    is_lead = jax.process_index() == 0
    if is_lead:
        storage.makedirs(workdir)
        storage.write_text(storage.join(workdir, "config.json"), config.to_json(indent=2))

    # ------------------------------------------------------------------------------------------
    # Mesh and shardings of the batch.
    # ------------------------------------------------------------------------------------------
    mesh = mesh_lib.make_mesh(config)
    data_sharding = mesh_lib.batch_sharding(mesh, config.data_axes)
    logging.info("mesh %s over %d devices (%d processes), batch split over %s",
                 dict(mesh.shape), jax.device_count(), jax.process_count(),
                 tuple(config.data_axes))

    # ------------------------------------------------------------------------------------------
    # Model, task and optimizer (abstract: nothing is allocated yet).
    # ------------------------------------------------------------------------------------------
    task = tasks.get_task(config)
    skeleton = state_lib.ModelSkeleton(config)
    params_abstract, _ = skeleton.split(skeleton.abstract_pure())
    tx, lr_schedule = optim_lib.make_optimizer(config, params_abstract)
    if is_lead:
        print(reporting.model_summary(skeleton.abstract_state, config.model.name), flush=True)
        print(reporting.io_summary(skeleton, task.input_spec(config.batch_size)), flush=True)

    # ------------------------------------------------------------------------------------------
    # Train state: abstract shapes -> shardings from the logical axis rules.
    # ------------------------------------------------------------------------------------------
    abstract_state = state_lib.abstract_train_state(skeleton, tx,
                                                    ema=ema_lib.enabled(config))
    state_shardings = state_lib.train_state_shardings(skeleton, abstract_state, mesh,
                                                      config.logical_axis_rules)
    state_target = state_lib.with_shardings(abstract_state, state_shardings)

    # ------------------------------------------------------------------------------------------
    # Compile the train step ahead of time, before any state exists: sharding errors, compile
    # time and FLOPs come before init, restore and the data pipeline.
    # ------------------------------------------------------------------------------------------
    train_step = step_lib.make_train_step(
            config=config, skeleton=skeleton, task=task, tx=tx, lr_schedule=lr_schedule,
            mesh=mesh, state_shardings=state_shardings, data_sharding=data_sharding)
    batch_target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sharding)
                    for k, v in pipeline.batch_spec(config, task, train=True).items()}
    compile_start = time.perf_counter()
    try:  # tracing: a mesh the kernels cannot split is a config error, reported before init
        lowered_step = train_step.lower(state_target, batch_target)
    except ShardingError as error:
        raise ConfigError(
                f"config.mesh_shape={tuple(config.mesh_shape)} with logical_axis_rules: "
                f"{error}") from None
    compiled_step = lowered_step.compile()
    compile_seconds = time.perf_counter() - compile_start
    goodput.add("compile", compile_seconds)
    flops_per_device = reporting.compiled_flops(compiled_step)
    device_kind = jax.devices()[0].device_kind
    peak = reporting.device_peak_flops(device_kind)
    logging.info("train step compiled in %.1fs; %s FLOPs per step per device (XLA cost "
                 "analysis)", compile_seconds,
                 f"{flops_per_device:.4g}" if flops_per_device else "unknown")

    # ------------------------------------------------------------------------------------------
    # Data, then restore-or-init (the checkpoint also holds the iterator's position).
    # ------------------------------------------------------------------------------------------
    train_iter = pipeline.make_train_iterator(config, task, mesh, data_sharding)
    checkpointer = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"),
                                         keep=config.keep_checkpoints,
                                         async_save=config.async_checkpointing)
    with goodput.measure("checkpoint_restore"):
        restored = _restore(checkpointer, state_target, train_iter, state_shardings,
                            allow_restart_from_scratch=allow_restart_from_scratch)
    if restored is not None:
        start_step, train_state = restored
        logging.info("resumed from %s at step %d", checkpointer.directory, start_step)
    else:
        start_step = 0
        pretrained = None
        if init_from.enabled(config):  # fine-tuning: the file's weights, only on a fresh start
            try:
                pretrained = init_from.load(config, skeleton.abstract_pure())
            except (ValueError, OSError) as error:
                raise ConfigError(" ".join(str(error).split())) from None
        train_state = state_lib.init_train_state(skeleton, tx, state_shardings, pretrained)
    if start_step > config.total_steps:
        raise ConfigError(
                f"config.total_steps={config.total_steps} is below the step of the latest "
                f"checkpoint ({start_step}) in {checkpointer.directory}")

    model_shardings = state_shardings["model"]
    eval_step = step_lib.make_eval_step(skeleton=skeleton, task=task, mesh=mesh,
                                        model_shardings=model_shardings,
                                        data_sharding=data_sharding,
                                        rules=mesh_lib.activation_rules(config),
                                        context_parallel=mesh_lib.context_parallel_options(
                                                config))

    @goodput.measure("eval")
    def evaluate(step: int) -> dict:
        batches = pipeline.make_eval_iterator(config, task, mesh, data_sharding)
        metrics = step_lib.run_eval(eval_step, train_state["model"], batches, task)
        writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        logging.info("eval at step %d: %s", step, json.dumps(metrics))
        if "ema" in train_state:  # the averaged weights, on the same batches
            batches = pipeline.make_eval_iterator(config, task, mesh, data_sharding)
            ema_metrics = step_lib.run_eval(eval_step, train_state["ema"], batches, task)
            writer.write(step, {f"eval_ema/{k}": v for k, v in ema_metrics.items()})
            logging.info("eval of the EMA weights at step %d: %s", step,
                         json.dumps(ema_metrics))
            metrics = {**metrics, "ema": ema_metrics}
        return metrics

    # ------------------------------------------------------------------------------------------
    # Logging, preemption, profiling.
    # ------------------------------------------------------------------------------------------
    writer = reporting.MetricWriter(workdir, tensorboard=config.logging.tensorboard,
                                    progress_bar=config.logging.progress_bar,
                                    total_steps=config.total_steps, initial_step=start_step)
    multi_process = jax.process_count() > 1
    profile = _Profile(storage.join(workdir, "profile"))
    profiling = False

    # ------------------------------------------------------------------------------------------
    # The loop.
    # ------------------------------------------------------------------------------------------
    last_checked = start_step  # metrics are checked for NaN/inf up to here
    interval_start, interval_steps = time.perf_counter(), 0
    step_times: list[float] = []
    stopped_early = False
    step = start_step
    # From here on SIGTERM (preemption) and SIGINT only set a flag: the loop saves and exits
    # cleanly. Installed only around the loop, and put back after it, so a notebook or test that
    # calls this function keeps its own Ctrl-C. (A signal during compilation or restore still
    # stops the process at once: no step has been taken since the checkpoint it resumed.)
    preemption = ckpt_lib.PreemptionFlag()
    goodput.start_steps()
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            if profile_steps and step == profile_steps[0]:
                profile.start()
                profiling = True
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                with goodput.measure("data_wait"):
                    batch = next(train_iter)
                train_state, metrics = compiled_step(train_state, batch)
            if profiling and step == profile_steps[1]:
                jax.block_until_ready(train_state)
                profile.stop()
                profiling = False
                logging.info("profile of steps %s written to %s", profile_steps,
                             profile.directory)
            interval_steps += 1

            log_now = step % config.log_every == 0 or step == config.total_steps
            save_now = step % config.checkpoint_every == 0 or step == config.total_steps
            eval_now = step == config.total_steps or (config.eval_every
                                                      and step % config.eval_every == 0)
            # One process seeing SIGTERM must not leave the others in a collective: on several
            # processes the flag is agreed at log steps (a host sync every step would stall the
            # device queue); orbax adds the cluster's own preemption notice.
            preempt_now = False
            if not multi_process:
                preempt_now = preemption.is_set()
            elif log_now:
                flags_seen = multihost_utils.process_allgather(
                        np.asarray(preemption.is_set(), np.int32))
                preempt_now = bool(max(flags_seen))
            preempt_now = preempt_now or checkpointer.reached_preemption(step)

            if log_now or save_now or preempt_now:
                values = jax.device_get(metrics)
                elapsed = time.perf_counter() - interval_start
                bad = [k for k in ("loss", "grad_norm", "param_norm")
                       if not math.isfinite(float(values[k]))]
                if bad:
                    checkpointer.wait()  # so that the message names the last saved step
                    shown = ", ".join(f"{k}={float(values[k]):.4g}"
                                      for k in ("loss", "grad_norm", "param_norm"))
                    raise TrainingDiverged(
                            f"loss became nan/inf within steps [{last_checked + 1}, {step}] "
                            f"(non-finite: {', '.join(bad)}; {shown}); the last good "
                            f"checkpoint is step {checkpointer.latest_step()}")
                last_checked = step
                seconds_per_step = elapsed / interval_steps
                if step > start_step + interval_steps:  # the first interval includes warm-up
                    step_times.append(seconds_per_step)
                record = {f"train/{k}": v for k, v in values.items()}
                record["perf/steps_per_sec"] = 1.0 / seconds_per_step
                record["perf/examples_per_sec"] = config.batch_size / seconds_per_step
                record.update(goodput.metrics())  # totals so far; this step's save comes later
                if config.data.on_bad_example == "skip":  # this process's count, cumulative
                    record["data/bad_examples"] = train_iter.bad_examples
                if flops_per_device:
                    achieved = flops_per_device / seconds_per_step
                    record["perf/tflops_per_device"] = achieved / 1e12
                    if peak is not None:
                        record["perf/mfu"] = achieved / peak[1]
                if log_now:
                    writer.write(step, record)
                writer.advance(interval_steps, {
                        "loss": f"{float(values['loss']):.4f}", "lr": f"{float(values['lr']):.2e}",
                        "ex/s": f"{record['perf/examples_per_sec']:.0f}"})
                interval_start, interval_steps = time.perf_counter(), 0

            if eval_now:
                evaluate(step)
            if save_now or preempt_now:
                with goodput.measure("checkpoint_save"):
                    checkpointer.save(step, train_state, train_iter)
            if preempt_now and step < config.total_steps:
                logging.warning("preemption (%s) at step %d: checkpoint saved, exiting",
                                preemption.signal_name or "orbax notice", step)
                stopped_early = True
                break
            if interval_steps == 0:
                # Re-anchor after eval/checkpoint work so that it is not counted as step time.
                interval_start = time.perf_counter()
        goodput.stop_steps()

        if start_step >= config.total_steps:
            logging.info("already at total_steps=%d; evaluating the final state only",
                         config.total_steps)
            evaluate(start_step)
    finally:
        if profiling:
            profile.stop()
        try:
            # Waits for the last async save (counted as save time); a diverged run keeps its
            # last good checkpoint.
            with goodput.measure("checkpoint_save"):
                checkpointer.close()
        finally:
            writer.close()
            train_iter.close()  # stops grain's worker processes (and frees their shared memory)
            preemption.restore()

    # ------------------------------------------------------------------------------------------
    # Summary: compile time, step time, FLOP throughput and MFU; where the wall time went.
    # ------------------------------------------------------------------------------------------
    if step_times and is_lead:
        seconds = sorted(step_times)[len(step_times) // 2]
        print(f"step time {seconds * 1e3:.1f} ms (median over log intervals after the first), "
              f"compile {compile_seconds:.1f} s; "
              + reporting.throughput_line(flops_per_device, seconds, device_kind), flush=True)
    if is_lead:
        print(goodput.summary(), flush=True)
    if stopped_early:
        print(f"stopped at step {step} on {preemption.signal_name or 'preemption'}; "
              f"resume with the same command", flush=True)
