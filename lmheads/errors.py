"""The one exception type for bad user input.

The CLI turns a ``ConfigError`` into a single ``error: ...`` line and exit status 2, so every message
must say what is wrong *and* what to do about it.
"""


class ConfigError(ValueError):
    """Invalid configuration or input data; the message tells the user how to fix it."""
