"""The application layer: datasets, encoders, the feature cache, the compare and align pipelines, the report
and the ``spec-torch`` command. Needs the ``[apps]`` extra: ``pip install "spec_torch[apps]"``.

The library (``import spec_torch``) never imports this package. Importing it checks that the extra's
packages are installed and names the extra when one is missing.
"""

from __future__ import annotations

import importlib.util

__all__ = ["APPS_EXTRA", "require"]

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


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def require(*modules: str) -> None:
    """Raise ModuleNotFoundError naming the ``[apps]`` extra when one of ``modules`` (default: all of
    :data:`APPS_EXTRA`) is not installed. Looks the modules up without importing them."""
    missing = [m for m in (modules or APPS_EXTRA) if not _installed(m)]
    if missing:
        names = ", ".join(APPS_EXTRA.get(m, m) for m in missing)
        raise ModuleNotFoundError(
            f"spec_torch.apps needs {names}, which the library alone does not install: "
            'pip install "spec_torch[apps]"',
            name=missing[0],
        )


require()
