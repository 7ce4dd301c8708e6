"""``python -m iidkern ...`` runs the ``iidkern`` command (see :mod:`iidkern.cli`)."""
import sys

from .cli import main

sys.exit(main())
