// losses.cu: auxiliary load-balance loss (Switch/GShard, sequence-level) and router
// z-loss, forward and backward.
//
// Mirrors src/cpu/aux_loss.rs and src/cpu/z_loss.rs: the same f32 per-token formulas
// (softmax with the max shift, sigmoid / (Σ sigmoid + 1e-20), lse = m + ln s, or +inf
// for a row whose max is +inf), the same u64 rank keys for the plain top-k counts, f64
// sums over tokens, and the same f64 expressions for the loss scale. Sums over the
// experts of one token are fixed trees (they may differ from the CPU's sequential sums
// by rounding only).
//
// Forward: ONE pass over the logits (`losses_fwd`) computes, per chunk of tokens, the
// f64 partial sums Σ_t P[t, e], the top-k counts (exact small integers, stored as
// f64), Σ_t lse_t² and the valid-token count, and writes them to a workspace row of
// its own (no atomics, every row fully written). `losses_reduce` (one block per
// segment) adds the rows of a segment in chunk order and computes the segment's
// loss; `losses_finalize` (one thread) averages the segments in order. Everything
// is deterministic: the same input gives bitwise the same output.
//
// Layout of a pass over tokens: common.cuh's expert slots, a group of NT threads per
// token, thread `tid` owning experts `e = i * NT + tid`, `i < SLOTS`. NT = 32 (one
// warp, 4 per 128-thread block) for num_experts <= 256, NT = 256 (one block) for <= 2048.
//
// Entry points (build.rs reads these lines):
// @entries: losses_fwd losses_fwd_large aux_loss_bwd aux_loss_bwd_large z_loss_bwd z_loss_bwd_large
// @untyped: losses_reduce losses_finalize aux_loss_bwd_prep
#include "common.cuh"

#define SIGMOID_NORM_EPS 1e-20f

// Kernel parameters, taken by value: build.rs fails the build unless the #[repr(C)]
// `LossParams` in src/cuda/losses.rs has these fields, in this order, with these types.
// @host-struct: src/cuda/losses.rs
struct LossParams {
    double total_override;  // > 0: T_total of the global loss (counts cover a larger batch)
    float aux_coeff;
    float z_coeff;
    int num_tokens;
    int num_experts;
    int seq_len;         // tokens per segment (num_tokens for the global loss)
    int num_segments;
    int chunk;           // tokens per workspace row
    int chunks_per_seg;  // rows per segment
    int topk;            // k of the loss scale
    int count_topk;      // 1: count the plain top-k; 0: counts given by the caller
    int sigmoid;         // aux scores: 0 softmax, 1 sigmoid-normalised
    int want_aux;
    int want_z;
    int has_mask;
    int seq_mode;        // 1: sequence-level (average over segments with valid tokens)
};

// Workspace layout (f64):
//   rows     [num_segments * chunks_per_seg][2E + 2]: Σ P per expert, counts per
//            expert, Σ lse², valid tokens
//   segments [num_segments][3]: segment loss, valid tokens, Σ lse²
__device__ __forceinline__ long long row_len(const LossParams& P) {
    return 2LL * P.num_experts + 2;
}

// Aux scores of a row into p (0 for e >= E), given the softmax statistics for the
// softmax router. The CPU's aux_scores_row.
template <int NT>
__device__ __forceinline__ void aux_scores(const float* z, int E, int tid, u64* scratch,
                                           int sigmoid, float m, float s, float* p) {
    if (!sigmoid) {
        float inv = 1.0f / s;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) p[i] = i * NT + tid < E ? expf(z[i] - m) * inv : 0.0f;
    } else {
        float ls = 0.0f;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            p[i] = i * NT + tid < E ? moe_sigmoid(z[i]) : 0.0f;
            ls += p[i];
        }
        float d = GroupReduce<NT>::sum_f(ls, scratch) + SIGMOID_NORM_EPS;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) p[i] = p[i] / d;
    }
}

// logsumexp from the softmax statistics: m + ln s, or +inf when the max is +inf (s is
// NaN then: exp(inf - inf)), as torch.logsumexp. The CPU's lse_row (src/cpu/z_loss.rs).
__device__ __forceinline__ float lse_of(float m, float s) {
    return (isinf(m) && m > 0.0f) ? m : m + logf(s);
}

__device__ __forceinline__ bool is_padding(const unsigned char* mask, long long t) {
    return mask != nullptr && mask[t] != 0;
}

// ---------------------------------------------------------------------------
// Forward pass over one chunk of tokens (workspace row `gi`).
// ---------------------------------------------------------------------------
template <int NT, typename T>
__device__ __forceinline__ void fwd_chunk(const T* __restrict__ logits,
                                          const unsigned char* __restrict__ mask,
                                          const LossParams& P, int gi, int tid, u64* scratch,
                                          double* __restrict__ ws) {
    const int E = P.num_experts;
    const int seg = gi / P.chunks_per_seg, c = gi - seg * P.chunks_per_seg;
    const long long seg_end = (long long)(seg + 1) * P.seq_len;
    const long long t0 = (long long)seg * P.seq_len + (long long)c * P.chunk;
    const long long t1 = t0 + P.chunk < seg_end ? t0 + P.chunk : seg_end;
    double acc[SLOTS];
    int cnt[SLOTS];
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
        acc[i] = 0.0;
        cnt[i] = 0;
    }
    double zsum = 0.0;
    int valid = 0;
    const bool need_softmax = P.want_z || (P.want_aux && !P.sigmoid);
    for (long long t = t0; t < t1; ++t) {
        if (P.has_mask && is_padding(mask, t)) continue;  // group-uniform
        valid += 1;
        float z[SLOTS];
        load_row<NT, T>(logits + t * (long long)E, E, tid, z);
        float m = 0.0f, s = 1.0f;
        if (need_softmax) softmax_stats<NT>(z, E, tid, scratch, m, s);
        if (P.want_z) {
            double lse = (double)lse_of(m, s);
            zsum += lse * lse;
        }
        if (P.want_aux) {
            float p[SLOTS];
            aux_scores<NT>(z, E, tid, scratch, P.sigmoid, m, s, p);
#pragma unroll
            for (int i = 0; i < SLOTS; ++i) acc[i] += (double)p[i];
            if (P.count_topk) {
                u64 keys[SLOTS];
#pragma unroll
                for (int i = 0; i < SLOTS; ++i) {
                    int e = i * NT + tid;
                    keys[i] = e < E ? rank_key(p[i], (u32)e) : 0ull;
                }
                u32 used = 0;
                for (int r = 0; r < P.topk; ++r) take_max<NT>(keys, used, tid, scratch);
#pragma unroll
                for (int i = 0; i < SLOTS; ++i) cnt[i] += (int)((used >> i) & 1u);
            }
        }
    }
    double* row = ws + (long long)gi * row_len(P);
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
        int e = i * NT + tid;
        if (e < E) {
            row[e] = acc[i];
            row[E + e] = (double)cnt[i];
        }
    }
    if (tid == 0) {
        row[2 * E] = zsum;
        row[2 * E + 1] = (double)valid;
    }
}

template <typename T>
__device__ __forceinline__ void fwd_warp(const T* logits, const unsigned char* mask,
                                         const LossParams& P, double* ws) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gi = blockIdx.x * WARP_GROUPS_PER_BLOCK + warp;
    if (gi >= P.num_segments * P.chunks_per_seg) return;  // warp-uniform
    fwd_chunk<32, T>(logits, mask, P, gi, lane, nullptr, ws);
}

template <typename T>
__device__ __forceinline__ void fwd_block(const T* logits, const unsigned char* mask,
                                          const LossParams& P, double* ws) {
    __shared__ u64 scratch[256 / 32];
    const int gi = blockIdx.x;
    if (gi >= P.num_segments * P.chunks_per_seg) return;  // block-uniform
    fwd_chunk<256, T>(logits, mask, P, gi, threadIdx.x, scratch, ws);
}

// switch_scale of src/cpu/aux_loss.rs: coeff · E / (k · t²) in f64, 0 when t == 0.
__device__ __forceinline__ double switch_scale(int E, int k, double t, float coeff) {
    if (t == 0.0 || k == 0) return 0.0;
    return (double)coeff * (double)E / ((double)k * t * t);
}

// ---------------------------------------------------------------------------
// losses_reduce: one 256-thread block per segment. Adds the segment's workspace rows
// in chunk order; writes scores_sum [seg, E] (f32), counts [seg, E] (i64, the plain
// top-k counts, or a copy of the caller's), total_tokens [seg] (i64: T_total used) and
// the segment's (loss, valid, Σ lse²) to the workspace. total_in: null, or the global
// loss's caller T_total [1] in device memory.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
    losses_reduce(LossParams P, const long long* __restrict__ counts_in,
                  const long long* __restrict__ total_in, double* __restrict__ ws,
                  float* __restrict__ scores_sum, long long* __restrict__ counts_out,
                  long long* __restrict__ total_tokens) {
    __shared__ double prod[MAX_EXPERTS];
    __shared__ double red[256];
    __shared__ double red2[256];
    const int seg = blockIdx.x, tid = threadIdx.x, E = P.num_experts;
    if (seg >= P.num_segments) return;
    const long long rl = row_len(P);
    const double* rows = ws + (long long)seg * P.chunks_per_seg * rl;
    // Σ lse² and valid tokens: strided over the chunks, then a fixed tree.
    double zs = 0.0, vs = 0.0;
    for (int c = tid; c < P.chunks_per_seg; c += 256) {
        zs += rows[c * rl + 2 * E];
        vs += rows[c * rl + 2 * E + 1];
    }
    red[tid] = zs;
    red2[tid] = vs;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (tid < w) {
            red[tid] += red[tid + w];
            red2[tid] += red2[tid + w];
        }
        __syncthreads();
    }
    const double valid = red2[0], zsum = red[0];
    // T_total: the caller's device value (<= 0 counts as 0: loss 0), else its host
    // value, else the valid tokens.
    double total;
    if (total_in != nullptr) total = total_in[0] > 0 ? (double)total_in[0] : 0.0;
    else total = P.total_override > 0.0 ? P.total_override : valid;
    if (P.want_aux) {
        for (int e = tid; e < E && e < MAX_EXPERTS; e += 256) {
            double s = 0.0, n = 0.0;
            for (int c = 0; c < P.chunks_per_seg; ++c) {
                s += rows[c * rl + e];
                n += rows[c * rl + E + e];
            }
            long long ce = P.count_topk ? (long long)n : counts_in[(long long)seg * E + e];
            scores_sum[(long long)seg * E + e] = (float)s;
            counts_out[(long long)seg * E + e] = ce;
            prod[e] = (double)ce * s;
        }
    }
    __syncthreads();
    if (tid == 0) {
        double loss = 0.0;
        if (P.want_aux) {
            double scale = switch_scale(E, P.topk, total, P.aux_coeff);
            if (scale != 0.0) {
                double dot = 0.0;
                for (int e = 0; e < E && e < MAX_EXPERTS; ++e) dot += prod[e];
                loss = scale * dot;
            }
            total_tokens[seg] = (long long)total;
        }
        double* sg = ws + (long long)P.num_segments * P.chunks_per_seg * rl + 3LL * seg;
        sg[0] = loss;
        sg[1] = valid;
        sg[2] = zsum;
    }
}

// losses_finalize: one thread. aux loss = the segment losses averaged over the
// segments with valid tokens (the global loss is one segment), z-loss =
// coeff · Σ lse² / valid.
extern "C" __global__ void losses_finalize(LossParams P, const double* __restrict__ ws,
                                           float* __restrict__ aux_loss,
                                           float* __restrict__ z_loss,
                                           long long* __restrict__ z_valid) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    const double* sg = ws + (long long)P.num_segments * P.chunks_per_seg * row_len(P);
    double total = 0.0, zsum = 0.0, valid = 0.0;
    long long n_valid = 0;
    for (int b = 0; b < P.num_segments; ++b) {
        if (sg[3 * b + 1] > 0.0) {
            total += sg[3 * b];
            n_valid += 1;
        }
        zsum += sg[3 * b + 2];
        valid += sg[3 * b + 1];
    }
    if (P.want_aux) aux_loss[0] = n_valid > 0 ? (float)(total / (double)n_valid) : 0.0f;
    if (P.want_z) {
        z_loss[0] = valid > 0.0 ? (float)((double)P.z_coeff * zsum / valid) : 0.0f;
        z_valid[0] = (long long)valid;
    }
}

// ---------------------------------------------------------------------------
// Backward.
// aux_loss_bwd_prep: one 256-thread block per segment; g [seg, E] (f32, in the
// workspace) = (scale_seg · c_e) rounded to f32, scale_seg = switch_scale(total_seg)
// · grad_loss (/ number of segments with valid tokens, sequence-level), as
// src/ops/aux_loss.rs computes it.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
    aux_loss_bwd_prep(LossParams P, const long long* __restrict__ counts,
                      const long long* __restrict__ total_tokens,
                      const float* __restrict__ grad_loss, float* __restrict__ g) {
    __shared__ int red[256];
    const int seg = blockIdx.x, tid = threadIdx.x, E = P.num_experts;
    if (seg >= P.num_segments) return;
    double scale;
    const double tseg = total_tokens[seg] > 0 ? (double)total_tokens[seg] : 0.0;
    if (P.seq_mode) {
        int n = 0;
        for (int b = tid; b < P.num_segments; b += 256) n += total_tokens[b] > 0 ? 1 : 0;
        red[tid] = n;
        __syncthreads();
        for (int w = 128; w > 0; w >>= 1) {
            if (tid < w) red[tid] += red[tid + w];
            __syncthreads();
        }
        const int n_valid = red[0];
        scale = n_valid == 0 ? 0.0
                             : switch_scale(E, P.topk, tseg, P.aux_coeff) * (double)grad_loss[0] /
                                   (double)n_valid;
    } else {
        scale = switch_scale(E, P.topk, tseg, P.aux_coeff) * (double)grad_loss[0];
    }
    for (int e = tid; e < E; e += 256)
        g[(long long)seg * E + e] = (float)(scale * (double)counts[(long long)seg * E + e]);
}

// Backward of a padding token (group-uniform): its gradient row `out` is zero.
// Returns whether t is padding.
template <int NT, typename T>
__device__ __forceinline__ bool zero_if_padding(const unsigned char* __restrict__ mask,
                                                const LossParams& P, long long t, int tid,
                                                T* __restrict__ out) {
    if (!(P.has_mask && is_padding(mask, t))) return false;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
        if (i * NT + tid < P.num_experts) out[i * NT + tid] = from_f32<T>(0.0f);
    return true;
}

// aux_loss_bwd: one token per group. Softmax: dz = P ⊙ (g − <g, P>). Sigmoid:
// s = σ(z), D = Σ s + 1e-20, dz = ((g − <g, s>/D) / D) ⊙ s(1 − s). Padding: 0.
template <int NT, typename T>
__device__ __forceinline__ void aux_bwd_token(const T* __restrict__ logits,
                                              const unsigned char* __restrict__ mask,
                                              const float* __restrict__ g, const LossParams& P,
                                              long long t, int tid, u64* scratch,
                                              T* __restrict__ grad) {
    const int E = P.num_experts;
    T* out = grad + t * (long long)E;
    if (zero_if_padding<NT, T>(mask, P, t, tid, out)) return;
    const float* gb = g + (t / P.seq_len) * (long long)E;
    float z[SLOTS], ge[SLOTS];
    load_row<NT, T>(logits + t * (long long)E, E, tid, z);
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) ge[i] = i * NT + tid < E ? gb[i * NT + tid] : 0.0f;
    if (!P.sigmoid) {
        float m, s;
        softmax_stats<NT>(z, E, tid, scratch, m, s);
        float p[SLOTS];
        aux_scores<NT>(z, E, tid, scratch, 0, m, s, p);
        float ld = 0.0f;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) ld += ge[i] * p[i];
        float dot = GroupReduce<NT>::sum_f(ld, scratch);
#pragma unroll
        for (int i = 0; i < SLOTS; ++i)
            if (i * NT + tid < E) out[i * NT + tid] = from_f32<T>(p[i] * (ge[i] - dot));
    } else {
        float sv[SLOTS], ls = 0.0f, la = 0.0f;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            sv[i] = i * NT + tid < E ? moe_sigmoid(z[i]) : 0.0f;
            ls += sv[i];
            la += ge[i] * sv[i];
        }
        float d = GroupReduce<NT>::sum_f(ls, scratch) + SIGMOID_NORM_EPS;
        float a = GroupReduce<NT>::sum_f(la, scratch);
        float mean = a / d;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) {
            if (i * NT + tid < E) {
                float ds = (ge[i] - mean) / d;
                out[i * NT + tid] = from_f32<T>(ds * (sv[i] * (1.0f - sv[i])));
            }
        }
    }
}

// z_loss_bwd: scale · lse_t · softmax(z_t), scale = (coeff · 2 · grad_loss / valid)
// rounded to f32 (src/ops/z_loss.rs), 0 when no token is valid. Padding: 0.
template <int NT, typename T>
__device__ __forceinline__ void z_bwd_token(const T* __restrict__ logits,
                                            const unsigned char* __restrict__ mask,
                                            const LossParams& P, float scale, long long t,
                                            int tid, u64* scratch, T* __restrict__ grad) {
    const int E = P.num_experts;
    T* out = grad + t * (long long)E;
    if (zero_if_padding<NT, T>(mask, P, t, tid, out)) return;
    float z[SLOTS], m, s, p[SLOTS];
    load_row<NT, T>(logits + t * (long long)E, E, tid, z);
    softmax_stats<NT>(z, E, tid, scratch, m, s);
    aux_scores<NT>(z, E, tid, scratch, 0, m, s, p);
    const float f = scale * lse_of(m, s);
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
        if (i * NT + tid < E) out[i * NT + tid] = from_f32<T>(f * p[i]);
}

__device__ __forceinline__ float z_scale(const LossParams& P, const float* grad_loss,
                                         const long long* valid) {
    const long long v = valid[0];
    return v > 0 ? (float)((double)P.z_coeff * 2.0 * (double)grad_loss[0] / (double)v) : 0.0f;
}

#define LOSSES_ENTRIES(SUFFIX, T)                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        losses_fwd_##SUFFIX(const T* logits, const unsigned char* mask, LossParams P,           \
                            double* ws) {                                                       \
        fwd_warp<T>(logits, mask, P, ws);                                                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        losses_fwd_large_##SUFFIX(const T* logits, const unsigned char* mask, LossParams P,     \
                                  double* ws) {                                                 \
        fwd_block<T>(logits, mask, P, ws);                                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        aux_loss_bwd_##SUFFIX(const T* logits, const unsigned char* mask, const float* g,       \
                              LossParams P, T* grad) {                                          \
        const long long t = (long long)blockIdx.x * WARP_GROUPS_PER_BLOCK + (threadIdx.x >> 5); \
        if (t >= P.num_tokens) return;                                                          \
        aux_bwd_token<32, T>(logits, mask, g, P, t, threadIdx.x & 31, nullptr, grad);           \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        aux_loss_bwd_large_##SUFFIX(const T* logits, const unsigned char* mask, const float* g, \
                                    LossParams P, T* grad) {                                    \
        __shared__ u64 scratch[256 / 32];                                                       \
        const long long t = blockIdx.x;                                                         \
        if (t >= P.num_tokens) return;                                                          \
        aux_bwd_token<256, T>(logits, mask, g, P, t, threadIdx.x, scratch, grad);               \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(128)                                           \
        z_loss_bwd_##SUFFIX(const T* logits, const unsigned char* mask, const float* grad_loss, \
                            const long long* valid, LossParams P, T* grad) {                    \
        const long long t = (long long)blockIdx.x * WARP_GROUPS_PER_BLOCK + (threadIdx.x >> 5); \
        if (t >= P.num_tokens) return;                                                          \
        z_bwd_token<32, T>(logits, mask, P, z_scale(P, grad_loss, valid), t, threadIdx.x & 31,  \
                           nullptr, grad);                                                      \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(256)                                           \
        z_loss_bwd_large_##SUFFIX(const T* logits, const unsigned char* mask,                   \
                                  const float* grad_loss, const long long* valid, LossParams P, \
                                  T* grad) {                                                    \
        __shared__ u64 scratch[256 / 32];                                                       \
        const long long t = blockIdx.x;                                                         \
        if (t >= P.num_tokens) return;                                                          \
        z_bwd_token<256, T>(logits, mask, P, z_scale(P, grad_loss, valid), t, threadIdx.x,      \
                            scratch, grad);                                                     \
    }

LOSSES_ENTRIES(f32, float)
LOSSES_ENTRIES(f16, f16_t)
LOSSES_ENTRIES(bf16, bf16_t)
