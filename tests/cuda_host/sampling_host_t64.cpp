// sampling_host.cpp with 64-thread selecting blocks (tests/test_cuda_host_sampling.py), a first-tile bound that
// expects only n keys, a screening bound that expects only n / 2 + 1 (finish_rows selects such rows alone), and
// screened rows of more than 24 keys sorted rather than ranked, and clusters of two blocks a row.
#define ATS_SELECT_THREADS 64
#define ATS_HEAD_WANT(n) ((double)(n))  // chunk_topn's first tile is taken again often (fewer than n below its bound)
#define ATS_SCREEN_WANT(n) (0.5 * (double)(n) + 1.0)  // fewer than n keys below a screened row's bound, mostly
#define ATS_RANK_MAX 24
#define ATS_ROW_CLUSTER 2
#include "sampling_host.cpp"
