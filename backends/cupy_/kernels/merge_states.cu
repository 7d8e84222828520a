// merge_states.cu -- merge two partial attention states over disjoint key sets (VARIANTS C):
//   lse = logaddexp(lse_a, lse_b),  out = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)
// A part with lse = -inf contributes nothing; both empty gives (0, -inf). One thread per output
// element (row, column); the column-0 thread of a row also writes its lse.

template <typename T>
__device__ __forceinline__ void merge_states(const MergeParams& p) {
    const i64 width = p.Dv > 0 ? p.Dv : 1;
    const i64 e = (i64)blockIdx.x * REFATTN_THREADS + threadIdx.x;
    if (e >= p.rows * width) return;  // no barrier in this kernel: an early exit is safe
    const i64 row = e / width, col = e % width;
    const double a = p.lse_a[row], b = p.lse_b[row];
    const double hi = fmax(a, b);
    double lse = neg_inf(), wa = 0.0, wb = 0.0;
    if (hi != neg_inf()) {
        lse = hi + log1p(exp(fmin(a, b) - hi));  // numpy's logaddexp
        wa = exp(a - lse);
        wb = exp(b - lse);
    }
    if (col < p.Dv) {
        const T* oa = static_cast<const T*>(p.o_a);
        const T* ob = static_cast<const T*>(p.o_b);
        static_cast<T*>(p.out)[e] = T((double)oa[e] * wa + (double)ob[e] * wb);
    }
    if (col == 0) p.lse[row] = lse;
}

#define REFATTN_INSTANTIATE(T, SUFFIX)                                                             \
    extern "C" __global__ void __launch_bounds__(REFATTN_THREADS)                                  \
        merge_states_##SUFFIX(const MergeParams* __restrict__ params) {                            \
        merge_states<T>(*params);                                                                  \
    }
