"""CuPy CUDA kernels. Imported only when a CuPy array reaches the public API.

Kernel sources live next to their wrappers as ``*.cu`` (and shared ``*.cuh``)
files so that nvcc can compile them in CI without a GPU.
"""
