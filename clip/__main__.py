"""``python -m clip``: the command line (see ``clip._cli``)."""
from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
