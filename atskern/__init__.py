"""atskern: attention sampling (ATS) kernels for NumPy (Numba) and CuPy (CUDA) arrays.

Functions dispatch on the array type: NumPy arrays run the Numba kernels in
``atskern.cpu``, CuPy arrays the CUDA kernels in ``atskern.gpu``.
``atskern.reference`` holds slow NumPy twins of every kernel.
"""

from . import patches as _patches
from . import sampling as _sampling
from ._serial import cpu_serialized as _cpu_serialized
from .estimator import expectation, expectation_grad
from .patches import patch_offsets
from .sampling import check_status

# the calls that launch parallel CPU kernels, behind the threading layer's lock where it needs one
sample = _cpu_serialized(_sampling.sample, __name__)
extract_patches = _cpu_serialized(_patches.extract_patches, __name__)
scatter_patches = _cpu_serialized(_patches.scatter_patches, __name__)
extract_multiscale = _cpu_serialized(_patches.extract_multiscale, __name__)
scatter_multiscale = _cpu_serialized(_patches.scatter_multiscale, __name__)

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
