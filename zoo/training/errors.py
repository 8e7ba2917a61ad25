"""`ConfigError`: the one exception the platform raises for a run it cannot start.

A leaf module (it imports nothing of the project), so the config checks, the tasks and the data
pipeline can all raise it without importing each other.
"""


class ConfigError(ValueError):
    """A config value the platform cannot run with; the message is one line, naming the field."""
