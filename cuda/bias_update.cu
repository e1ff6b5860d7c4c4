// bias_update.cu: aux-loss-free balancing (DeepSeek-V3), b_e += rate · sign(mean(c) − c_e).
//
// Mirrors src/cpu/bias_update.rs: the sign is taken exactly in integers as
// sign(Σ_i c_i − E · c_e) in 128-bit two's-complement arithmetic (two 64-bit words;
// NVRTC has no __int128 without an extra flag), so there is no rounding for any i64
// counts, and the update is b + rate, b − rate or b unchanged, in f32. One
// 256-thread block: integer sums are order-independent, so the result is
// deterministic.
//
// @untyped: update_expert_bias
#include "common.cuh"

// Signed 128-bit integer: value = hi * 2^64 + lo, hi signed.
struct i128 {
    long long hi;
    u64 lo;
};

__device__ __forceinline__ i128 add128(i128 a, i128 b) {
    i128 r;
    r.lo = a.lo + b.lo;
    r.hi = a.hi + b.hi + (r.lo < a.lo ? 1 : 0);
    return r;
}

__device__ __forceinline__ i128 from_i64(long long x) {
    i128 r;
    r.lo = (u64)x;
    r.hi = x < 0 ? -1 : 0;
    return r;
}

// n * x for 0 <= n < 2^31 and any i64 x.
__device__ __forceinline__ i128 mul128(int n, long long x) {
    i128 r;
    r.lo = (u64)n * (u64)x;
    r.hi = (long long)__umul64hi((u64)n, (u64)x) - (x < 0 ? (long long)n : 0);
    return r;
}

// sign(a - b)
__device__ __forceinline__ int cmp128(i128 a, i128 b) {
    if (a.hi != b.hi) return a.hi > b.hi ? 1 : -1;
    if (a.lo != b.lo) return a.lo > b.lo ? 1 : -1;
    return 0;
}

extern "C" __global__ void __launch_bounds__(256)
    update_expert_bias(float* __restrict__ bias, const long long* __restrict__ counts,
                       int num_experts, float rate) {
    __shared__ long long red_hi[256];
    __shared__ u64 red_lo[256];
    const int tid = threadIdx.x;
    i128 s = from_i64(0);
    for (int e = tid; e < num_experts; e += 256) s = add128(s, from_i64(counts[e]));
    red_hi[tid] = s.hi;
    red_lo[tid] = s.lo;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (tid < w) {
            i128 a = {red_hi[tid], red_lo[tid]}, b = {red_hi[tid + w], red_lo[tid + w]};
            i128 c = add128(a, b);
            red_hi[tid] = c.hi;
            red_lo[tid] = c.lo;
        }
        __syncthreads();
    }
    const i128 total = {red_hi[0], red_lo[0]};
    for (int e = tid; e < num_experts; e += 256) {
        const int d = cmp128(total, mul128(num_experts, counts[e]));
        if (d > 0) bias[e] = bias[e] + rate;
        else if (d < 0) bias[e] = bias[e] - rate;
    }
}
