"""``python -m mailoutbox``: the ``mailoutbox`` command."""
import sys

from mailoutbox.cli import main

if __name__ == "__main__":
    sys.exit(main())
