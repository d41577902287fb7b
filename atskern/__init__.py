"""atskern: attention sampling (ATS) kernels for NumPy (Numba) and CuPy (CUDA) arrays.

Functions dispatch on the array type: NumPy arrays run the Numba kernels in
``atskern.cpu``, CuPy arrays the CUDA kernels in ``atskern.gpu``.
``atskern.reference`` holds slow NumPy twins of every kernel.
"""

from .estimator import expectation, expectation_grad
from .patches import extract_multiscale, extract_patches, patch_offsets, scatter_multiscale, scatter_patches
from .sampling import check_status, sample

__version__ = "0.1.0"

__all__ = [
    "sample",
    "check_status",
    "expectation",
    "expectation_grad",
    "extract_patches",
    "scatter_patches",
    "patch_offsets",
    "extract_multiscale",
    "scatter_multiscale",
    "__version__",
]
