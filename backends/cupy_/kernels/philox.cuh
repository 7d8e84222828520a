// philox.cuh -- Philox4x64-10, step for step as refattn/dropout.py and backends/numba_/_philox.py
// (DESIGN section 3). Self-contained: tests/test_cupy_host.py compiles this very file as host C++
// (with __umul64hi written through unsigned __int128) and checks it bit for bit against numpy.
//
// The pair (i, j) of stream b * Hq + h has flat index n = i * Sk + j and reads word n % 4 of the
// block for the counter (n / 4, 0, 0, 0) under the key (seed, stream); u = (word >> 11) * 2**-53,
// and the pair is kept iff u >= p.

#define REFATTN_PHILOX_M0 0xD2E7470EE14C6C93ULL
#define REFATTN_PHILOX_M1 0xCA5A826395121157ULL
#define REFATTN_PHILOX_W0 0x9E3779B97F4A7C15ULL
#define REFATTN_PHILOX_W1 0xBB67AE8584CAA73BULL
#define REFATTN_PHILOX_ROUNDS 10

// The four words of the Philox4x64-10 block for counter (counter0, 0, 0, 0) and key (key0, key1).
__device__ __forceinline__ void philox4x64_10(unsigned long long counter0, unsigned long long key0,
                                              unsigned long long key1, unsigned long long word[4]) {
    unsigned long long c0 = counter0, c1 = 0, c2 = 0, c3 = 0;
    unsigned long long k0 = key0, k1 = key1;
    for (int r = 0; r < REFATTN_PHILOX_ROUNDS; ++r) {
        if (r > 0) {
            k0 += REFATTN_PHILOX_W0;
            k1 += REFATTN_PHILOX_W1;
        }
        const unsigned long long hi0 = __umul64hi(REFATTN_PHILOX_M0, c0), lo0 = REFATTN_PHILOX_M0 * c0;
        const unsigned long long hi1 = __umul64hi(REFATTN_PHILOX_M1, c2), lo1 = REFATTN_PHILOX_M1 * c2;
        const unsigned long long n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    word[0] = c0;
    word[1] = c1;
    word[2] = c2;
    word[3] = c3;
}

// u in [0, 1) for flat index n of stream `stream` under `seed`.
__device__ __forceinline__ double philox_uniform(unsigned long long seed, unsigned long long stream,
                                                 unsigned long long n) {
    unsigned long long word[4];
    philox4x64_10(n >> 2, seed, stream, word);
    const unsigned int which = (unsigned int)(n & 3);  // selected without a dynamic index, which
    const unsigned long long w = which == 0 ? word[0]   // would put word[] in local memory
                               : which == 1 ? word[1] : which == 2 ? word[2] : word[3];
    return (double)(w >> 11) * 0x1.0p-53;
}
