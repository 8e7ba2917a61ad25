"""`ConfigError`, `CheckpointError` and `DataError`: what the platform raises for a run it cannot
start or continue because of what the user gave it (the command lines print them as one line).

A leaf module (it imports nothing of the project), so the config checks, the tasks and the data
pipeline can all raise it without importing each other.
"""


class ConfigError(ValueError):
    """A config value the platform cannot run with; the message is one line, naming the field."""


class CheckpointError(ValueError):
    """A run directory whose checkpoints cannot be read; the message is one line naming each
    step tried and why it failed."""


class DataError(ValueError):
    """An example the data pipeline cannot use (an undecodable image, a label out of range, a
    bad record); the message is one line naming the file or record."""
