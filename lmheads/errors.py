"""The exceptions that end a command with a message instead of a traceback.

The CLI turns a ``ConfigError`` (bad user input) into a single ``error: ...`` line and exit status 2, so
every message must say what is wrong *and* what to do about it; a ``NonFiniteLossError`` into an
``error:`` line and status 3; an ``Interrupted`` into an ``interrupted:`` line and 130 or 143.
"""


class ConfigError(ValueError):
    """Invalid configuration or input data; the message tells the user how to fix it."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite at ``step``; training stops without checkpointing that
    state."""

    exit_code = 3

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class Interrupted(RuntimeError):
    """Training was stopped by SIGINT or SIGTERM after saving a checkpoint to resume from."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
