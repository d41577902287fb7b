"""ats: attention sampling for Keras 3 / TensorFlow, a drop-in for the 2019 library, over atskern kernels.

``import ats`` is light: it imports neither TensorFlow nor Keras. The
submodules do:

- :mod:`ats.ops` -- TensorFlow ops: ``sample``, ``extract_patches``,
  ``extract_multiscale``, ``patch_offsets``, ``expectation``;
- :mod:`ats.core` -- Keras layers ``attention_sampling``, ``SamplePatches``,
  ``Expectation``;
- :mod:`ats.utils.layers` and :mod:`ats.utils.regularizers` -- the 2019
  helpers (``SampleSoftmax``, ``L2Normalize``, ``ActivityRegularizer``,
  ``multinomial_entropy``).

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
