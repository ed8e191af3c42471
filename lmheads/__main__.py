import signal
import sys

from lmheads.errors import interrupted_outside_training

try:  # Lightning takes seconds to import: Ctrl-C meanwhile ends the command as it does later, in one line
    from lmheads.cli import main
    from lmheads.console import plain_warnings
except KeyboardInterrupt:
    stopped = interrupted_outside_training(signal.SIGINT)
    print(f"interrupted: {stopped}", file=sys.stderr)
    sys.exit(stopped.exit_code)


def run() -> None:
    """``python -m lmheads`` and the ``lmheads`` command: the exit status is the command's alone."""
    plain_warnings()
    main()


if __name__ == "__main__":
    run()
