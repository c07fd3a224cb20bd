"""``python -m masked_optim``: the same as the ``masked-optim`` command."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
