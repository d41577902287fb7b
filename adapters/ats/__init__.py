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

# No OMP_WAIT_POLICY default here any more: atskern's kernels run on Numba's
# TBB layer (atskern/cpu/_threading.py), which OpenMP's waiting policy does not
# touch; atskern sets PASSIVE itself only when a user picks the OpenMP layer.

__version__ = "0.1.0"

__all__ = ["__version__"]
