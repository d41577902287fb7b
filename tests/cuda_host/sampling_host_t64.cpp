// sampling_host.cpp with 64-thread selecting blocks (tests/test_cuda_host_sampling.py).
#define ATS_SELECT_THREADS 64
#include "sampling_host.cpp"
