// Philox4x32-10, the counter-based generator shared by every atskern backend.
// Same numbers as atskern/_rng.py (NumPy) and atskern/cpu/philox.py (Numba): see the stream
// layout in atskern/_rng.py.
#ifndef ATSKERN_PHILOX_CUH
#define ATSKERN_PHILOX_CUH

#define ATS_PHILOX_M0 0xD2511F53u
#define ATS_PHILOX_M1 0xCD9E8D57u
#define ATS_PHILOX_W0 0x9E3779B9u
#define ATS_PHILOX_W1 0xBB67AE85u

#define ATS_STREAM_HI 0u
#define ATS_STREAM_LO 1u
#define ATS_STREAM_REPLACE 2u

struct PhiloxWords {
    unsigned int w[4];
};

__device__ __forceinline__ PhiloxWords philox4x32_10(unsigned int c0, unsigned int c1, unsigned int c2,
                                                     unsigned int c3, unsigned int k0, unsigned int k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned int hi0 = __umulhi(ATS_PHILOX_M0, c0);
        const unsigned int lo0 = ATS_PHILOX_M0 * c0;
        const unsigned int hi1 = __umulhi(ATS_PHILOX_M1, c2);
        const unsigned int lo1 = ATS_PHILOX_M1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += ATS_PHILOX_W0;
        k1 += ATS_PHILOX_W1;
    }
    PhiloxWords out;
    out.w[0] = c0;
    out.w[1] = c1;
    out.w[2] = c2;
    out.w[3] = c3;
    return out;
}

// The four words of counter block q of (row, stream).
__device__ __forceinline__ PhiloxWords block_words(unsigned long long q, unsigned int row, unsigned int stream,
                                                   unsigned long long seed) {
    return philox4x32_10((unsigned int)(q & 0xFFFFFFFFull), (unsigned int)(q >> 32), row, stream,
                         (unsigned int)(seed & 0xFFFFFFFFull), (unsigned int)(seed >> 32));
}

// The float64 uniform in (0, 1] made of a high and a low 32-bit word.
__device__ __forceinline__ double to_uniform(unsigned int hi, unsigned int lo) {
    const unsigned long long mantissa = ((unsigned long long)hi << 21) | (unsigned long long)(lo >> 11);
    return (double)(mantissa + 1ull) * 0x1.0p-53;
}

// 1 - (hi + 1) 2^-32: an upper bound of 1 - u for every uniform with this high word.
__device__ __forceinline__ double headroom(unsigned int hi) { return (double)(0xFFFFFFFFu - hi) * 0x1.0p-32; }

#endif  // ATSKERN_PHILOX_CUH
