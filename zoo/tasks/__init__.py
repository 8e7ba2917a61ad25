"""The projects: one module per task beyond classification, each with its data beside it.

A module here registers its task with `zoo.training.tasks.register_task` and is listed in
`zoo.training.tasks._TASK_MODULES`; the platform (zoo/training/) names no project.
"""
