"""``python -m vmoe``: the command line (see :mod:`vmoe.cli`)."""

from vmoe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
