"""The projects: one module per task beyond classification, each with its data beside it.

A module here registers its task with `zoo.training.tasks.register_task`; the task registry
imports every module of this package on its first lookup, so the platform (zoo/training/)
names no project.
"""
