"""spec_torch: Spectral Pairwise Embedding Comparison (SPEC) in PyTorch.

Compare two embeddings of the same samples by the eigendecomposition of the difference of their kernel
matrices; find the sample clusters one embedding captures and the other does not.

Example:
    >>> import torch, spec_torch as st
    >>> x, y = torch.randn(500, 16), torch.randn(500, 8)
    >>> res = st.spec(x, y, kernel_x="cosine", kernel_y=st.GaussianKernel(sigma="auto", rff_dim=256, seed=0))
    >>> res.spec_diff > 0
    True
"""

from . import uncertainty  # st.uncertainty.mode_support, thresholds (docs/uncertainty.md)
from .api import difference_matrix, spec
from .approx import rff_error_estimate
from .covariance import DiffCovariance
from .errors import SpecError
from .kernels import CosineKernel, GaussianKernel, Kernel, LinearKernel, resolve_kernel
from .loss import SpecAlignLoss
from .matrix import MatrixCovariance, SpecMatrix, spec_matrix
from .metrics import LinearCKA, linear_cka
from .nystrom import Nystrom
from .result import SpecResult, TopSamples

__version__ = "0.1.0"

__all__ = [
    "spec",
    "difference_matrix",
    "spec_matrix",
    "SpecMatrix",
    "MatrixCovariance",
    "DiffCovariance",
    "SpecResult",
    "TopSamples",
    "SpecAlignLoss",
    "SpecError",
    "Kernel",
    "CosineKernel",
    "LinearKernel",
    "GaussianKernel",
    "Nystrom",
    "resolve_kernel",
    "LinearCKA",
    "linear_cka",
    "uncertainty",
    "rff_error_estimate",
]
