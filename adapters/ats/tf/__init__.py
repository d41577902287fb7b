"""ats.tf: TensorFlow-side attention sampling.

:mod:`ats.tf.xla` holds the XLA-native ops (plain TensorFlow ops, compilable
with ``tf.function(jit_compile=True)``): sampling with atskern's generator,
patch gather/scatter and the estimator. Importing ``ats.tf`` imports nothing
heavy; ``ats.tf.xla`` imports TensorFlow.
"""
