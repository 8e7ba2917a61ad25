r"""Trains a zoo model: the command line of zoo/training/trainer.py.

  python train.py --config configs/vit.py:smoke --workdir /tmp/vit_smoke
  python train.py --config configs/vit.py:s16 --workdir /runs/s16 --config.batch_size=512 \
      --config.mesh_shape='(-1,2,1)'          # FSDP over pairs of devices
  python train.py ... --profile_steps=20,25   # jax profiler trace of steps 20..25

Multi-host: the runtime is started from SLURM/MPI/TPU environments automatically, or by
--coordinator_address/--num_processes/--process_id (on CPU with gloo collectives). Every
process runs this same file. Exit status: 2 for anything wrong with what was given (flags,
config, workdir, data, checkpoints: one line on stderr; --verbose adds the traceback), 3 when
training diverged. A workdir whose checkpoints all fail to restore is never overwritten:
--allow_restart_from_scratch moves them to corrupt_checkpoints/ and starts from step 0.

Run directory: checkpoints/ (orbax), metrics.jsonl, tensorboard/, config.json, profile/.
"""
from __future__ import annotations

from zoo.training import train_main

if __name__ == "__main__":
    train_main.run()
