"""Numba CPU kernels (``numba.set_num_threads`` / ``NUMBA_NUM_THREADS`` set their parallelism)."""
