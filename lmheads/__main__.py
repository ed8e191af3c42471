import sys

try:  # Lightning takes seconds to import: Ctrl-C meanwhile ends the command as it does later, in one line
    from lmheads.cli import main
    from lmheads.console import plain_warnings
except KeyboardInterrupt:
    print("interrupted: SIGINT outside training: nothing was saved", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    plain_warnings()
    main()
