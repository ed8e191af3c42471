from lmheads.cli import main
from lmheads.console import plain_warnings

if __name__ == "__main__":
    plain_warnings()
    main()
