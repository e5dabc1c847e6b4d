"""``python -m megarank.cli ...`` (what ``megarank launch`` runs in every worker)."""
import sys

from megarank.cli.main import main

sys.exit(main())
