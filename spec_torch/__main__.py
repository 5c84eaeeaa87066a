"""``python -m spec_torch COMMAND ...``: the ``spec-torch`` command (needs the ``[apps]`` extra)."""

import sys

from spec_torch.apps.cli import main

sys.exit(main())
