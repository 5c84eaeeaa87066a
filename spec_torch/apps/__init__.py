"""The application layer: datasets, encoders, the feature cache, the compare and align pipelines, the report
and the ``spec-torch`` command. Needs the ``[apps]`` extra: ``pip install ".[apps]"`` in a clone, or the built
wheel's path with ``[apps]`` (:data:`spec_torch._extra.INSTALL_COMMANDS`).

The library (``import spec_torch``) never imports this package. Importing it checks that the extra's
packages are installed and names the extra when one is missing.
"""

from __future__ import annotations

from .._extra import APPS_EXTRA, INSTALL_COMMANDS, missing_apps

__all__ = ["APPS_EXTRA", "require"]


def require(*modules: str) -> None:
    """Raise ModuleNotFoundError naming the ``[apps]`` extra when one of ``modules`` (default: all of
    :data:`APPS_EXTRA`) is not installed. Looks the modules up without importing them."""
    missing = missing_apps(*modules)
    if missing:
        raise ModuleNotFoundError(
            f"spec_torch.apps needs {', '.join(APPS_EXTRA.get(m, m) for m in missing)}, which the library alone "
            f"does not install; install the [apps] extra: {' or '.join(INSTALL_COMMANDS)}",
            name=missing[0],
        )


require()
