"""The three scripts of the 2019 attention-sampling library, ported to Keras 3 and ``ats``.

- ``make_mnist.py``: builds the Megapixel MNIST dataset (digits from
  scikit-learn's bundled set offline, or real MNIST files with ``--mnist``);
- ``mnist.py``: trains attention sampling on it;
- ``speed_limits.py``: downloads the Swedish Traffic Signs set, filters the
  Speed Limits subset and trains attention sampling on it.

Run from the repository root, e.g. ``PYTHONPATH=adapters python examples/ats2019/mnist.py -h``.
"""
