"""``python -m spec_torch.apps.align [overrides]``: the same as ``spec-torch align``."""

import sys

from spec_torch.apps.cli import main

sys.exit(main(["align", *sys.argv[1:]]))
