"""The shared training platform: config validation, mesh and shardings, tasks, the sharded
train/eval steps, checkpoints and run logging. `train.py` and `eval.py` at the repo root read as
a sequence of calls into these modules.

Submodules are imported by name (`from zoo.training import mesh`) rather than re-exported here,
so that the data workers grain spawns, which import `zoo.training.pipeline` and a task, do not
pay for orbax, tensorboardX and the rest of the loop. Projects (tasks other than classification)
live in zoo/tasks/.
"""
