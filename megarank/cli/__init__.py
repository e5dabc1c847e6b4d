"""The command lines: ``megarank train | evaluate | rerank | launch | quickstart | init-tiny | config-help``
(``main``), each a thin layer over training/, scoring/ and the launcher, with the checks that run before any heavy
import (``preflight``)."""
from megarank.cli.main import main

__all__ = ["main"]
