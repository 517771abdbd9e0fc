"""``python -m lorakit`` runs the command line (``torchrun ... -m lorakit train`` launches it per rank)."""

import sys

from lorakit.cli import main

sys.exit(main())
