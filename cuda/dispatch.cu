// dispatch.cu: capacity-factor dispatch (src/cpu/dispatch.rs on the GPU).
//
// The result is a pure function of the input (no order of atomics or of blocks can
// change it), and every integer output equals the CPU's:
//
// 1. dispatch_count: per chunk of `chunk_tokens` tokens, a histogram of the routed
//    assignments by expert (integer atomics: counts do not depend on order) into
//    hist[chunk, expert].
// 2. dispatch_scan_chunks: per expert (one warp), the exclusive scan of its column
//    over the chunks (in place) and its total count.
// 3. dispatch_scan_experts (one block): starts[e] (exclusive scan of the counts),
//    kept[e] = min(count, capacity), the layout's row bounds -> expert_offsets,
//    tokens_per_expert, rows_per_rank, and the device scalars num_rows and dropped.
// 4. dispatch_scatter: one warp per chunk walks its assignments in (t, j) order, 32
//    at a time; lanes routed to the same expert are ranked by `__match_any_sync` and
//    a popcount, so position = starts[e] + (earlier chunks' count) + (earlier in
//    this chunk): a stable counting sort, each expert's segment in (t, j) order. It
//    stores pos_of[a] and, when some expert may be over capacity, the high word of
//    the assignment's drop key (src/cpu/dispatch.rs::drop_key; the low word is
//    `~t`, which the segment order already encodes).
// 5. dispatch_select: one block per expert. At most `capacity` routed: all kept,
//    slot = position in the segment. Otherwise the `capacity` largest keys are kept:
//    a 4-pass radix select (common.cuh's radix_select_hi: 8 bits a pass,
//    shared-memory integer histograms) finds
//    the high word `thr` of the capacity-th largest key and how many keys with that
//    high word are kept (the first ones in token order: the low word `~t` prefers the
//    lower token); a block scan in segment (= token) order numbers the kept ones.
// 6. dispatch_finish: one thread per token, the CPU's final loop: slot, row,
//    kept_weights (renormalised in the CPU's f32 operation order), row_to_token.
//    dispatch_fill first sets every row_to_token entry to -1.
//
// Indices are read from device memory unchecked by the host: an index outside
// [0, num_experts) is treated as not routed (as -1) by every kernel and never used
// to address memory. A token that names an expert twice (invalid input, rejected
// on the CPU) still gets distinct positions and at most `capacity` kept per expert,
// so no write goes out of bounds.
//
// @untyped: dispatch_count dispatch_scan_chunks dispatch_scan_experts dispatch_scatter dispatch_select dispatch_fill dispatch_finish
#include "common.cuh"

// Codes of DispatchParams::policy (DropPolicy) and ::layout (DispatchLayout). The
// `@host` tag makes each one a Rust constant too (build.rs: kernels::abi::dispatch),
// which src/cuda/dispatch.rs passes: the numbers are written here only.
#define POLICY_POSITION 0              // @host i32
#define POLICY_CHOICE_THEN_POSITION 1  // @host i32
#define POLICY_PROBS 2                 // @host i32
#define POLICY_BATCH_PRIORITIZED 3     // @host i32
#define POLICY_RANDOM 4                // @host i32

#define LAYOUT_PAD 0       // @host i32
#define LAYOUT_COMPACT 1   // @host i32
#define LAYOUT_DROPLESS 2  // @host i32

#define SCAN_THREADS 1024
#define SELECT_THREADS 256
#define COUNT_THREADS 256

// Kernel parameters, taken by value: build.rs fails the build unless the #[repr(C)]
// `DispatchParams` in src/cuda/dispatch.rs has these fields, in this order, with these types.
// @host-struct: src/cuda/dispatch.rs
struct DispatchParams {
    u64 seed;          // random policy
    u64 offset;
    int num_tokens;
    int topk;
    int num_experts;
    int capacity;      // -1: no capacity (every routed assignment kept)
    int policy;        // POLICY_*
    int layout;        // LAYOUT_*
    int align;         // dropless segment alignment (>= 1)
    int ep_size;
    int chunk_tokens;  // tokens per chunk of steps 1 and 4
    int num_chunks;
    int max_rows;      // length of row_to_token
    int smem_cursor;   // 1: per-chunk histograms / cursors in shared memory (E ints)
};

// Workspace (i32 words), see `dispatch_workspace_len` in src/cuda/dispatch.rs:
//   hist [num_chunks * E] | counts [E] | starts [E + 1] | pos_of [N] | seg_slot [N]
//   | keys [N]   (N = num_tokens * topk)
struct Ws {
    int* hist;
    int* counts;
    int* starts;
    int* pos_of;
    int* seg_slot;
    u32* keys;
};

__device__ __forceinline__ Ws workspace(const DispatchParams& P, int* ws) {
    const long long E = P.num_experts;
    const long long N = (long long)P.num_tokens * P.topk;
    Ws w;
    w.hist = ws;
    w.counts = w.hist + (long long)P.num_chunks * E;
    w.starts = w.counts + E;
    w.pos_of = w.starts + E + 1;
    w.seg_slot = w.pos_of + N;
    w.keys = reinterpret_cast<u32*>(w.seg_slot + N);
    return w;
}

__device__ __forceinline__ bool routed_to(int e, int E) { return e >= 0 && e < E; }

// ---------------------------------------------------------------------------
// 1. Per-chunk histograms. grid = num_chunks, block = COUNT_THREADS, dynamic shared
// memory E ints when smem_cursor.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(COUNT_THREADS)
    dispatch_count(DispatchParams P, const int* __restrict__ indices, int* __restrict__ ws) {
    MOE_DYNAMIC_SHARED(int, s_hist);
    const Ws w = workspace(P, ws);
    const int E = P.num_experts;
    const long long c = blockIdx.x;
    int* row = w.hist + c * E;
    int* h = P.smem_cursor ? s_hist : row;
    for (int e = threadIdx.x; e < E; e += COUNT_THREADS) h[e] = 0;
    __syncthreads();
    const long long t0 = c * P.chunk_tokens;
    const long long t1 = min((long long)P.num_tokens, t0 + P.chunk_tokens);
    const long long a0 = t0 * P.topk, a1 = t1 * P.topk;
    for (long long a = a0 + threadIdx.x; a < a1; a += COUNT_THREADS) {
        const int e = indices[a];
        if (routed_to(e, E)) atomicAdd(h + e, 1);
    }
    __syncthreads();
    if (P.smem_cursor) {
        for (int e = threadIdx.x; e < E; e += COUNT_THREADS) row[e] = s_hist[e];
    }
}

// ---------------------------------------------------------------------------
// 2. Per expert (one warp): exclusive scan of its column over the chunks, in place;
// counts[e] = total. grid = ceil(E / 8), block = 256.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
    dispatch_scan_chunks(DispatchParams P, int* __restrict__ ws) {
    const Ws w = workspace(P, ws);
    const int lane = threadIdx.x & 31;
    const long long e = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (e >= P.num_experts) return;  // whole warps return together
    const long long E = P.num_experts;
    int carry = 0;
    for (int c0 = 0; c0 < P.num_chunks; c0 += 32) {
        const int c = c0 + lane;
        const int v = c < P.num_chunks ? w.hist[c * E + e] : 0;
        const int incl = warp_incl_scan(v);
        if (c < P.num_chunks) w.hist[c * E + e] = carry + incl - v;
        carry += __shfl_sync(FULL_MASK, incl, 31);
    }
    if (lane == 0) w.counts[e] = carry;
}

// ---------------------------------------------------------------------------
// 3. One block: starts, kept counts, row bounds, per-rank rows, num_rows, dropped.
// counts_out [2] (i64): num_rows, dropped.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(SCAN_THREADS)
    dispatch_scan_experts(DispatchParams P, int* __restrict__ ws,
                          int* __restrict__ tokens_per_expert, int* __restrict__ expert_offsets,
                          int* __restrict__ rows_per_rank, long long* __restrict__ counts_out) {
    __shared__ int sh[SCAN_THREADS / 32];
    const Ws w = workspace(P, ws);
    const int E = P.num_experts;
    int carry_start = 0, carry_row = 0, carry_kept = 0;
    for (int base = 0; base < E; base += SCAN_THREADS) {
        const int e = base + threadIdx.x;
        const int cnt = e < E ? w.counts[e] : 0;
        const int kept = P.capacity < 0 ? cnt : min(cnt, P.capacity);
        int rows = 0;
        if (e < E) {
            if (P.layout == LAYOUT_PAD) {
                rows = P.capacity;
            } else if (P.layout == LAYOUT_COMPACT) {
                rows = kept;
            } else {
                const long long a = P.align;
                rows = (int)(((long long)kept + a - 1) / a * a);
            }
        }
        int t_start, t_row, t_kept;
        const int x_start = block_excl_scan<SCAN_THREADS>(cnt, sh, t_start);
        const int x_row = block_excl_scan<SCAN_THREADS>(rows, sh, t_row);
        block_excl_scan<SCAN_THREADS>(kept, sh, t_kept);
        if (e < E) {
            w.starts[e] = carry_start + x_start;
            expert_offsets[e] = carry_row + x_row;
            tokens_per_expert[e] = kept;
        }
        carry_start += t_start;
        carry_row += t_row;
        carry_kept += t_kept;
    }
    if (threadIdx.x == 0) {
        w.starts[E] = carry_start;
        expert_offsets[E] = carry_row;
        counts_out[0] = carry_row;
        counts_out[1] = (long long)carry_start - carry_kept;
    }
    __syncthreads();  // expert_offsets visible to the whole block
    const int per_rank = E / P.ep_size;
    for (int r = threadIdx.x; r < P.ep_size; r += SCAN_THREADS) {
        rows_per_rank[r] = expert_offsets[(r + 1) * per_rank] - expert_offsets[r * per_rank];
    }
}

// High word of src/cpu/dispatch.rs::drop_key for assignment (t, j) with weight wj.
__device__ __forceinline__ u32 drop_key_hi(const DispatchParams& P, const int* idx_row,
                                           const float* w_row, int t, int j, float wj) {
    switch (P.policy) {
        case POLICY_CHOICE_THEN_POSITION:
            return 0xffffffffu - (u32)j;
        case POLICY_PROBS:
            return score_key(wj);
        case POLICY_BATCH_PRIORITIZED: {
            // batch_priority: the largest score_key of the token's routed weights.
            u32 best = 0u;
            for (int i = 0; i < P.topk; ++i) {
                if (routed_to(idx_row[i], P.num_experts)) {
                    const u32 s = score_key(w_row[i]);
                    best = s > best ? s : best;
                }
            }
            return best;
        }
        case POLICY_RANDOM:
            return ~score_key(philox_uniform(P.seed, P.offset, DOMAIN_RANDOM_DROP, (u64)t));
        default:
            return 0u;
    }
}

// ---------------------------------------------------------------------------
// 4. Stable scatter into expert segments. grid = num_chunks, block = 32 (one warp),
// dynamic shared memory E ints when smem_cursor (else the chunk's histogram row is
// the cursor, in place).
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(32)
    dispatch_scatter(DispatchParams P, const int* __restrict__ indices,
                     const float* __restrict__ weights, int* __restrict__ ws) {
    MOE_DYNAMIC_SHARED(int, s_cur);
    const Ws w = workspace(P, ws);
    const int E = P.num_experts, k = P.topk, lane = threadIdx.x;
    const long long c = blockIdx.x;
    int* row = w.hist + c * E;
    int* cur = P.smem_cursor ? s_cur : row;
    for (int e = lane; e < E; e += 32) cur[e] = w.starts[e] + row[e];
    __syncwarp();
    const bool need_keys = P.capacity >= 0 && P.policy != POLICY_POSITION;
    const long long t0 = c * P.chunk_tokens;
    const long long t1 = min((long long)P.num_tokens, t0 + P.chunk_tokens);
    const long long a0 = t0 * k, a1 = t1 * k;
    const u32 lt_mask = (1u << lane) - 1u;
    for (long long base = a0; base < a1; base += 32) {
        const long long a = base + lane;
        const bool valid = a < a1;
        const int e = valid ? indices[a] : -1;
        const bool routed = valid && routed_to(e, E);
        const u32 peers = __match_any_sync(FULL_MASK, routed ? e : -1);
        int pos = -1;
        if (routed) pos = cur[e] + __popc(peers & lt_mask);
        __syncwarp();
        if (routed && lane == 31 - __clz(peers)) cur[e] = pos + 1;
        __syncwarp();
        if (valid) {
            w.pos_of[a] = pos;
            if (routed && need_keys) {
                const int t = (int)(a / k), j = (int)(a - (long long)t * k);
                const long long r0 = (long long)t * k;
                w.keys[pos] = drop_key_hi(P, indices + r0, weights + r0, t, j, weights[a]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Keep the best `capacity` per expert: seg_slot[p] = slot or -1. grid = E,
// block = SELECT_THREADS.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(SELECT_THREADS)
    dispatch_select(DispatchParams P, int* __restrict__ ws) {
    __shared__ int hist[256];
    __shared__ int bc[2];
    __shared__ int sh[SELECT_THREADS / 32];
    const Ws w = workspace(P, ws);
    const int e = blockIdx.x;
    const int s0 = w.starts[e];
    const int n = w.starts[e + 1] - s0;
    const int cap = P.capacity;
    int* slot = w.seg_slot + s0;
    if (cap < 0 || n <= cap) {
        for (int i = threadIdx.x; i < n; i += SELECT_THREADS) slot[i] = i;
        return;
    }
    if (P.policy == POLICY_POSITION || cap == 0) {
        // Keys increase along the segment: the first `cap` win.
        for (int i = threadIdx.x; i < n; i += SELECT_THREADS) slot[i] = i < cap ? i : -1;
        return;
    }
    const u32* keys = w.keys + s0;
    auto key = [&](int i) { return keys[i]; };
    u32 thr;
    int want_eq;
    radix_select_hi<SELECT_THREADS>(key, n, cap, hist, bc, thr, want_eq);
    number_kept<SELECT_THREADS>(key, n, thr, want_eq, sh, [&](int i, int s) {
        slot[i] = s < cap ? s : -1;
    });
}

// ---------------------------------------------------------------------------
// 6. row_to_token = -1 everywhere, then the per-token outputs.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
    dispatch_fill(int* __restrict__ out, long long n, int value) {
    grid_fill(out, n, value);
}

extern "C" __global__ void __launch_bounds__(256)
    dispatch_finish(DispatchParams P, const int* __restrict__ indices,
                    const float* __restrict__ weights, int* __restrict__ ws,
                    const int* __restrict__ expert_offsets, int* __restrict__ slot,
                    int* __restrict__ row, float* __restrict__ kept_weights,
                    int* __restrict__ row_to_token, int renormalize) {
    const Ws w = workspace(P, ws);
    const int k = P.topk, E = P.num_experts;
    const long long N = (long long)P.num_tokens * k;
    for (long long t = grid_start(); t < P.num_tokens; t += grid_stride()) {
        const long long base = t * k;
        float sum_all = 0.0f, sum_kept = 0.0f;
        bool any_kept = false;
        for (int j = 0; j < k; ++j) {
            const long long a = base + j;
            const int e = indices[a];
            const float wj = weights[a];
            int s = -1;
            if (routed_to(e, E)) {
                sum_all += wj;
                const int p = w.pos_of[a];
                if (p >= 0 && p < N) s = w.seg_slot[p];
            }
            if (s >= 0) {
                const int r = expert_offsets[e] + s;
                slot[a] = s;
                row[a] = r;
                kept_weights[a] = wj;
                sum_kept += wj;
                any_kept = true;
                if (r >= 0 && r < P.max_rows) row_to_token[r] = (int)t;
            } else {
                slot[a] = -1;
                row[a] = -1;
                kept_weights[a] = 0.0f;
            }
        }
        if (renormalize && any_kept) {
            const float denom = sum_kept + 1e-20f;
            for (int j = 0; j < k; ++j) {
                const long long a = base + j;
                if (slot[a] >= 0) kept_weights[a] = kept_weights[a] * sum_all / denom;
            }
        }
    }
}
