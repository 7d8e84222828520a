// attend_backward.cu -- FlashAttention-2 backward without atomics: every output element has one
// owner block, and every sum is taken in a fixed order (deterministic).
//
//   attend_backward_kv: block (tj, hkv, b * ncb + cb) owns key tile tj of KV head hkv: dK and dV rows
//       j0 .. j0 + BK, columns c0 = cb * DB .. c0 + DB. It loops over the query heads that read hkv
//       (GQA sums there) and their non-empty query tiles (k_tile_lo[tj] <= ti < k_tile_hi[tj]).
//   attend_backward_q: block (ti, h, b * ncb + cb) owns dQ rows i0 .. i0 + BQ of head h, columns
//       c0 .. c0 + DB, looping over the non-empty key tiles of query tile ti.
//
// Both recompute each tile (gradient_tile) from the saved LSE -- the LSE including the sink, so
// P = exp(w - lse) is the probability the forward used:
//   dP = dO V^T,  dP' = keep ? dP / (1 - p) : 0,  P' = keep ? P / (1 - p) : 0
//   dS = P * (dP' - delta), delta = rowsum(dO * O)       (gradient w.r.t. the modified score)
//   dbias += dS;  with softcap dS *= 1 - t^2             (back to scale * q.k)
//   dV += P'^T dO;  dK += scale * dS^T Q;  dQ += scale * dS K
// The bias gradient goes to dbias_part (B, Hq, bias_i, dbias_j): the kv block owning (b, h, tj) is
// the only writer of its elements; the host sums the partials down to the bias's shape.

// Shared memory of one backward block.
template <typename T, int BQ, int BK>
struct BackwardShared {
    static constexpr int DK = 16;  // head-dim chunk of Q K^T and dO V^T
    static constexpr int VC = 32;  // columns per chunk of the accumulating products
    T xs[BQ * (DK + 1)];
    T ys[BK * (DK + 1)];
    T pu[BQ * (BK + 1)];           // P' (dropout applied): feeds dV
    T ds[BQ * (BK + 1)];           // dS (after the softcap factor): feeds dQ and dK
    double dsb[BQ * (BK + 1)];     // dS before the softcap factor: the bias gradient
    T cs[(BQ > BK ? BQ : BK) * (VC + 1)];
};

// Recompute tile (ti, tj) of head h into sm.pu, sm.ds (and sm.dsb); add the bias gradient when asked.
template <typename T, int BQ, int BK>
__device__ __forceinline__ void gradient_tile(const AttendParams& p, BackwardShared<T, BQ, BK>& sm,
                                              i64 b, i64 h, i64 hkv, i64 ti, i64 tj, int code,
                                              bool want_dbias) {
    constexpr int DK = BackwardShared<T, BQ, BK>::DK;
    constexpr int RPT = BQ / 16, CPT = BK / 16;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const i64 i0 = ti * BQ, j0 = tj * BK;
    auto q_row = [&](int r) { return query_row<T>(p, p.q, b, h, i0 + r, p.D); };
    auto do_row = [&](int r) { return query_row<T>(p, p.dout, b, h, i0 + r, p.Dv); };
    auto k_row = [&](int r) { return key_row<T>(p, p.k, b, hkv, j0 + r, p.D); };
    auto v_row = [&](int r) { return key_row<T>(p, p.v, b, hkv, j0 + r, p.Dv); };

    T s[RPT][CPT], dp[RPT][CPT];
#pragma unroll
    for (int a = 0; a < RPT; ++a)
#pragma unroll
        for (int c = 0; c < CPT; ++c) s[a][c] = dp[a][c] = T(0);
    rows_times_rows<T, BQ, BK, DK>(s, q_row, k_row, p.D, sm.xs, sm.ys);
    rows_times_rows<T, BQ, BK, DK>(dp, do_row, v_row, p.Dv, sm.xs, sm.ys);
    __syncthreads();  // the previous tile's products are done with pu, ds, dsb (even when D == Dv == 0)

#pragma unroll
    for (int a = 0; a < RPT; ++a) {
        const int r = ty + 16 * a;
        const i64 i = i0 + r;
        const i64 row = (b * p.Hq + h) * p.Sq + i;
        const double lse = i < p.Sq ? p.lse[row] : neg_inf();
        const double delta = i < p.Sq ? p.delta[row] : 0.0;
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
            const int cc = tx + 16 * c;
            const i64 j = j0 + cc;
            double pu = 0.0, dsb = 0.0, ds = 0.0;
            if (visible(p, code, b, h, ti, tj, i, j) && lse != neg_inf()) {
                double t = 0.0;
                const double w = modified_score(p, (double)s[a][c], b, h, i, j, &t);
                const double pr = exp(w - lse);
                double dpr = (double)dp[a][c];
                pu = pr;
                if (p.dropout != DROP_NONE) {
                    const bool keep = kept(p, b, h, i, j);
                    pu = keep ? pr * p.drop_scale : 0.0;
                    dpr = keep ? dpr * p.drop_scale : 0.0;
                }
                dsb = pr * (dpr - delta);
                ds = p.softcap > 0.0 ? dsb * (1.0 - t * t) : dsb;
            }
            sm.pu[r * (BK + 1) + cc] = T(pu);
            sm.ds[r * (BK + 1) + cc] = T(ds);
            sm.dsb[r * (BK + 1) + cc] = dsb;
        }
    }
    if (!want_dbias) return;  // uniform

    // The bias gradient of this tile, summed over the bias's broadcast row/key axes.
    __syncthreads();
    const i64 base = (b * p.Hq + h) * p.bias_i;
    if (p.bias_i > 1 && p.bias_j > 1) {
        for (int e = tid; e < BQ * BK; e += REFATTN_THREADS) {
            const int r = e / BK, cc = e % BK;
            if (i0 + r < p.Sq && j0 + cc < p.Sk)
                p.dbias_part[(base + i0 + r) * p.dbias_j + j0 + cc] += sm.dsb[r * (BK + 1) + cc];
        }
    } else if (p.bias_j > 1) {  // no row axis: column sums
        for (int cc = tid; cc < BK; cc += REFATTN_THREADS) {
            double sum = 0.0;
            for (int r = 0; r < BQ; ++r) sum += sm.dsb[r * (BK + 1) + cc];
            if (j0 + cc < p.Sk) p.dbias_part[base * p.dbias_j + j0 + cc] += sum;
        }
    } else if (p.bias_i > 1) {  // no key axis: row sums, one column per key tile
        for (int r = tid; r < BQ; r += REFATTN_THREADS) {
            double sum = 0.0;
            for (int cc = 0; cc < BK; ++cc) sum += sm.dsb[r * (BK + 1) + cc];
            if (i0 + r < p.Sq) p.dbias_part[(base + i0 + r) * p.dbias_j + tj] += sum;
        }
    } else if (tid == 0) {      // neither: one sum per key tile
        double sum = 0.0;
        for (int e = 0; e < BQ * BK; ++e) sum += sm.dsb[(e / BK) * (BK + 1) + e % BK];
        p.dbias_part[base * p.dbias_j + tj] += sum;
    }
}

template <typename T, int BQ, int BK>
__device__ __forceinline__ void attend_backward_kv(const AttendParams& p) {
    typedef BackwardShared<T, BQ, BK> Shared;
    constexpr int VC = Shared::VC, DB = REFATTN_COLUMNS_PER_BLOCK, RPT = BK / 16;
    static_assert(BQ % 16 == 0 && BK % 16 == 0 && DB % VC == 0, "tile shape");
    static_assert(sizeof(Shared) <= 48 * 1024, "static shared memory");
    __shared__ Shared sm;
    if (p.block_q != BQ || p.block_k != BK) __trap();

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const i64 width = p.D > p.Dv ? p.D : p.Dv;
    const i64 ncb = (width + DB - 1) / DB > 0 ? (width + DB - 1) / DB : 1;
    const i64 tj = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z / ncb, c0 = (blockIdx.z % ncb) * DB;
    const i64 j0 = tj * BK;

    double dk[RPT][DB / 16], dv[RPT][DB / 16];
#pragma unroll
    for (int a = 0; a < RPT; ++a)
#pragma unroll
        for (int c = 0; c < DB / 16; ++c) dk[a][c] = dv[a][c] = 0.0;

    for (i64 g = p.group_ptr[hkv]; g < p.group_ptr[hkv + 1]; ++g) {
        const i64 h = p.group_idx[g];
        for (i64 ti = p.k_tile_lo[tj]; ti < p.k_tile_hi[tj]; ++ti) {
            const int code = tile_code(p, b, h, ti, tj);
            if (code == TILE_EMPTY) continue;
            const i64 i0 = ti * BQ;
            gradient_tile<T, BQ, BK>(p, sm, b, h, hkv, ti, tj, code, p.dbias_part && c0 == 0);
            auto q_row = [&](int r) { return query_row<T>(p, p.q, b, h, i0 + r, p.D); };
            auto do_row = [&](int r) { return query_row<T>(p, p.dout, b, h, i0 + r, p.Dv); };
#pragma unroll
            for (int chunk = 0; chunk < DB / VC; ++chunk) {
                const i64 col = c0 + chunk * VC;
                if (col < p.Dv) {  // uniform
                    T t[RPT][VC / 16];
#pragma unroll
                    for (int a = 0; a < RPT; ++a)
#pragma unroll
                        for (int c = 0; c < VC / 16; ++c) t[a][c] = T(0);
                    smem_times_rows<T, BK, BQ, VC, true>(t, sm.pu, BK + 1, do_row, col, p.Dv, sm.cs);
#pragma unroll
                    for (int a = 0; a < RPT; ++a)
#pragma unroll
                        for (int c = 0; c < VC / 16; ++c) dv[a][chunk * (VC / 16) + c] += (double)t[a][c];
                }
                if (col < p.D) {
                    T t[RPT][VC / 16];
#pragma unroll
                    for (int a = 0; a < RPT; ++a)
#pragma unroll
                        for (int c = 0; c < VC / 16; ++c) t[a][c] = T(0);
                    smem_times_rows<T, BK, BQ, VC, true>(t, sm.ds, BK + 1, q_row, col, p.D, sm.cs);
#pragma unroll
                    for (int a = 0; a < RPT; ++a)
#pragma unroll
                        for (int c = 0; c < VC / 16; ++c) dk[a][chunk * (VC / 16) + c] += (double)t[a][c];
                }
            }
        }
    }

    T* dk_out = static_cast<T*>(p.dk);
    T* dv_out = static_cast<T*>(p.dv);
#pragma unroll
    for (int a = 0; a < RPT; ++a) {
        const i64 j = j0 + ty + 16 * a;
        if (j >= p.Sk) continue;
        const i64 row = (b * p.Hkv + hkv) * p.Sk + j;
#pragma unroll
        for (int c = 0; c < DB / 16; ++c) {
            const i64 col = c0 + tx + 16 * c;
            if (col < p.D) dk_out[row * p.D + col] = T(p.scale * dk[a][c]);
            if (col < p.Dv) dv_out[row * p.Dv + col] = T(dv[a][c]);
        }
    }
}

template <typename T, int BQ, int BK>
__device__ __forceinline__ void attend_backward_q(const AttendParams& p) {
    typedef BackwardShared<T, BQ, BK> Shared;
    constexpr int VC = Shared::VC, DB = REFATTN_COLUMNS_PER_BLOCK, RPT = BQ / 16;
    static_assert(sizeof(Shared) <= 48 * 1024, "static shared memory");
    __shared__ Shared sm;
    if (p.block_q != BQ || p.block_k != BK) __trap();

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const i64 ncb = (p.D + DB - 1) / DB > 0 ? (p.D + DB - 1) / DB : 1;
    const i64 ti = blockIdx.x, h = blockIdx.y, b = blockIdx.z / ncb, c0 = (blockIdx.z % ncb) * DB;
    const i64 i0 = ti * BQ, hkv = p.head_map[h];

    double dq[RPT][DB / 16];
#pragma unroll
    for (int a = 0; a < RPT; ++a)
#pragma unroll
        for (int c = 0; c < DB / 16; ++c) dq[a][c] = 0.0;

    for (i64 tj = p.q_tile_lo[ti]; tj < p.q_tile_hi[ti]; ++tj) {
        const int code = tile_code(p, b, h, ti, tj);
        if (code == TILE_EMPTY) continue;
        const i64 j0 = tj * BK;
        gradient_tile<T, BQ, BK>(p, sm, b, h, hkv, ti, tj, code, false);
        auto k_row = [&](int r) { return key_row<T>(p, p.k, b, hkv, j0 + r, p.D); };
#pragma unroll
        for (int chunk = 0; chunk < DB / VC; ++chunk) {
            const i64 col = c0 + chunk * VC;
            if (col >= p.D) break;  // uniform
            T t[RPT][VC / 16];
#pragma unroll
            for (int a = 0; a < RPT; ++a)
#pragma unroll
                for (int c = 0; c < VC / 16; ++c) t[a][c] = T(0);
            smem_times_rows<T, BQ, BK, VC, false>(t, sm.ds, BK + 1, k_row, col, p.D, sm.cs);
#pragma unroll
            for (int a = 0; a < RPT; ++a)
#pragma unroll
                for (int c = 0; c < VC / 16; ++c) dq[a][chunk * (VC / 16) + c] += (double)t[a][c];
        }
    }

    T* dq_out = static_cast<T*>(p.dq);
#pragma unroll
    for (int a = 0; a < RPT; ++a) {
        const i64 i = i0 + ty + 16 * a;
        if (i >= p.Sq) continue;
        const i64 row = (b * p.Hq + h) * p.Sq + i;
#pragma unroll
        for (int c = 0; c < DB / 16; ++c) {
            const i64 col = c0 + tx + 16 * c;
            if (col < p.D) dq_out[row * p.D + col] = T(p.scale * dq[a][c]);
        }
    }
}

#define REFATTN_INSTANTIATE(T, SUFFIX, BQ, BK)                                                     \
    extern "C" __global__ void __launch_bounds__(REFATTN_THREADS)                                  \
        attend_backward_kv_##SUFFIX(const AttendParams* __restrict__ params) {                     \
        attend_backward_kv<T, BQ, BK>(*params);                                                    \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(REFATTN_THREADS)                                  \
        attend_backward_q_##SUFFIX(const AttendParams* __restrict__ params) {                      \
        attend_backward_q<T, BQ, BK>(*params);                                                     \
    }
