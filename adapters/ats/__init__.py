"""ats: attention sampling for Keras 3, PyTorch and JAX, a drop-in for the 2019 library, over atskern kernels.

``import ats`` is light: it imports neither TensorFlow nor Keras. The
submodules do:

- :mod:`ats.ops` -- TensorFlow ops: ``sample``, ``extract_patches``,
  ``extract_multiscale``, ``patch_offsets``, ``expectation``;
- :mod:`ats.keras` -- Keras layers ``attention_sampling``, ``SamplePatches``,
  ``Expectation`` on Keras' TensorFlow, torch and JAX backends (also at their
  2019 path :mod:`ats.core`);
- :mod:`ats.core.ats_layer`, :mod:`ats.core.builder`, :mod:`ats.core.sampling`,
  :mod:`ats.core.expectation` -- the 2019 modules (``ATSBuilder``, ``sample``, ``expected``);
- :mod:`ats.data` -- ``MultiResolutionBatch`` and ``FromTensors`` (2019);
- :mod:`ats.utils` (the 2019 cast helpers), :mod:`ats.utils.layers`,
  :mod:`ats.utils.regularizers`, :mod:`ats.utils.training` -- the 2019
  helpers (``SampleSoftmax``, ``ResizeImages``, ``ImagePan``, ``Batcher``, ...);
- :mod:`ats.torch` -- the PyTorch adapter; :mod:`ats.jax` -- pure JAX; :mod:`ats.tf` -- XLA-native TF ops.

Modules that only run on Keras' TensorFlow backend (``ats.ops``, ...) say so at import.
"""

# No OMP_WAIT_POLICY default here any more: atskern's kernels run on Numba's
# TBB layer (atskern/cpu/_threading.py), which OpenMP's waiting policy does not
# touch; atskern sets PASSIVE itself only when a user picks the OpenMP layer.

__version__ = "0.1.0"

__all__ = ["__version__"]
