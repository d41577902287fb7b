"""ats: attention sampling for Keras 3, PyTorch and JAX, a drop-in for the 2019 library, over atskern kernels.

``import ats`` is light: it imports no framework. The submodules do:

- :mod:`ats.keras` -- the Keras 3 layers ``attention_sampling``,
  ``SamplePatches``, ``Expectation``, ``PatchesToBatch``, ``BatchToPatches``
  and the 2019 helpers (:mod:`ats.keras.layers`, ``image_layers``,
  ``regularizers``, ``training``, ``functions``, ``builder``, ``data``), on
  Keras' TensorFlow, torch and JAX backends (one small op module per backend:
  :mod:`ats.keras.backends`);
- the 2019 import paths, re-exporting them on every backend: :mod:`ats.core`
  (with ``ats.core.ats_layer``, ``builder``, ``sampling``, ``expectation``:
  ``ATSBuilder``, ``sample``, ``expected``), :mod:`ats.data`
  (``MultiResolutionBatch``, ``FromTensors``), :mod:`ats.utils` (the cast
  helpers) with :mod:`ats.utils.layers`, ``ats.utils.regularizers`` and
  ``ats.utils.training`` (``SampleSoftmax``, ``ResizeImages``, ``ImagePan``,
  ``Batcher``, ...);
- :mod:`ats.slides` -- Keras layers and data reading whole-slide files (every backend);
- :mod:`ats.ops` -- TensorFlow ops (``sample``, ``extract_patches``,
  ``extract_multiscale``, ``patch_offsets``, ``expectation``): TensorFlow
  only (they need TensorFlow, not Keras), also under XLA
  (``jit_compile=True``), where they use :mod:`ats.tf.xla`;
- :mod:`ats.tf.xla` -- atskern's draws and gathers in plain TensorFlow ops (XLA-compilable);
- :mod:`ats.torch` -- the PyTorch adapter (custom ops, ``nn.Module`` layers, ``ats.torch.slides``);
- :mod:`ats.jax` -- pure JAX (``jit``, ``vmap``, any device), no Flax needed.

The Keras modules raise an ImportError saying so when imported under a Keras
backend other than tensorflow, torch or jax.
"""

# No OMP_WAIT_POLICY default here any more: atskern's kernels run on Numba's
# TBB layer (atskern/cpu/_threading.py), which OpenMP's waiting policy does not
# touch; atskern sets PASSIVE itself only when a user picks the OpenMP layer.

__version__ = "0.1.0"

__all__ = ["__version__"]
