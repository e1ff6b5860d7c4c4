// router_stats.cu: router statistics in one pass over the logits and the routing.
//
// Mirrors src/cpu/router_stats.rs: per token (valid = not padding) the count of
// non-finite logits, the entropy and logsumexp of entropy_lse_row (max with NaN
// winning, `rest` = Σ exp(z − m) over every entry but the first maximum, ln s =
// log1p(rest), H = Σ_{p ≠ 0} p · (ln s − (z − m)), lse = m + ln s or +inf when
// m = +inf), and the selected / kept counts
// and dropped assignments from `indices` / `slots`.
//
// Determinism: the float sums are f64 partials per chunk of tokens (one workspace
// row per group, no atomics) combined by `router_stats_finalize` in a fixed order;
// per-expert counts are integer atomics (order-independent). Indices outside
// [0, E) are skipped, as on the CPU, so nothing is written out of range.
//
// Layout: common.cuh's expert slots, a group of NT threads per token, thread `tid`
// owning experts `e = i * NT + tid`, `i < SLOTS` (NT = 32 for num_experts <= 256, 4
// groups per 128-thread block; NT = 256 for <= 2048).
//
// @entries: router_stats_pass router_stats_pass_large
// @untyped: router_stats_finalize
#include "common.cuh"

// Workspace row (f64): entropy Σ, lse Σ, lse max, valid, non-finite, dropped.
#define ROW 6  // @host usize

// Kernel parameters, taken by value: build.rs fails the build unless the #[repr(C)]
// `StatsParams` in src/cuda/router_stats.rs has these fields, in this order, with these types.
// @host-struct: src/cuda/router_stats.rs
struct StatsParams {
    int num_tokens;
    int num_experts;
    int topk;
    int chunk;  // tokens per workspace row
    int num_rows;
    int has_slots;
    int has_mask;
    int pad;  // to a multiple of 8 bytes, as the Rust struct
};

__device__ __forceinline__ double nan_max_d(double a, double b) {
    if (a != a || b != b) return MOE_NAN;
    return a > b ? a : b;
}

template <int NT, typename T>
__device__ __forceinline__ void stats_chunk(const T* __restrict__ logits,
                                            const int* __restrict__ indices,
                                            const int* __restrict__ slots,
                                            const unsigned char* __restrict__ mask,
                                            const StatsParams& P, int gi, int tid, u64* scratch,
                                            double* __restrict__ ws,
                                            unsigned long long* __restrict__ selected,
                                            unsigned long long* __restrict__ kept) {
    const int E = P.num_experts, k = P.topk;
    const long long t0 = (long long)gi * P.chunk;
    const long long t1 = t0 + P.chunk < P.num_tokens ? t0 + P.chunk : (long long)P.num_tokens;
    double h_sum = 0.0, lse_sum = 0.0, lse_max = MOE_NEG_INF;
    int valid = 0, nonfinite = 0, dropped = 0;
    for (long long t = t0; t < t1; ++t) {
        if (P.has_mask && mask[t] != 0) continue;  // group-uniform
        valid += 1;
        const T* row = logits + t * (long long)E;
        float z[SLOTS];
        int nf = 0;
        float lm = MOE_NEG_INF;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            int e = i * NT + tid;
            z[i] = e < E ? to_f32(row[e]) : MOE_NEG_INF;
            if (e < E) {
                nf += isfinite(z[i]) ? 0 : 1;
                lm = nan_max(lm, z[i]);
            }
        }
        nonfinite += GroupReduce<NT>::sum_int(nf, scratch);
        const float m = GroupReduce<NT>::nan_max_f(lm, scratch);
        // First index holding the max (none when m is NaN: NaN == NaN is false).
        u64 fk = 0;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            int e = i * NT + tid;
            if (e < E && z[i] == m) {
                u64 key = (u64)(0xffffffffu - (u32)e);
                fk = key > fk ? key : fk;
            }
        }
        fk = GroupReduce<NT>::max_u64(fk, scratch);
        const int first = fk == 0 ? -1 : (int)(0xffffffffu - (u32)fk);
        float ex[SLOTS], lr = 0.0f;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            int e = i * NT + tid;
            ex[i] = 0.0f;
            if (e < E) {
                ex[i] = expf(z[i] - m);
                lr += e == first ? ex[i] - 1.0f : ex[i];
            }
        }
        const float rest = GroupReduce<NT>::sum_f(lr, scratch);
        const float inv = 1.0f / (1.0f + rest);
        const float ln_s = log1pf(rest);
        float lh = 0.0f;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            int e = i * NT + tid;
            if (e < E) {
                float p = ex[i] * inv;
                if (p != 0.0f) lh += p * (ln_s - (z[i] - m));
            }
        }
        const float h = GroupReduce<NT>::sum_f(lh, scratch);
        // +inf for a max of +inf (ln_s is NaN then), as the CPU and torch.logsumexp.
        const float lse = (isinf(m) && m > 0.0f) ? m : m + ln_s;
        h_sum += (double)h;
        lse_sum += (double)lse;
        lse_max = nan_max_d(lse_max, (double)lse);
        // Counts: thread j < k handles choice j (NT >= 32 >= ... loops for larger k).
        for (int j = tid; j < k; j += NT) {
            const int e = indices[t * k + j];
            if (e < 0 || e >= E) continue;
            atomicAdd(&selected[e], 1ull);
            if (P.has_slots) {
                if (slots[t * k + j] >= 0) atomicAdd(&kept[e], 1ull);
                else dropped += 1;
            }
        }
    }
    dropped = GroupReduce<NT>::sum_int(dropped, scratch);
    if (tid == 0) {
        double* r = ws + (long long)gi * ROW;
        r[0] = h_sum;
        r[1] = lse_sum;
        r[2] = lse_max;
        r[3] = (double)valid;
        r[4] = (double)nonfinite;
        r[5] = (double)dropped;
    }
}

// Finalize: one 256-thread block. Adds the workspace rows (strided, then a fixed
// tree), reads the integer counts, writes
//   out_i64 [4]: valid tokens, dropped, non-finite logits, Σ selected
//   out_f32 [4]: max_violation, mean entropy, mean lse, max lse
extern "C" __global__ void __launch_bounds__(256)
    router_stats_finalize(StatsParams P, const double* __restrict__ ws,
                          const unsigned long long* __restrict__ selected,
                          long long* __restrict__ out_i64, float* __restrict__ out_f32) {
    __shared__ double red[5][256];
    __shared__ double red_dr[256];
    __shared__ unsigned long long cmax[256], csum[256];
    const int tid = threadIdx.x;
    double h = 0.0, ls = 0.0, lm = MOE_NEG_INF, v = 0.0, nf = 0.0, dr = 0.0;
    for (int r = tid; r < P.num_rows; r += 256) {
        const double* w = ws + (long long)r * ROW;
        h += w[0];
        ls += w[1];
        lm = nan_max_d(lm, w[2]);
        v += w[3];
        nf += w[4];
        dr += w[5];
    }
    unsigned long long mx = 0, sm = 0;
    for (int e = tid; e < P.num_experts; e += 256) {
        unsigned long long c = selected[e];
        mx = c > mx ? c : mx;
        sm += c;
    }
    red[0][tid] = h;
    red[1][tid] = ls;
    red[2][tid] = lm;
    red[3][tid] = v;
    red[4][tid] = nf;
    red_dr[tid] = dr;
    cmax[tid] = mx;
    csum[tid] = sm;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (tid < w) {
            red[0][tid] += red[0][tid + w];
            red[1][tid] += red[1][tid + w];
            red[2][tid] = nan_max_d(red[2][tid], red[2][tid + w]);
            red[3][tid] += red[3][tid + w];
            red[4][tid] += red[4][tid + w];
            red_dr[tid] += red_dr[tid + w];
            cmax[tid] = cmax[tid + w] > cmax[tid] ? cmax[tid + w] : cmax[tid];
            csum[tid] += csum[tid + w];
        }
        __syncthreads();
    }
    if (tid == 0) {
        const double valid = red[3][0];
        const unsigned long long total = csum[0];
        out_i64[0] = (long long)valid;
        out_i64[1] = (long long)red_dr[0];
        out_i64[2] = (long long)red[4][0];
        out_i64[3] = (long long)total;
        double viol = 0.0;
        if (total != 0 && P.num_experts != 0) {
            const double mean = (double)total / (double)P.num_experts;
            viol = (double)cmax[0] / mean - 1.0;
        }
        out_f32[0] = (float)viol;
        if (valid == 0.0) {
            out_f32[1] = 0.0f;
            out_f32[2] = 0.0f;
            out_f32[3] = 0.0f;
        } else {
            out_f32[1] = (float)(red[0][0] / valid);
            out_f32[2] = (float)(red[1][0] / valid);
            out_f32[3] = (float)red[2][0];
        }
    }
}

#define STATS_ENTRIES(SUFFIX, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) router_stats_pass_##SUFFIX(               \
        const T* logits, const int* indices, const int* slots, const unsigned char* mask,       \
        StatsParams P, double* ws, unsigned long long* selected, unsigned long long* kept) {     \
        const int gi = blockIdx.x * WARP_GROUPS_PER_BLOCK + (threadIdx.x >> 5);                  \
        if (gi >= P.num_rows) return;                                                            \
        stats_chunk<32, T>(logits, indices, slots, mask, P, gi, threadIdx.x & 31, nullptr, ws,   \
                           selected, kept);                                                      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) router_stats_pass_large_##SUFFIX(         \
        const T* logits, const int* indices, const int* slots, const unsigned char* mask,       \
        StatsParams P, double* ws, unsigned long long* selected, unsigned long long* kept) {     \
        __shared__ u64 scratch[256 / 32];                                                        \
        const int gi = blockIdx.x;                                                               \
        if (gi >= P.num_rows) return;                                                            \
        stats_chunk<256, T>(logits, indices, slots, mask, P, gi, threadIdx.x, scratch, ws,       \
                            selected, kept);                                                     \
    }

STATS_ENTRIES(f32, float)
STATS_ENTRIES(f16, f16_t)
STATS_ENTRIES(bf16, bf16_t)
