"""``python -m megarank.launch``, kept for job scripts written against it: the launcher is megarank/cli/launch.py."""
import sys

from megarank.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
