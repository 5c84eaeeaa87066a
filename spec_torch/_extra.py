"""The ``[apps]`` extra: the packages it adds and how to install it, known without importing any of them.

Read by :mod:`spec_torch.apps` (which refuses to import without them) and by the ``spec-torch`` command
(:mod:`spec_torch.__main__`), which says how to install the extra instead of failing in an import.
spec_torch is not on a package index: the extra installs from a clone or from a built wheel, by path.
"""

from __future__ import annotations

import importlib.util

__all__ = ["APPS_EXTRA", "INSTALL_COMMANDS", "missing_apps"]

#: import name -> package name of the ``[apps]`` extra that the application imports
APPS_EXTRA = {
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "open_clip": "open_clip_torch",
    "timm": "timm",
    "torchvision": "torchvision",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "tqdm": "tqdm",
    "jinja2": "Jinja2",
}

#: the commands that install the extra (the README's set-up section shows the same two)
INSTALL_COMMANDS = (
    'pip install ".[apps]"  (in a clone of spec_torch)',
    'pip install "dist/spec_torch-VERSION-py3-none-any.whl[apps]"  (a built wheel, by its path)',
)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def missing_apps(*modules: str) -> list[str]:
    """The import names among ``modules`` (default: all of :data:`APPS_EXTRA`) that are not installed; looked
    up without importing them (``APPS_EXTRA[name]`` is the package to install)."""
    return [m for m in (modules or APPS_EXTRA) if not _installed(m)]
