// attend_forward.cu -- FlashAttention-2 forward: online softmax over the key tiles of one query
// tile, the running max m and sum l in double, output accumulated in double registers, LSE.
//
// Block (ti, h, b * ncb + cb): query tile ti (BQ rows from i0 = ti * BQ) of head h in batch b, output
// columns dv0 = cb * DB .. dv0 + DB (ncb = ceil(Dv / DB) column blocks; each recomputes the scores,
// so DB = REFATTN_COLUMNS_PER_BLOCK covers Dv <= DB in one). It visits the key tiles
// q_tile_lo[ti] <= tj < q_tile_hi[ti] and skips the EMPTY ones; FULL tiles need no per-pair test.
//
// Per key tile, for the pairs a thread owns (rows ty + 16a, keys tx + 16c):
//   w = modified_score(scale * q.k) or -inf where hidden
//   m_new = max(m, rowmax(w));  alpha = exp(m - m_new);  p = exp(w - m_new)
//   l = alpha * l + rowsum(p)   (l never sees dropout)
//   acc = alpha * acc + keep(p) @ V
// A row whose running max is still -inf has seen nothing: p = 0, alpha = 1. At the end
// out = acc / l (times 1 / (1 + exp(sink - lse)) with sinks) and lse = m + log l; a row that saw
// nothing gets out = 0 and lse = -inf.

template <typename T, int BQ, int BK>
__device__ __forceinline__ void attend_forward(const AttendParams& p) {
    constexpr int DK = 16;                          // head-dim chunk of Q K^T
    constexpr int VC = 64;                          // V columns per shared-memory chunk
    constexpr int DB = REFATTN_COLUMNS_PER_BLOCK;   // output columns per block
    constexpr int RPT = BQ / 16, CPT = BK / 16;     // rows, keys per thread
    static_assert(BQ % 16 == 0 && BK % 16 == 0 && DB % VC == 0, "tile shape");
    __shared__ T qs[BQ * (DK + 1)];
    __shared__ T ks[BK * (DK + 1)];
    __shared__ T vs[BK * (VC + 1)];
    __shared__ T ps[BQ * (BK + 1)];
    static_assert(sizeof(qs) + sizeof(ks) + sizeof(vs) + sizeof(ps) <= 48 * 1024, "static shared memory");
    if (p.block_q != BQ || p.block_k != BK) __trap();  // the host planned other tiles: a bug

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const i64 ncb = (p.Dv + DB - 1) / DB > 0 ? (p.Dv + DB - 1) / DB : 1;
    const i64 ti = blockIdx.x, h = blockIdx.y, b = blockIdx.z / ncb, dv0 = (blockIdx.z % ncb) * DB;
    const i64 i0 = ti * BQ, hkv = p.head_map[h];

    double m[RPT], l[RPT], acc[RPT][DB / 16];
#pragma unroll
    for (int a = 0; a < RPT; ++a) {
        m[a] = neg_inf();
        l[a] = 0.0;
#pragma unroll
        for (int c = 0; c < DB / 16; ++c) acc[a][c] = 0.0;
    }
    auto q_row = [&](int r) { return query_row<T>(p, p.q, b, h, i0 + r, p.D); };

    for (i64 tj = p.q_tile_lo[ti]; tj < p.q_tile_hi[ti]; ++tj) {
        const int code = tile_code(p, b, h, ti, tj);
        if (code == TILE_EMPTY) continue;  // the same for every thread of the block
        const i64 j0 = tj * BK;
        auto k_row = [&](int r) { return key_row<T>(p, p.k, b, hkv, j0 + r, p.D); };
        auto v_row = [&](int r) { return key_row<T>(p, p.v, b, hkv, j0 + r, p.Dv); };

        // 1. the raw products q.k of this thread's pairs
        T s[RPT][CPT];
#pragma unroll
        for (int a = 0; a < RPT; ++a)
#pragma unroll
            for (int c = 0; c < CPT; ++c) s[a][c] = T(0);
        rows_times_rows<T, BQ, BK, DK>(s, q_row, k_row, p.D, qs, ks);

        // 2. online softmax, row by row; P (dropout applied) goes to shared memory for P V
        __syncthreads();  // the previous tile's P V is done with ps (even when D == 0)
        double alpha[RPT];
#pragma unroll
        for (int a = 0; a < RPT; ++a) {
            const i64 i = i0 + ty + 16 * a;
            double w[CPT], row_max = neg_inf();
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                const i64 j = j0 + tx + 16 * c;
                double t;
                w[c] = visible(p, code, b, h, ti, tj, i, j)
                           ? modified_score(p, (double)s[a][c], b, h, i, j, &t) : neg_inf();
                row_max = fmax(row_max, w[c]);
            }
            const double m_new = fmax(m[a], half_warp_max(row_max));
            double row_sum = 0.0;
            alpha[a] = 1.0;
            if (m_new != neg_inf()) {
                alpha[a] = exp(m[a] - m_new);
#pragma unroll
                for (int c = 0; c < CPT; ++c) {
                    w[c] = exp(w[c] - m_new);  // now the probability numerator p
                    row_sum += w[c];
                }
            } else {
#pragma unroll
                for (int c = 0; c < CPT; ++c) w[c] = 0.0;
            }
            l[a] = alpha[a] * l[a] + half_warp_sum(row_sum);
            m[a] = m_new;
#pragma unroll
            for (int c = 0; c < CPT; ++c) {
                double pr = w[c];
                if (p.dropout != DROP_NONE && pr != 0.0)
                    pr = kept(p, b, h, i, j0 + tx + 16 * c) ? pr * p.drop_scale : 0.0;
                ps[(ty + 16 * a) * (BK + 1) + tx + 16 * c] = T(pr);
            }
        }

        // 3. acc = alpha * acc + P V over this block's output columns, VC at a time
#pragma unroll
        for (int a = 0; a < RPT; ++a)
#pragma unroll
            for (int c = 0; c < DB / 16; ++c) acc[a][c] *= alpha[a];
#pragma unroll
        for (int chunk = 0; chunk < DB / VC; ++chunk) {
            const i64 c0 = dv0 + chunk * VC;
            if (c0 >= p.Dv) break;  // uniform
            T pv[RPT][VC / 16];
#pragma unroll
            for (int a = 0; a < RPT; ++a)
#pragma unroll
                for (int c = 0; c < VC / 16; ++c) pv[a][c] = T(0);
            smem_times_rows<T, BQ, BK, VC, false>(pv, ps, BK + 1, v_row, c0, p.Dv, vs);
#pragma unroll
            for (int a = 0; a < RPT; ++a)
#pragma unroll
                for (int c = 0; c < VC / 16; ++c) acc[a][chunk * (VC / 16) + c] += (double)pv[a][c];
        }
    }

    // 4. out = acc / l (and the sink's share), lse = m + log l
    T* out = static_cast<T*>(p.out);
#pragma unroll
    for (int a = 0; a < RPT; ++a) {
        const i64 i = i0 + ty + 16 * a;
        if (i >= p.Sq) continue;
        const i64 row = (b * p.Hq + h) * p.Sq + i;
        const double lse = l[a] > 0.0 ? m[a] + log(l[a]) : neg_inf();
        double f = l[a] > 0.0 ? 1.0 / l[a] : 0.0;
        if (p.sinks && l[a] > 0.0) f /= 1.0 + exp(p.sinks[h] - lse);
#pragma unroll
        for (int c = 0; c < DB / 16; ++c) {
            const i64 col = dv0 + tx + 16 * c;
            if (col < p.Dv) out[row * p.Dv + col] = T(acc[a][c] * f);
        }
        if (dv0 == 0 && tx == 0) p.lse[row] = lse;
    }
}

#define REFATTN_INSTANTIATE(T, SUFFIX, BQ, BK)                                                     \
    extern "C" __global__ void __launch_bounds__(REFATTN_THREADS)                                  \
        attend_forward_##SUFFIX(const AttendParams* __restrict__ params) {                         \
        attend_forward<T, BQ, BK>(*params);                                                        \
    }
