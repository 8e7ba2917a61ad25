"""The input pipeline of every task: grain datasets that yield sharded global batches.

  train: range(N) -> shuffle(seed) -> repeat   one global order, reshuffled every epoch
      -> global batch k = positions [kB, (k+1)B)  the same for any process count
      -> process p loads rows [pB/P, (p+1)B/P)    prepare (decode, augment), RNG from
                                                  (seed, epoch, index)
      -> to_iter_dataset [-> mp_prefetch]        worker processes when data.worker_count > 0
      -> jax.make_array_from_process_local_data -> global arrays of the task's example_spec
  eval: source[process_index::process_count], padded to equal batch counts with a 0 mask

A run on one process and on N processes therefore trains on identical global batches.
Batching happens before the iterator (on the MapDataset), so batch k holds the same examples
whatever the number of worker processes: grain hands whole batches to workers round-robin. The
augmentation RNG depends on the example, not on the position of a worker, for the same reason.
The train iterator's state is therefore just the number of batches consumed, which is also
independent of the worker count and can be restored into a pipeline with a different one.

What is read and how an example is prepared is the task's data half (`Task.open_split`,
`make_preparer`, `example_spec`, zoo/training/tasks.py); every function here takes the task.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from typing import Any, Callable, Iterator, Mapping

import grain
import jax
import numpy as np
from absl import logging

from zoo.training.errors import DataError
from zoo.training.tasks import Task

_AUGMENT_STREAM = 1  # keeps augmentation draws apart from any other use of config.seed
ON_BAD_EXAMPLE = ("fail", "skip")
# "skip": at most this many consecutive bad examples replace one train example.
MAX_REPLACEMENTS = 16
# Key of the per-batch count of replaced examples, taken out before the batch leaves the host.
BAD_EXAMPLES_KEY = "__bad_examples__"
# Restarts of dead grain worker processes a train run tolerates.
MAX_WORKER_RESTARTS = 3


# ================================================================================================
# Validation and shapes
# ================================================================================================

def validate_data_config(config, task: Task, *, process_count: int | None = None) -> None:
    """Raises ValueError (naming the config field) for data settings that cannot work: a source
    the task does not read, its own data checks, missing or empty paths, a split with fewer
    examples than processes. Lists folders and opens record files, but reads no example."""
    d = config.data
    if d.source not in task.sources:
        raise ValueError(f"config.data.source={d.source!r} is invalid for config.task="
                         f"{config.task!r}; allowed: {task.sources}")
    task.check_data(config)
    if d.on_bad_example not in ON_BAD_EXAMPLE:
        raise ValueError(f"config.data.on_bad_example={d.on_bad_example!r} is invalid; allowed: "
                         f"one of {ON_BAD_EXAMPLE}")
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


def batch_spec(config, task: Task, *, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of one batch (train: config.batch_size; eval:
    config.eval.batch_size plus the float32 "mask")."""
    size = int(config.batch_size if train else config.eval.batch_size)
    spec = {k: jax.ShapeDtypeStruct((size,) + shape, dtype)
            for k, (shape, dtype) in task.example_spec(config).items()}
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
    skip_bad: bool = False  # config.data.on_bad_example == "skip"

    def _example(self, index: int, epoch: int) -> tuple[dict[str, np.ndarray], int]:
        """(prepared example, number of bad examples passed over to get it).

        Skipping replaces a bad example by the next index (mod N), with its own RNG keyed by
        the bad index and the attempt, so the batch is a function of (seed, position) alone:
        still the same for any number of processes or workers, and on resume."""
        for attempt in range(MAX_REPLACEMENTS + 1 if self.skip_bad else 1):
            candidate = (index + attempt) % self.num_examples
            key = [self.seed, _AUGMENT_STREAM, epoch, index] + ([attempt] if attempt else [])
            try:
                return self.prepare(self.source[candidate], np.random.default_rng(key)), attempt
            except (ValueError, OSError) as error:
                if not self.skip_bad:
                    raise
                logging.warning("config.data.on_bad_example='skip': skipping example %d: %s",
                                candidate, " ".join(str(error).split()))
        raise DataError(f"{MAX_REPLACEMENTS + 1} consecutive train examples from index {index} "
                        f"cannot be read (config.data.on_bad_example='skip' replaces at most "
                        f"{MAX_REPLACEMENTS}); the data set looks broken")

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        start = batch * self.global_batch + self.process_index * self.local_batch
        examples, bad = [], 0
        for position in range(start, start + self.local_batch):
            example, passed_over = self._example(int(self.indices[position]),
                                                 position // self.num_examples)
            examples.append(example)
            bad += passed_over
        stacked = {key: np.stack([example[key] for example in examples])
                   for key in examples[0]}
        if self.skip_bad:
            stacked[BAD_EXAMPLES_KEY] = np.int64(bad)
        return stacked


@dataclasses.dataclass(frozen=True)
class _LoadEvalExample:
    """Position in this process's padded eval pass -> prepared example + "mask" (1 = real)."""
    source: Any
    prepare: Callable
    process_index: int
    process_count: int
    num_local: int
    padding: Mapping[str, np.ndarray]
    skip_bad: bool = False  # config.data.on_bad_example == "skip": a bad example is masked out

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        if position >= self.num_local:
            return {**self.padding, "mask": np.float32(0.0)}
        index = self.process_index + position * self.process_count
        try:
            return {**self.prepare(self.source[index], None), "mask": np.float32(1.0)}
        except (ValueError, OSError) as error:
            if not self.skip_bad:
                raise
            logging.warning("config.data.on_bad_example='skip': eval example %d left out: %s",
                            index, " ".join(str(error).split()))
            return {**self.padding, "mask": np.float32(0.0)}


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


def _local_train_batches(config, task: Task, *, process_index: int, process_count: int):
    """Endless MapDataset of this process's train batches: its batch_size // process_count
    rows of every global batch. The global batches are the same for any process count, so a
    run on one host and on a pod slice see the same data in the same order."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, process_count="
                         f"{process_count})")
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
                           process_index=process_index,
                           skip_bad=config.data.on_bad_example == "skip")
    return grain.MapDataset.range(sys.maxsize).map(load)


def _eval_batch_count(num_examples: int, local_batch: int, process_count: int,
                      cap: int) -> int:
    """Batches every process yields (the same on all of them, as collectives require)."""
    largest_share = -(-num_examples // process_count)
    count = -(-largest_share // local_batch)
    return min(count, cap) if cap > 0 else count


def _local_eval_batches(config, task: Task, *, process_index: int, process_count: int):
    """Finite MapDataset of this process's eval batches, the last one padded (mask 0)."""
    source = task.open_split(config, config.data.eval_split)
    local_batch = config.eval.batch_size // process_count
    num_batches = _eval_batch_count(len(source), local_batch, process_count,
                                    int(config.eval.num_batches))
    num_local = len(_process_share(len(source), process_index, process_count))
    padding = {k: np.zeros(shape, dtype) for k, (shape, dtype) in
               task.example_spec(config).items()}
    load = _LoadEvalExample(source=source, prepare=task.make_preparer(config),
                            process_index=process_index, process_count=process_count,
                            num_local=num_local, padding=padding,
                            skip_bad=config.data.on_bad_example == "skip")
    return grain.MapDataset.range(num_batches * local_batch).map(load).batch(local_batch)


def _allow_worker_processes_without_absl_main() -> None:
    """grain 0.2.18's worker processes read absl flags and raise UnparsedFlagAccessError unless
    the flags were parsed (grain #1355, fixed after 0.2.18). train.py parses them through
    absl.app.run; tests and notebooks do not, so mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _WorkerDied(RuntimeError):
    """A grain worker process ended without being asked to (killed, out of memory)."""


def _next_batch(iterator, what: str) -> dict[str, np.ndarray]:
    """next(iterator), with a bad example (ValueError/OSError raised while reading or preparing
    it, in this process or a grain worker) turned into a one-line DataError and a dead worker
    process into _WorkerDied."""
    try:
        return next(iterator)
    except (ValueError, OSError) as error:
        raise DataError(f"{what}: {' '.join(str(error).split())}") from None
    except RuntimeError as error:
        if "Worker process was terminated" in str(error):
            raise _WorkerDied(" ".join(str(error).split()).split(" Search the logs")[0]) \
                from None
        raise


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

    def __init__(self, config, task: Task, data_sharding, *, process_index: int | None = None,
                 process_count: int | None = None):
        self._config = config
        self._data_sharding = data_sharding
        self._process_count = jax.process_count() if process_count is None else process_count
        self._process_index = jax.process_index() if process_index is None else process_index
        self._batches = _local_train_batches(config, task, process_index=self._process_index,
                                             process_count=self._process_count)
        self._global_batch = int(config.batch_size)
        self._next_batch = 0
        self._grain_iterator = None
        # Train examples replaced under config.data.on_bad_example="skip", this process.
        self.bad_examples = 0
        self.worker_restarts = 0

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
        """This process's share of the next batch, as numpy arrays.

        A grain worker process that dies (killed, out of memory) costs a restart of the workers
        at the same batch, not the run: batches are a function of their index, so the restarted
        pipeline yields exactly what the old one would have. After MAX_WORKER_RESTARTS in one
        run it is a DataError."""
        what = f"training data (config.data.train_split, batch {self._next_batch})"
        while True:
            try:
                local = _next_batch(self.grain_iterator, what)
                break
            except _WorkerDied as error:
                self.close()
                self.worker_restarts += 1
                if self.worker_restarts > MAX_WORKER_RESTARTS:
                    raise DataError(f"{what}: {error}; the data workers were restarted "
                                    f"{MAX_WORKER_RESTARTS} times already, giving up (lower "
                                    f"config.data.worker_count or worker_buffer_size if they "
                                    f"run out of memory)") from None
                logging.warning("%s: %s; restarting the data workers at this batch (%d of at "
                                "most %d restarts)", what, error, self.worker_restarts,
                                MAX_WORKER_RESTARTS)
        self._next_batch += 1
        self.bad_examples += int(local.pop(BAD_EXAMPLES_KEY, 0))
        return local

    def __next__(self) -> dict[str, jax.Array]:
        return _to_global(self.next_local(), self._data_sharding, self._global_batch)

    def get_state(self) -> dict:
        return {"next_batch": self._next_batch, "batch_size": self._global_batch,
                "bad_examples": self.bad_examples}

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
        self.bad_examples = int(state.get("bad_examples", 0))

    def close(self) -> None:
        """Stops worker processes, if any (grain also does on garbage collection)."""
        if self._grain_iterator is not None:
            self._grain_iterator.close()
            self._grain_iterator = None


def make_train_iterator(config, task: Task, mesh, data_sharding) -> TrainIterator:
    """Endless global train batches of config.batch_size, sharded by `data_sharding` (a
    NamedSharding of [global_batch, ...] arrays on `mesh`); each process reads and prepares
    batch_size // process_count examples per batch."""
    _check_sharding(mesh, data_sharding)
    return TrainIterator(config, task, data_sharding)


def make_eval_iterator(config, task: Task, mesh, data_sharding
                       ) -> Iterator[dict[str, jax.Array]]:
    """One pass over config.data.eval_split in global batches of config.eval.batch_size, with a
    float32 "mask" (0 on the padding of the last batch); config.eval.num_batches > 0 caps the
    number of batches."""
    _check_sharding(mesh, data_sharding)
    batches = _local_eval_batches(config, task, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    return _eval_batches(batches, config, data_sharding)


def _eval_batches(batches, config, data_sharding) -> Iterator[dict[str, jax.Array]]:
    iterator = _iterate(batches, config)
    try:
        for index in itertools.count():
            try:
                local = _next_batch(iterator, f"eval data (config.data.eval_split, batch "
                                              f"{index})")
            except StopIteration:
                return
            except _WorkerDied as error:
                raise DataError(f"eval data (config.data.eval_split, batch {index}): {error} "
                                f"(run eval again; lower config.data.worker_count if the "
                                f"workers run out of memory)") from None
            yield _to_global(local, data_sharding, int(config.eval.batch_size))
    finally:
        iterator.close()
