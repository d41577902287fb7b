// sampling_host.cpp with 64-thread selecting blocks (tests/test_cuda_host_sampling.py), and a first-tile bound
// that expects only n keys.
#define ATS_SELECT_THREADS 64
#define ATS_HEAD_WANT(n) ((double)(n))  // chunk_topn's first tile is taken again often (fewer than n below its bound)
#include "sampling_host.cpp"
