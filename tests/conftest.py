"""Shared test settings: offline hubs, a CUDA skip, and the dense numpy oracle of SPEC."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    from helpers import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def two_threads():
    """Two intra-op threads for a whole module, whatever an earlier module left set."""
    from helpers import torch_threads

    with torch_threads(2):
        yield
