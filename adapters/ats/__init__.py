"""ats: attention sampling for Keras 3 / TensorFlow, a drop-in for the 2019 library, over atskern kernels.

``import ats`` is light: it imports neither TensorFlow nor Keras. The
submodules do:

- :mod:`ats.ops` -- TensorFlow ops: ``sample``, ``extract_patches``,
  ``extract_multiscale``, ``patch_offsets``, ``expectation``;
- :mod:`ats.core` -- Keras layers ``attention_sampling``, ``SamplePatches``,
  ``Expectation``;
- :mod:`ats.core.ats_layer`, :mod:`ats.core.builder`, :mod:`ats.core.sampling`,
  :mod:`ats.core.expectation` -- the 2019 modules (``ATSBuilder``, ``sample``, ``expected``);
- :mod:`ats.data` -- ``MultiResolutionBatch`` and ``FromTensors`` (2019);
- :mod:`ats.utils` (the 2019 cast helpers), :mod:`ats.utils.layers`,
  :mod:`ats.utils.regularizers`, :mod:`ats.utils.training` -- the 2019
  helpers (``SampleSoftmax``, ``ResizeImages``, ``ImagePan``, ``Batcher``, ...);
- :mod:`ats.torch` -- the PyTorch adapter.

The Keras modules need Keras 3 on the TensorFlow backend and say so at import.
"""

import os

# atskern's Numba kernels run on OpenMP threads. Next to TensorFlow's thread
# pools, actively spinning OpenMP workers wait for busy cores: a 0.2 ms sample
# call took 32 ms on a loaded 2-core machine. Passive waiting avoids that; it
# must be set before OpenMP starts, and an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["__version__"]
