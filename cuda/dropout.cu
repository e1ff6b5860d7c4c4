// dropout.cu: expert masking and assignment dropout (forward and backward).
//
// Mirrors src/cpu/dropout.rs bit for bit: the same Philox streams
// (DOMAIN_EXPERT_MASKING at index t * E + e, DOMAIN_ASSIGNMENT_DROPOUT at index
// t * k + j), the same "unmask the largest u, lower index first" rule, and the
// renormalisation sums accumulated in f32 in choice order (one thread per token).
//
// Expert masking: common.cuh's expert slots, a group of NT threads per token, thread
// `tid` owning experts `e = i * NT + tid`, `i < SLOTS` (NT = 32 for num_experts <= 256, 4 tokens per
// 128-thread block; NT = 256, one block per token, for <= 2048).
//
// Indices are never used to address memory here, so out-of-range values (which the
// CPU path rejects) cannot cause an out-of-bounds access: they count as routed.
//
// @untyped: expert_mask expert_mask_large assignment_dropout_fwd assignment_dropout_bwd
#include "common.cuh"

// Kernel parameters, taken by value: build.rs fails the build unless the #[repr(C)]
// `DropoutParams` in src/cuda/dropout.rs has these fields, in this order, with these types.
// @host-struct: src/cuda/dropout.rs
struct DropoutParams {
    u64 seed;
    u64 offset;
    float rate;
    int num_tokens;
    int num_experts;
    int topk;
    int renormalize;
    int pad;  // to a multiple of 8 bytes, as the Rust struct
};

// The `need`-th largest of the group's nonzero keys (keys are distinct, and at least
// `need` of them are nonzero): a binary search on the key bits from the top, one group
// count per bit, so 64 reductions whatever `need` is. (Unmasking one candidate per
// group max, as the CPU once did with a full rescan, cost `need` reductions per token,
// up to E: quadratic in E at rates close to 1.)
template <int NT>
__device__ __forceinline__ u64 kth_largest_key(const u64* key, int need, u64* scratch) {
    u64 thr = 0;
    for (int b = 63; b >= 0; --b) {
        const u64 trial = thr | (1ull << b);
        int c = 0;
#pragma unroll
        for (int i = 0; i < SLOTS; ++i) c += key[i] >= trial ? 1 : 0;
        // Invariant: at least `need` keys are >= thr; the largest such thr is the key.
        if (GroupReduce<NT>::sum_int(c, scratch) >= need) thr = trial;
    }
    return thr;
}

// The CPU's expert_mask_row for token t: masked[e] = 1 when u < rate, then the
// masked candidates with the largest u (ties: lower index) are unmasked until topk
// candidates remain, all at once: the threshold is the (topk - unmasked)-th largest
// rank key of the masked candidates (kth_largest_key), O(SLOTS * 64) per thread.
template <int NT>
__device__ __forceinline__ void mask_token(const DropoutParams& P, long long t, int tid,
                                           u64* scratch, unsigned char* __restrict__ masked) {
    const int E = P.num_experts;
    u64 ukey[SLOTS];
    int unmasked;
    u32 m = expert_mask_draw<NT>(P.seed, P.offset, P.rate, (u64)t, E, tid, ukey, unmasked);
    const int need = P.topk - GroupReduce<NT>::sum_int(unmasked, scratch);
    if (need > 0) {  // group-uniform
        // Unmask the `need` masked candidates with the largest keys (unmasked and
        // out-of-range slots hold key 0, below any masked key).
        const u64 thr = kth_largest_key<NT>(ukey, need, scratch);
#pragma unroll
        for (int i = 0; i < SLOTS; ++i)
            if (ukey[i] >= thr) m &= ~(1u << i);
    }
    unsigned char* row = masked + (long long)t * E;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
        int e = i * NT + tid;
        if (e < E) row[e] = (unsigned char)((m >> i) & 1u);
    }
}

extern "C" __global__ void __launch_bounds__(128)
    expert_mask(DropoutParams P, unsigned char* masked) {
    const long long t = (long long)blockIdx.x * WARP_GROUPS_PER_BLOCK + (threadIdx.x >> 5);
    if (t >= P.num_tokens) return;  // warp-uniform
    mask_token<32>(P, t, threadIdx.x & 31, nullptr, masked);
}

extern "C" __global__ void __launch_bounds__(256)
    expert_mask_large(DropoutParams P, unsigned char* masked) {
    __shared__ u64 scratch[256 / 32];
    const long long t = blockIdx.x;
    if (t >= P.num_tokens) return;  // block-uniform
    mask_token<256>(P, t, threadIdx.x, scratch, masked);
}

__device__ __forceinline__ bool assignment_keep(const DropoutParams& P, long long t, int j) {
    return P.rate <= 0.0f ||
           philox_uniform(P.seed, P.offset, DOMAIN_ASSIGNMENT_DROPOUT,
                          (u64)t * (u64)P.topk + (u64)j) >= P.rate;
}

// Assignment dropout: one thread per token, choices in order (the CPU's loop).
// `dropped` (one u64, zeroed by the launcher) receives the number of routed
// assignments dropped: a per-block integer sum, then one integer atomic per block
// (integer addition is order-independent, so the count is deterministic).
extern "C" __global__ void __launch_bounds__(256)
    assignment_dropout_fwd(DropoutParams P, const int* __restrict__ indices,
                           const float* __restrict__ weights, int* __restrict__ out_indices,
                           float* __restrict__ out_weights, unsigned char* __restrict__ out_keep,
                           unsigned long long* __restrict__ dropped) {
    __shared__ u64 scratch[256 / 32];
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int k = P.topk;
    int n_dropped = 0;
    if (t < P.num_tokens) {
        const long long off = t * k;
        float s = 0.0f, s_keep = 0.0f;
        bool any_dropped = false;
        for (int j = 0; j < k; ++j) {
            const int e = indices[off + j];
            const float w = weights[off + j];
            const bool keep = e >= 0 && assignment_keep(P, t, j);
            if (e >= 0) {
                s += w;
                if (keep) s_keep += w; else any_dropped = true;
            }
            n_dropped += (e >= 0 && !keep) ? 1 : 0;
            out_keep[off + j] = keep ? 1 : 0;
            out_indices[off + j] = keep ? e : -1;
            out_weights[off + j] = keep ? w : 0.0f;
        }
        if (P.renormalize && any_dropped) {
            const float r = s / (s_keep + 1e-20f);
            for (int j = 0; j < k; ++j)
                if (out_keep[off + j]) out_weights[off + j] = out_weights[off + j] * r;
        }
    }
    const int block_dropped = GroupReduce<256>::sum_int(n_dropped, scratch);
    if (threadIdx.x == 0 && block_dropped > 0) atomicAdd(dropped, (unsigned long long)block_dropped);
}

// Backward of assignment dropout (the CPU's assignment_dropout_backward), one
// thread per token.
extern "C" __global__ void __launch_bounds__(256)
    assignment_dropout_bwd(DropoutParams P, const int* __restrict__ indices,
                           const float* __restrict__ weights,
                           const unsigned char* __restrict__ keep,
                           const float* __restrict__ grad_out, float* __restrict__ grad_weights) {
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= P.num_tokens) return;
    const int k = P.topk;
    const long long off = t * k;
    float s = 0.0f, s_keep = 0.0f;
    bool any_dropped = false;
    for (int j = 0; j < k; ++j) {
        if (indices[off + j] >= 0) {
            const float w = weights[off + j];
            s += w;
            if (keep[off + j]) s_keep += w; else any_dropped = true;
        }
    }
    if (!(P.renormalize && any_dropped)) {
        for (int j = 0; j < k; ++j) grad_weights[off + j] = keep[off + j] ? grad_out[off + j] : 0.0f;
        return;
    }
    const float d = s_keep + 1e-20f;
    const float r = s / d;
    float gdot = 0.0f;
    for (int j = 0; j < k; ++j)
        if (keep[off + j]) gdot += grad_out[off + j] * weights[off + j];
    const float cc = gdot / d;
    for (int j = 0; j < k; ++j) {
        const float routed = indices[off + j] >= 0 ? cc : 0.0f;
        grad_weights[off + j] = keep[off + j] ? r * (grad_out[off + j] - cc) + routed : routed;
    }
}
