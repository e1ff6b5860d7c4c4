// topk_gating.cu: top-k gating forward, routing replay and backward.
//
// Mirrors src/cpu/topk_gating.rs (and src/cpu/dropout.rs::expert_mask_row) operation
// by operation: the same f32 formulas, the same u64 rank keys (common.cuh), sums over
// the k selections in the CPU's order. Reductions over all experts (softmax max and
// sum) use a fixed tree, so they may differ from the CPU's sequential sum by rounding
// only, and are bitwise reproducible run to run.
//
// Layout: common.cuh's expert slots, a group of NT threads per token, thread `tid`
// owning experts `e = i * NT + tid` for slot `i < SLOTS` (coalesced loads, the owner
// of expert e is thread e % NT). NT = 32 (one warp per token, 4 tokens per 128-thread
// block) serves num_experts <= 256; NT = 256 (one block per token) serves
// num_experts <= 2048.
// topk <= 32: the j-th selected expert ends in thread j, and the weights are finished
// by the first warp with shuffles.
//
// Entry points (build.rs reads this line):
// @entries: topk_gating_fwd topk_gating_fwd_large topk_gating_replay topk_gating_replay_large topk_gating_bwd topk_gating_bwd_large
#include "common.cuh"

#define MAX_TOPK 32  // @host usize

// Kernel parameters, taken by value: build.rs fails the build unless the #[repr(C)]
// `GatingParams` in src/cuda/topk_gating.rs has these fields, in this order, with these types.
// @host-struct: src/cuda/topk_gating.rs
struct GatingParams {
    u64 noise_seed;
    u64 noise_offset;
    u64 mask_seed;
    u64 mask_offset;
    int num_tokens;
    int num_experts;
    int topk;
    int sigmoid;       // 0: softmax, 1: sigmoid
    int pre_softmax;   // softmax over all experts before selection
    int normalize;     // renormalise the k weights
    int num_groups;    // 0: no group-limited routing
    int group_topk;
    float scaling;
    float noise_std;   // > 0: selection noise on
    float mask_rate;   // > 0: expert masking on
    int has_bias;
};

#define NORM_EPS 1e-20f

// Sequential sum over lanes 0..k-1 of warp values, in lane order (the CPU's order).
__device__ __forceinline__ float warp_seq_sum(float v, int k) {
    float s = 0.0f;
    for (int j = 0; j < k; ++j) s += __shfl_sync(FULL_MASK, v, j);
    return s;
}

// The CPU's max fold over the selected logits: a NaN always replaces.
__device__ __forceinline__ float warp_seq_sel_max(float v, int k) {
    float m = MOE_NEG_INF;
    for (int j = 0; j < k; ++j) {
        float b = __shfl_sync(FULL_MASK, v, j);
        if (b > m || b != b) m = b;
    }
    return m;
}

// Load a token's logits (f32) into slots and compute the base scores p
// (softmax, sigmoid, or z itself for post-softmax).
template <int NT, typename T>
__device__ __forceinline__ void load_scores(const T* row, const GatingParams& P, int tid,
                                            u64* scratch, float* z, float* p, float& m,
                                            float& inv) {
    const int E = P.num_experts;
    load_row<NT, T>(row, E, tid, z);
    m = 0.0f;
    inv = 1.0f;
    if (!P.sigmoid && P.pre_softmax) {
        float s;
        softmax_stats<NT>(z, E, tid, scratch, m, s);
        inv = 1.0f / s;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) p[i] = expf(z[i] - m) * inv;
    } else if (P.sigmoid) {
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) p[i] = moe_sigmoid(z[i]);
    } else {
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) p[i] = z[i];
    }
}

// Top-k selection of one token; returns in thread j (< k) the j-th selected key.
template <int NT>
__device__ __forceinline__ u64 select_token(int t, const float* p, const float* bias,
                                            const GatingParams& P, int tid, u64* scratch) {
    const int E = P.num_experts, k = P.topk;
    const u64 base = (u64)t * (u64)E;
    u64 keys[SLOTS];
    // Expert masking (src/cpu/dropout.rs::expert_mask_row).
    u32 masked = 0;
    if (P.mask_rate > 0.0f) {
        u64 ukey[SLOTS];
        int unmasked;
        masked = expert_mask_draw<NT>(P.mask_seed, P.mask_offset, P.mask_rate, (u64)t, E, tid,
                                      ukey, unmasked);
        int total = GroupReduce<NT>::sum_int(unmasked, scratch);
        u32 used = 0;
        for (int r = total; r < k; ++r) {
            take_max<NT>(ukey, used, tid, scratch);
        }
        masked &= ~used;  // unmasked again
    }
    // Selection scores q = p + bias + noise; masked candidates -inf.
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
        int e = i * NT + tid;
        keys[i] = 0;
        if (e < E) {
            float q = p[i];
            if (P.has_bias) q = q + bias[e];
            if (P.noise_std > 0.0f) {
                float n = philox_normal(P.noise_seed, P.noise_offset, DOMAIN_SELECTION_NOISE,
                                        base + (u64)e);
                q = q + P.noise_std * n;
            }
            if ((masked >> i) & 1u) q = MOE_NEG_INF;
            keys[i] = rank_key(q, (u32)e);
        }
    }
    // Group-limited routing.
    if (P.num_groups > 0) {
        const int G = P.num_groups, per_group = E / G, mg = k / P.group_topk;
        int grp[SLOTS];
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) grp[i] = (i * NT + tid) / per_group;
        u64 gkeys[SLOTS];
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) gkeys[i] = 0;
        u32 used = 0;
        for (int g = 0; g < G; ++g) {
            u64 cand[SLOTS];
#pragma unroll
            for (int i = 0; i < SLOTS; ++i) cand[i] = grp[i] == g ? keys[i] : 0;
            float sum = 0.0f;  // top mg scores of the group, in rank order
            for (int r = 0; r < mg; ++r) sum = sum + key_value(take_max<NT>(cand, used, tid, scratch));
            if (g % NT == tid) {
#pragma unroll
                for (int i = 0; i < SLOTS; ++i)
                    if (i == g / NT) gkeys[i] = rank_key(sum, (u32)g);
            }
        }
        u32 gused = 0, eligible = 0;
        for (int r = 0; r < P.group_topk; ++r) {
            int g = (int)key_index(take_max<NT>(gkeys, gused, tid, scratch));
#pragma unroll
            for (int i = 0; i < SLOTS; ++i)
                if (grp[i] == g) eligible |= 1u << i;
        }
#pragma unroll
        for (int i = 0; i < SLOTS; ++i)
            if (!((eligible >> i) & 1u)) keys[i] = 0;
    }
    u32 used = 0;
    u64 mine = 0;
    for (int j = 0; j < k; ++j) {
        u64 win = take_max<NT>(keys, used, tid, scratch);
        if (tid == j) mine = win;
    }
    return mine;
}

// Raw weights w0 (before normalisation) of the selected experts: lane j < k of the
// first warp holds expert `ej`. All 32 lanes of the warp must call.
template <typename T>
__device__ __forceinline__ float raw_weight(const T* row, const GatingParams& P, int lane, int ej,
                                            float m, float inv, float& zj) {
    const int k = P.topk;
    // A replay index out of range is never dereferenced: its logit reads as NaN.
    const bool in_range = ej >= 0 && ej < P.num_experts;
    zj = lane < k ? (in_range ? to_f32(row[ej]) : MOE_NAN) : 0.0f;
    if (!P.sigmoid && !P.pre_softmax) {
        float mm = warp_seq_sel_max(zj, k);
        float w = expf(zj - mm);
        float s = warp_seq_sum(lane < k ? w : 0.0f, k);
        float r = 1.0f / s;
        return w * r;
    }
    if (P.sigmoid) return moe_sigmoid(zj);
    return expf(zj - m) * inv;
}

template <int NT, typename T, bool REPLAY>
__device__ __forceinline__ void fwd_token(const T* __restrict__ logits, const float* __restrict__ bias,
                                          const int* __restrict__ idx_in, const GatingParams& P, int t,
                                          int tid, u64* scratch, float* __restrict__ weights,
                                          int* __restrict__ indices) {
    const int E = P.num_experts, k = P.topk;
    const T* row = logits + (u64)t * (u64)E;
    float z[SLOTS], p[SLOTS], m, inv;
    load_scores<NT, T>(row, P, tid, scratch, z, p, m, inv);
    int ej = 0;
    if (REPLAY) {
        if (tid < k) ej = idx_in[(u64)t * k + tid];
    } else {
        u64 key = select_token<NT>(t, p, bias, P, tid, scratch);
        if (tid < k) ej = (int)key_index(key);
    }
    if (tid < 32) {  // the first warp finishes the weights
        const int lane = tid;
        float zj;
        float w0 = raw_weight<T>(row, P, lane, ej, m, inv, zj);
        float w;
        if (P.normalize) {
            float d = warp_seq_sum(lane < k ? w0 : 0.0f, k) + NORM_EPS;
            w = w0 / d * P.scaling;
        } else {
            w = w0 * P.scaling;
        }
        if (lane < k) {
            weights[(u64)t * k + lane] = w;
            if (!REPLAY) indices[(u64)t * k + lane] = ej;
        }
    }
}

template <int NT, typename T>
__device__ __forceinline__ void bwd_token(const T* __restrict__ logits, const int* __restrict__ idx_in,
                                          const float* __restrict__ grad_w, const GatingParams& P,
                                          int t, int tid, u64* scratch, int* s_idx, float* s_val,
                                          float* s_dot, T* __restrict__ grad_logits) {
    const int E = P.num_experts, k = P.topk;
    const T* row = logits + (u64)t * (u64)E;
    float z[SLOTS], p[SLOTS], m, inv;
    load_scores<NT, T>(row, P, tid, scratch, z, p, m, inv);
    if (tid < 32) {
        const int lane = tid;
        int ej = lane < k ? idx_in[(u64)t * k + lane] : 0;
        float zj;
        float w0 = raw_weight<T>(row, P, lane, ej, m, inv, zj);
        float gw = lane < k ? grad_w[(u64)t * k + lane] : 0.0f;
        float g0;
        if (P.normalize) {
            float d = warp_seq_sum(lane < k ? w0 : 0.0f, k) + NORM_EPS;
            float dot = warp_seq_sum(lane < k ? gw * P.scaling * w0 : 0.0f, k);
            g0 = gw * P.scaling / d - dot / (d * d);
        } else {
            g0 = gw * P.scaling;
        }
        float val = 0.0f, dot2 = 0.0f;
        if (!P.sigmoid && P.pre_softmax) {
            // w0_j = p[i_j]; dz = p * (g - <g, p>) (the CPU's two-step form)
            dot2 = warp_seq_sum(lane < k ? g0 * w0 : 0.0f, k);
            val = w0 * g0;  // added to -p * dot2 below
        } else if (!P.sigmoid) {
            float dot = warp_seq_sum(lane < k ? g0 * w0 : 0.0f, k);
            val = w0 * (g0 - dot);
        } else {
            val = g0 * w0 * (1.0f - w0);
        }
        if (lane < k) {
            s_idx[lane] = ej;
            s_val[lane] = val;
        }
        if (lane == 0) *s_dot = dot2;
    }
    if (NT == 32) __syncwarp(); else __syncthreads();
    const bool pre = !P.sigmoid && P.pre_softmax;
    const float dot2 = *s_dot;
    T* out = grad_logits + (u64)t * (u64)E;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
        int e = i * NT + tid;
        if (e < E) {
            float v = pre ? -p[i] * dot2 : 0.0f;
            for (int j = 0; j < k; ++j) {
                if (s_idx[j] == e) v = pre ? v + s_val[j] : s_val[j];
            }
            out[e] = from_f32<T>(v);
        }
    }
}

// ---------------------------------------------------------------------------
// Kernels. Warp path: blockDim = 128 (4 tokens), grid = ceil(T / 4).
// Block path ("_large"): blockDim = 256, grid = T.
// ---------------------------------------------------------------------------
template <typename T, bool REPLAY>
__device__ __forceinline__ void fwd_warp(const T* logits, const float* bias, const int* idx_in,
                                         const GatingParams& P, float* weights, int* indices) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * WARP_GROUPS_PER_BLOCK + warp;
    if (t >= P.num_tokens) return;  // warp-uniform
    fwd_token<32, T, REPLAY>(logits, bias, idx_in, P, t, lane, nullptr, weights, indices);
}

template <typename T, bool REPLAY>
__device__ __forceinline__ void fwd_block(const T* logits, const float* bias, const int* idx_in,
                                          const GatingParams& P, float* weights, int* indices) {
    __shared__ u64 scratch[256 / 32];
    const int t = blockIdx.x;
    if (t >= P.num_tokens) return;  // block-uniform
    fwd_token<256, T, REPLAY>(logits, bias, idx_in, P, t, threadIdx.x, scratch, weights, indices);
}

template <typename T>
__device__ __forceinline__ void bwd_warp(const T* logits, const int* idx_in, const float* grad_w,
                                         const GatingParams& P, T* grad_logits) {
    __shared__ int s_idx[WARP_GROUPS_PER_BLOCK][MAX_TOPK];
    __shared__ float s_val[WARP_GROUPS_PER_BLOCK][MAX_TOPK];
    __shared__ float s_dot[WARP_GROUPS_PER_BLOCK];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = blockIdx.x * WARP_GROUPS_PER_BLOCK + warp;
    if (t >= P.num_tokens) return;
    bwd_token<32, T>(logits, idx_in, grad_w, P, t, lane, nullptr, s_idx[warp], s_val[warp],
                     &s_dot[warp], grad_logits);
}

template <typename T>
__device__ __forceinline__ void bwd_block(const T* logits, const int* idx_in, const float* grad_w,
                                          const GatingParams& P, T* grad_logits) {
    __shared__ u64 scratch[256 / 32];
    __shared__ int s_idx[MAX_TOPK];
    __shared__ float s_val[MAX_TOPK];
    __shared__ float s_dot;
    const int t = blockIdx.x;
    if (t >= P.num_tokens) return;
    bwd_token<256, T>(logits, idx_in, grad_w, P, t, threadIdx.x, scratch, s_idx, s_val, &s_dot,
                      grad_logits);
}

#define GATING_ENTRIES(SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        topk_gating_fwd_##SUFFIX(const T* logits, const float* bias, GatingParams P,            \
                                 float* weights, int* indices) {                                \
        fwd_warp<T, false>(logits, bias, nullptr, P, weights, indices);                        \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        topk_gating_fwd_large_##SUFFIX(const T* logits, const float* bias, GatingParams P,      \
                                       float* weights, int* indices) {                          \
        fwd_block<T, false>(logits, bias, nullptr, P, weights, indices);                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        topk_gating_replay_##SUFFIX(const T* logits, const int* indices, GatingParams P,        \
                                    float* weights) {                                           \
        fwd_warp<T, true>(logits, nullptr, indices, P, weights, nullptr);                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        topk_gating_replay_large_##SUFFIX(const T* logits, const int* indices, GatingParams P,  \
                                          float* weights) {                                     \
        fwd_block<T, true>(logits, nullptr, indices, P, weights, nullptr);                     \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        topk_gating_bwd_##SUFFIX(const T* logits, const int* indices, const float* grad_weights, \
                                 GatingParams P, T* grad_logits) {                              \
        bwd_warp<T>(logits, indices, grad_weights, P, grad_logits);                             \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        topk_gating_bwd_large_##SUFFIX(const T* logits, const int* indices,                     \
                                       const float* grad_weights, GatingParams P,               \
                                       T* grad_logits) {                                        \
        bwd_block<T>(logits, indices, grad_weights, P, grad_logits);                            \
    }

GATING_ENTRIES(f32, float)
GATING_ENTRIES(f16, f16_t)
GATING_ENTRIES(bf16, bf16_t)
