"""``python -m checkpoint_tools ...`` = ``megarank-convert ...``."""
import sys

from checkpoint_tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
