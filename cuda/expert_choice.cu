// expert_choice.cu: expert-choice routing forward and backward
// (src/cpu/expert_choice.rs on the GPU).
//
// 1. expert_choice_softmax: one warp per token, p = softmax(z_t) with the CPU's
//    softmax_row operation order: m = NaN-propagating max (order-free), e_i =
//    exp(z_i - m), s = e_0 + e_1 + ... summed sequentially in expert order (the
//    warp's values handed to every lane in order by shuffles), p_i = e_i * (1 / s).
//    `exp` is evaluated in double and rounded once to f32 (correctly rounded but for
//    pathological double-rounding cases), the closest the GPU gets to the CPU's
//    libm `expf`; a 1-ulp difference remains possible, so selections may differ from
//    the CPU's only between tokens whose p are within an ulp or two. p goes to
//    `weights`, and, when some expert takes fewer than all tokens, transposed
//    ([E, T], f32 bits) into the `row` output as the CPU does (step 4 overwrites it).
// 2. expert_choice_select: one block per expert. taken = min(capacity, T). All
//    tokens taken: rows in token order. Otherwise a 4-pass radix select (common.cuh's
//    radix_select_hi, as dispatch) over score_key(p[t, e]) finds the high
//    word of the taken-th largest rank_key(p, t) and how many tokens with that score
//    are taken (the lowest indices: the low word of rank_key is ~t); a block scan in
//    token order stores row_to_token / row_weights. Unused rows (capacity > T) get
//    -1 / 0. Also tokens_per_expert and expert_offsets.
// 3. expert_choice_fill (row = -1), expert_choice_scatter (row[t, e] from the
//    chosen rows), expert_choice_zero (weights of unchosen (t, e) = 0).
// 4. expert_choice_bwd: one warp per token, p recomputed as in (1), dot = Σ g·p over
//    the chosen experts sequentially in expert order, grad = p * (g - dot).
//
// Token indices read back from row_to_token are bounds-checked before use; `row`
// entries given to the backward count as chosen iff >= 0.
//
// @entries: expert_choice_softmax expert_choice_bwd
// @untyped: expert_choice_select expert_choice_fill expert_choice_scatter expert_choice_zero
#include "common.cuh"

// Tokens per block of the softmax and backward entries, one warp each.
#define EC_WARPS 8  // @host usize
#define EC_SELECT_THREADS 256

// exp in double, rounded once to f32.
__device__ __forceinline__ float exp_f32(float x) { return (float)exp((double)x); }

// softmax statistics of one token, one warp, the sum in expert order (every lane
// gets the same m and inv).
template <typename T>
__device__ __forceinline__ void softmax_stats_seq(const T* __restrict__ z, int E, int lane,
                                                  float& m, float& inv) {
    float mx = MOE_NEG_INF;
    for (int e = lane; e < E; e += 32) mx = nan_max(mx, to_f32(z[e]));
    m = warp_nan_max(mx);
    float s = 0.0f;
    for (int base = 0; base < E; base += 32) {
        const int e = base + lane;
        const float ex = e < E ? exp_f32(to_f32(z[e]) - m) : 0.0f;
        const int cnt = min(32, E - base);
        for (int l = 0; l < cnt; ++l) s += __shfl_sync(FULL_MASK, ex, l);
    }
    inv = 1.0f / s;
}

template <typename T>
__device__ __forceinline__ void softmax_body(const T* __restrict__ logits, int num_tokens, int E,
                                             float* __restrict__ weights, int* __restrict__ pt) {
    const int lane = threadIdx.x & 31;
    const long long nwarps = (long long)gridDim.x * EC_WARPS;
    for (long long t = (long long)blockIdx.x * EC_WARPS + (threadIdx.x >> 5); t < num_tokens;
         t += nwarps) {
        const T* z = logits + t * E;
        float m, inv;
        softmax_stats_seq<T>(z, E, lane, m, inv);
        for (int e = lane; e < E; e += 32) {
            const float p = exp_f32(to_f32(z[e]) - m) * inv;
            weights[t * E + e] = p;
            if (pt != nullptr) pt[(long long)e * num_tokens + t] = __float_as_int(p);
        }
    }
}

#define DEFINE_SOFTMAX(T, NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(32 * EC_WARPS)                          \
        NAME(const T* __restrict__ logits, int num_tokens, int num_experts,              \
             float* __restrict__ weights, int* __restrict__ pt) {                        \
        softmax_body<T>(logits, num_tokens, num_experts, weights, pt);                   \
    }

// ---------------------------------------------------------------------------
// 2. Per expert: its `taken` best tokens in token order. grid = E,
// block = EC_SELECT_THREADS. `pt` is p transposed ([E, T] f32 bits), read only
// when taken > 0.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(EC_SELECT_THREADS)
    expert_choice_select(const int* __restrict__ pt, int num_tokens, int num_experts,
                         int capacity, int* __restrict__ row_to_token,
                         float* __restrict__ row_weights, int* __restrict__ tokens_per_expert,
                         int* __restrict__ expert_offsets) {
    __shared__ int hist[256];
    __shared__ int bc[2];
    __shared__ int sh[EC_SELECT_THREADS / 32];
    const int NT = EC_SELECT_THREADS;
    const long long e = blockIdx.x;
    const int n = num_tokens;
    const int taken = min(capacity, n);
    if (threadIdx.x == 0) {
        tokens_per_expert[e] = taken;
        expert_offsets[e] = (int)(e * capacity);
        if (e == num_experts - 1) expert_offsets[num_experts] = (int)((e + 1) * capacity);
    }
    if (capacity == 0) return;
    int* rt = row_to_token + e * capacity;
    float* rw = row_weights + e * capacity;
    const int* col = pt + e * n;
    if (taken == n) {
        for (int t = threadIdx.x; t < n; t += NT) {
            rt[t] = t;
            rw[t] = __int_as_float(col[t]);
        }
    } else if (taken > 0) {
        auto key = [&](int t) { return score_key(__int_as_float(col[t])); };
        u32 thr;
        int want_eq;
        radix_select_hi<EC_SELECT_THREADS>(key, n, taken, hist, bc, thr, want_eq);
        number_kept<EC_SELECT_THREADS>(key, n, thr, want_eq, sh, [&](int t, int s) {
            if (s >= 0 && s < taken) {
                rt[s] = t;
                rw[s] = __int_as_float(col[t]);
            }
        });
    }
    for (int s = taken + threadIdx.x; s < capacity; s += NT) {
        rt[s] = -1;
        rw[s] = 0.0f;
    }
}

// ---------------------------------------------------------------------------
// 3. row [T, E] from row_to_token; unchosen weights zeroed.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
    expert_choice_fill(int* __restrict__ out, long long n, int value) {
    grid_fill(out, n, value);
}

// One thread per chosen (expert, slot): row[t, e] = e * capacity + s.
extern "C" __global__ void __launch_bounds__(256)
    expert_choice_scatter(const int* __restrict__ row_to_token, int num_tokens, int num_experts,
                          int capacity, int taken, int* __restrict__ row) {
    const long long n = (long long)num_experts * taken;
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        const long long e = i / taken, s = i - e * taken;
        const long long r = e * capacity + s;
        const int t = row_to_token[r];
        if (t >= 0 && t < num_tokens) row[(long long)t * num_experts + e] = (int)r;
    }
}

extern "C" __global__ void __launch_bounds__(256)
    expert_choice_zero(const int* __restrict__ row, float* __restrict__ weights, long long n) {
    for (long long i = grid_start(); i < n; i += grid_stride())
        if (row[i] < 0) weights[i] = 0.0f;
}

// ---------------------------------------------------------------------------
// 4. Backward: grad_z[t] = p ⊙ (g − <g, p>) over the chosen experts (row >= 0).
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void bwd_body(const T* __restrict__ logits, int num_tokens, int E,
                                         const int* __restrict__ row,
                                         const float* __restrict__ grad_weights,
                                         T* __restrict__ grad_logits) {
    const int lane = threadIdx.x & 31;
    const long long nwarps = (long long)gridDim.x * EC_WARPS;
    for (long long t = (long long)blockIdx.x * EC_WARPS + (threadIdx.x >> 5); t < num_tokens;
         t += nwarps) {
        const T* z = logits + t * E;
        const int* r = row + t * E;
        const float* g = grad_weights + t * E;
        float m, inv;
        softmax_stats_seq<T>(z, E, lane, m, inv);
        // dot = Σ g·p over the chosen experts, sequentially in expert order.
        float dot = 0.0f;
        for (int base = 0; base < E; base += 32) {
            const int e = base + lane;
            float prod = 0.0f;
            int chosen = 0;
            if (e < E && r[e] >= 0) {
                chosen = 1;
                prod = g[e] * (exp_f32(to_f32(z[e]) - m) * inv);
            }
            const u32 ballot = __ballot_sync(FULL_MASK, chosen);
            const int cnt = min(32, E - base);
            for (int l = 0; l < cnt; ++l) {
                const float x = __shfl_sync(FULL_MASK, prod, l);
                if ((ballot >> l) & 1u) dot += x;
            }
        }
        for (int e = lane; e < E; e += 32) {
            const float p = exp_f32(to_f32(z[e]) - m) * inv;
            const float ge = r[e] >= 0 ? g[e] : 0.0f;
            grad_logits[t * E + e] = from_f32<T>(p * (ge - dot));
        }
    }
}

#define DEFINE_BWD(T, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(32 * EC_WARPS)                          \
        NAME(const T* __restrict__ logits, int num_tokens, int num_experts,              \
             const int* __restrict__ row, const float* __restrict__ grad_weights,        \
             T* __restrict__ grad_logits) {                                              \
        bwd_body<T>(logits, num_tokens, num_experts, row, grad_weights, grad_logits);   \
    }

DEFINE_SOFTMAX(float, expert_choice_softmax_f32)
DEFINE_SOFTMAX(f16_t, expert_choice_softmax_f16)
DEFINE_SOFTMAX(bf16_t, expert_choice_softmax_bf16)
DEFINE_BWD(float, expert_choice_bwd_f32)
DEFINE_BWD(f16_t, expert_choice_bwd_f16)
DEFINE_BWD(bf16_t, expert_choice_bwd_bf16)
