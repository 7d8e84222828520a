// tiles.cuh -- the two tile products every kernel is made of, through shared memory.
//
// Threads form a 16 x 16 grid (tx = tid % 16, ty = tid / 16). In an R x C result tile a thread owns
// rows ty + 16 a (a < R / 16) and columns tx + 16 c (c < C / 16): the 16 threads of a half warp
// share rows, so row reductions are half-warp shuffles, and neighbouring lanes read neighbouring
// shared-memory columns (no bank conflicts; padded leading dimensions keep row reads apart too).
// Every function starts with __syncthreads(), so the shared buffers of the previous step are free;
// every thread of the block must call it (the control flow around it is uniform).

// acc[a][c] += sum_d x_row(ty + 16a)[d] * y_row(tx + 16c)[d] over d < n, where x_row(r) / y_row(r)
// give row r of the tile's left / right operand (or 0 when out of range: it reads as zeros). The
// operands pass through shared memory DK columns at a time (xs: R x (DK + 1), ys: C x (DK + 1)).
template <typename T, int R, int C, int DK, typename XRow, typename YRow>
__device__ __forceinline__ void rows_times_rows(T (&acc)[R / 16][C / 16], const XRow& x_row,
                                                const YRow& y_row, i64 n, T* xs, T* ys) {
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    for (i64 d0 = 0; d0 < n; d0 += DK) {
        __syncthreads();
        for (int e = tid; e < R * DK; e += REFATTN_THREADS) {
            const int r = e / DK, c = e % DK;
            const T* row = x_row(r);
            xs[r * (DK + 1) + c] = (row && d0 + c < n) ? row[d0 + c] : T(0);
        }
        for (int e = tid; e < C * DK; e += REFATTN_THREADS) {
            const int r = e / DK, c = e % DK;
            const T* row = y_row(r);
            ys[r * (DK + 1) + c] = (row && d0 + c < n) ? row[d0 + c] : T(0);
        }
        __syncthreads();
#pragma unroll 4
        for (int d = 0; d < DK; ++d) {
            T x[R / 16], y[C / 16];
#pragma unroll
            for (int a = 0; a < R / 16; ++a) x[a] = xs[(ty + 16 * a) * (DK + 1) + d];
#pragma unroll
            for (int c = 0; c < C / 16; ++c) y[c] = ys[(tx + 16 * c) * (DK + 1) + d];
#pragma unroll
            for (int a = 0; a < R / 16; ++a)
#pragma unroll
                for (int c = 0; c < C / 16; ++c) acc[a][c] += x[a] * y[c];
        }
    }
}

// acc[a][c] += sum_k L(ty + 16a, k) * y_row(k)[c0 + tx + 16c] over k < K, for the VC columns
// c0 .. c0 + VC of the right operand (columns >= ncols read as zeros). L is a tile already in
// shared memory with leading dimension ld: L(r, k) = left[r * ld + k], or left[k * ld + r] when
// TRANSPOSED. The right operand's rows pass through shared memory (ys: K x (VC + 1)).
template <typename T, int R, int K, int VC, bool TRANSPOSED, typename YRow>
__device__ __forceinline__ void smem_times_rows(T (&acc)[R / 16][VC / 16], const T* left, int ld,
                                                const YRow& y_row, i64 c0, i64 ncols, T* ys) {
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    __syncthreads();
    for (int e = tid; e < K * VC; e += REFATTN_THREADS) {
        const int k = e / VC, c = e % VC;
        const T* row = y_row(k);
        ys[k * (VC + 1) + c] = (row && c0 + c < ncols) ? row[c0 + c] : T(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
        T x[R / 16], y[VC / 16];
#pragma unroll
        for (int a = 0; a < R / 16; ++a)
            x[a] = TRANSPOSED ? left[k * ld + ty + 16 * a] : left[(ty + 16 * a) * ld + k];
#pragma unroll
        for (int c = 0; c < VC / 16; ++c) y[c] = ys[k * (VC + 1) + tx + 16 * c];
#pragma unroll
        for (int a = 0; a < R / 16; ++a)
#pragma unroll
            for (int c = 0; c < VC / 16; ++c) acc[a][c] += x[a] * y[c];
    }
}
