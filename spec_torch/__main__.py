"""``python -m spec_torch COMMAND ...`` and the ``spec-torch`` command.

The application needs the ``[apps]`` extra; without it the command says so in one ``error:`` line (and
``--help`` says how to install it) instead of a traceback from an import.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from spec_torch._extra import APPS_EXTRA, INSTALL_COMMANDS, missing_apps


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``spec-torch`` (``argv`` default ``sys.argv[1:]``) when the ``[apps]`` extra is installed."""
    args = list(sys.argv[1:] if argv is None else argv)
    missing = missing_apps()
    if not missing:
        from spec_torch.apps.cli import main as run_command

        return run_command(args)
    names = ", ".join(APPS_EXTRA[m] for m in missing)
    if any(a in ("-h", "--help", "help") for a in args):
        install = "\n".join(f"  {c}" for c in INSTALL_COMMANDS)
        print(
            "usage: spec-torch COMMAND [overrides ...]\n\n"
            f"spec-torch needs the [apps] extra, which is not installed here (missing: {names}).\n"
            f"Install it with one of:\n{install}"
        )
        return 0
    print(
        f"error: spec-torch needs the [apps] extra (missing: {names}); install it with "
        f"{INSTALL_COMMANDS[0]}, or see spec-torch --help",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
