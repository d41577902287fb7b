"""ats: attention sampling for Keras 3 / TensorFlow (drop-in for the 2019 library), over atskern kernels."""
