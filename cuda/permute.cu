// permute.cu: permute / unpermute of hidden states and their backward passes.
//
// Mirrors src/cpu/permute.rs exactly:
// - permute: `out[r] = x[row_to_token[r]]`, a bitwise copy; padding rows (-1, or any
//   token index outside [0, num_tokens)) are zeros.
// - gather_sum (permute backward with `weights == null`, unpermute forward
//   otherwise): `out[t] = Σ_j w[t, j] · y[row[t, j]]` over the j whose row is in
//   [0, num_rows), accumulated in f32 from 0 in j order as `acc = acc + w * v` (two
//   roundings: the crate compiles with --fmad=false), one rounding on the store;
//   `w = 1` without weights (`1 · v == v` exactly, as on the CPU).
// - unpermute backward, grad_y: every row of grad_y is written exactly once, by a
//   per-row kernel: the assignment that owns row r is the smallest flat index
//   a = t * k + j with row[a] == r (the CPU hands a row to the first assignment that
//   points to it), found by `inverse_rows_scatter` with an integer atomicMin (its
//   result does not depend on the order of the atomics); rows nobody owns are
//   zeroed. `grad_y[r] = round(w[a] · grad_out[t])`.
// - unpermute backward, grad_weights: `<grad_out[t], y[row[t, j]]>` in the CPU's
//   fixed order (src/cpu/permute.rs::dot_load): 32 partial sums, lane l taking the
//   indices i ≡ l (mod 32) of the full 32-blocks in order, combined by halving
//   (+16, +8, +4, +2, +1), then the tail (H mod 32 products, summed in order from 0)
//   added to partial 0. One warp per assignment: lane l owns partial l, so the GPU
//   result has the CPU's bits (NaN payloads aside).
//
// Memory access: flat grid-stride loops over (row or token, 16-byte column chunk):
// consecutive threads touch consecutive 16 bytes (uint4) when
// `H * sizeof(T) % 16 == 0` and every pointer is 16-byte aligned (`vec != 0`, the
// host decides); otherwise element by element (consecutive threads, consecutive
// elements). The dot product's vector path loads 16-byte chunks of a 32·V-element
// tile, forms the products, and hands them to their owning lanes through shared
// memory (the products are the same values whoever computes them).
//
// Indices read from device memory (row_to_token, row, the inverse map) are
// bounds-checked before use: out-of-range entries count as padding / not routed,
// so no value makes a kernel read or write out of bounds. No float atomics.
//
// @entries: permute_fwd gather_sum unpermute_bwd_grad_y unpermute_bwd_grad_w
// @untyped: inverse_rows_init inverse_rows_scatter
#include "common.cuh"

#define NO_OWNER 0x7fffffff
// Block shapes, Rust constants too (build.rs: kernels::abi::permute): threads of the
// flat grid-stride entries, warps (assignments) per block of unpermute_bwd_grad_w.
#define PERMUTE_THREADS 256  // @host u32
#define GRAD_W_WARPS 4       // @host u64

// Elements per 16-byte chunk.
template <typename T> struct Vec { static const int N = 16 / (int)sizeof(T); };

// V elements of `p` widened to f32 (V == Vec<T>::N: one 16-byte load; V == 1: one
// element).
template <typename T, int V>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float* v) {
    if constexpr (V == 1) {
        v[0] = to_f32(p[0]);
    } else {
        uint4 u = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = to_f32(e[i]);
    }
}

template <typename T, int V>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float* v) {
    if constexpr (V == 1) {
        p[0] = from_f32<T>(v[0]);
    } else {
        uint4 u;
        T* e = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int i = 0; i < V; ++i) e[i] = from_f32<T>(v[i]);
        *reinterpret_cast<uint4*>(p) = u;
    }
}

// An entry's body at the vector width the host chose: 16-byte chunks when `vec` is
// non-zero, else element by element (`vec` is a parameter of every entry below).
#define WITH_VEC(BODY, T, ...)                 \
    if (vec) BODY<T, Vec<T>::N>(__VA_ARGS__); \
    else BODY<T, 1>(__VA_ARGS__)

// ---------------------------------------------------------------------------
// permute: out [num_rows, H] = x [num_tokens, H] gathered by row_to_token.
// ---------------------------------------------------------------------------
template <typename T, int V>
__device__ __forceinline__ void permute_body(const T* __restrict__ x,
                                             const int* __restrict__ row_to_token,
                                             T* __restrict__ out, int num_tokens, int num_rows,
                                             long long H) {
    const long long nv = H / V;
    const long long n = (long long)num_rows * nv;
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        const long long r = i / nv, c = (i - r * nv) * V;
        const int t = row_to_token[r];
        T* dst = out + r * H + c;
        if constexpr (V == 1) {
            if (t >= 0 && t < num_tokens) {
                dst[0] = x[(long long)t * H + c];
            } else {
                dst[0] = from_f32<T>(0.0f);  // +0.0: all bits zero, as on the CPU
            }
        } else {
            uint4 u = make_uint4(0u, 0u, 0u, 0u);
            if (t >= 0 && t < num_tokens) u = *reinterpret_cast<const uint4*>(x + (long long)t * H + c);
            *reinterpret_cast<uint4*>(dst) = u;
        }
    }
}

#define DEFINE_PERMUTE_FWD(T, NAME)                                                        \
    extern "C" __global__ void __launch_bounds__(PERMUTE_THREADS)                          \
        NAME(const T* __restrict__ x, const int* __restrict__ row_to_token,                \
             T* __restrict__ out, int num_tokens, int num_rows, long long hidden, int vec) { \
        WITH_VEC(permute_body, T, x, row_to_token, out, num_tokens, num_rows, hidden);      \
    }

// ---------------------------------------------------------------------------
// gather_sum: out [num_tokens, H] = Σ_j w[t, j] · src[row[t, j]] (w = 1 without
// weights), f32 in j order, one rounding.
// ---------------------------------------------------------------------------
template <typename T, int V>
__device__ __forceinline__ void gather_body(const T* __restrict__ src,
                                            const int* __restrict__ row,
                                            const float* __restrict__ weights,
                                            T* __restrict__ out, int num_tokens, int k,
                                            int num_rows, long long H) {
    const long long nv = H / V;
    const long long n = (long long)num_tokens * nv;
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        const long long t = i / nv, c = (i - t * nv) * V;
        float acc[V];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = 0.0f;
        for (int j = 0; j < k; ++j) {
            const long long a = t * k + j;
            const int r = row[a];
            if (r < 0 || r >= num_rows) continue;
            const float w = weights != nullptr ? weights[a] : 1.0f;
            float v[V];
            load_f32<T, V>(src + (long long)r * H + c, v);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = acc[e] + w * v[e];
        }
        store_f32<T, V>(out + t * H + c, acc);
    }
}

#define DEFINE_GATHER_SUM(T, NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(PERMUTE_THREADS)                           \
        NAME(const T* __restrict__ src, const int* __restrict__ row,                        \
             const float* __restrict__ weights, T* __restrict__ out, int num_tokens, int k,  \
             int num_rows, long long hidden, int vec) {                                     \
        WITH_VEC(gather_body, T, src, row, weights, out, num_tokens, k, num_rows, hidden);  \
    }

// ---------------------------------------------------------------------------
// Inverse map of `row [num_tokens * k]`: owner[r] = min { a : row[a] == r }, or
// NO_OWNER. Integer atomicMin: the result does not depend on the atomics' order.
// ---------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(PERMUTE_THREADS)
    inverse_rows_init(int* __restrict__ owner, int num_rows) {
    grid_fill(owner, num_rows, NO_OWNER);
}

extern "C" __global__ void __launch_bounds__(PERMUTE_THREADS)
    inverse_rows_scatter(const int* __restrict__ row, int* __restrict__ owner,
                         long long num_assignments, int num_rows) {
    for (long long a = grid_start(); a < num_assignments; a += grid_stride()) {
        const int r = row[a];
        if (r >= 0 && r < num_rows) atomicMin(owner + r, (int)a);
    }
}

// ---------------------------------------------------------------------------
// unpermute backward, grad_y [num_rows, H]: each row written once.
// ---------------------------------------------------------------------------
template <typename T, int V>
__device__ __forceinline__ void grad_y_body(const T* __restrict__ grad_out,
                                            const int* __restrict__ owner,
                                            const float* __restrict__ weights,
                                            T* __restrict__ grad_y, int num_tokens, int k,
                                            int num_rows, long long H) {
    const long long nv = H / V;
    const long long n = (long long)num_rows * nv;
    const long long na = (long long)num_tokens * k;
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        const long long r = i / nv, c = (i - r * nv) * V;
        const int a = owner[r];
        float v[V];
        if (a >= 0 && (long long)a < na && k > 0) {
            const float w = weights[a];
            load_f32<T, V>(grad_out + (long long)(a / k) * H + c, v);
#pragma unroll
            for (int e = 0; e < V; ++e) v[e] = w * v[e];
        } else {
#pragma unroll
            for (int e = 0; e < V; ++e) v[e] = 0.0f;
        }
        store_f32<T, V>(grad_y + r * H + c, v);
    }
}

#define DEFINE_GRAD_Y(T, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(PERMUTE_THREADS)                           \
        NAME(const T* __restrict__ grad_out, const int* __restrict__ owner,                 \
             const float* __restrict__ weights, T* __restrict__ grad_y, int num_tokens, int k, \
             int num_rows, long long hidden, int vec) {                                     \
        WITH_VEC(grad_y_body, T, grad_out, owner, weights, grad_y, num_tokens, k, num_rows, hidden); \
    }

// ---------------------------------------------------------------------------
// unpermute backward, grad_weights [num_tokens, k]: one warp per assignment, the
// CPU's 32-partial dot product order (see the file header).
// ---------------------------------------------------------------------------
template <typename T, int V>
__device__ __forceinline__ float dot_cpu_order(const T* __restrict__ g, const T* __restrict__ y,
                                               long long H, int lane, float* tile) {
    const long long full = H - H % 32;
    float s = 0.0f;
    long long b = 0;
    if constexpr (V > 1) {
        // Tiles of 32 * V elements: lane L loads chunk L (elements L*V .. L*V+V-1 of
        // the tile), forms the products and stores them; then lane l adds the
        // products of the tile's V blocks at offset l, in block order.
        for (; b + 32 * V <= full; b += 32 * V) {
            float gv[V], yv[V];
            load_f32<T, V>(g + b + lane * V, gv);
            load_f32<T, V>(y + b + lane * V, yv);
#pragma unroll
            for (int e = 0; e < V; e += 4) {
                // 16-byte shared stores: no bank conflicts within a quarter warp.
                *reinterpret_cast<float4*>(tile + lane * V + e) =
                    make_float4(gv[e] * yv[e], gv[e + 1] * yv[e + 1], gv[e + 2] * yv[e + 2],
                                gv[e + 3] * yv[e + 3]);
            }
            __syncwarp();
#pragma unroll
            for (int q = 0; q < V; ++q) s = s + tile[q * 32 + lane];
            __syncwarp();
        }
    }
    for (; b < full; b += 32) s = s + to_f32(g[b + lane]) * to_f32(y[b + lane]);
    // Halving: partial l += partial l + half, for l < half.
#pragma unroll
    for (int half = 16; half > 0; half >>= 1) s = s + __shfl_down_sync(FULL_MASK, s, half);
    // Tail: the last H mod 32 products, summed in order from 0.
    const int rem = (int)(H - full);
    const float p = lane < rem ? to_f32(g[full + lane]) * to_f32(y[full + lane]) : 0.0f;
    float tail = 0.0f;
    for (int i = 0; i < rem; ++i) tail = tail + __shfl_sync(FULL_MASK, p, i);
    return s + tail;
}

template <typename T, int V>
__device__ __forceinline__ void grad_w_body(const T* __restrict__ grad_out,
                                            const T* __restrict__ y,
                                            const int* __restrict__ row,
                                            float* __restrict__ grad_weights, int num_tokens,
                                            int k, int num_rows, long long H) {
    __shared__ __align__(16) float tiles[GRAD_W_WARPS][32 * 8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long na = (long long)num_tokens * k;
    const long long nwarps = (long long)gridDim.x * GRAD_W_WARPS;
    // Warp-uniform loop: every lane of a warp takes the same assignments.
    for (long long a = (long long)blockIdx.x * GRAD_W_WARPS + warp; a < na; a += nwarps) {
        const int r = row[a];
        float d = 0.0f;
        if (r >= 0 && r < num_rows) {
            d = dot_cpu_order<T, V>(grad_out + (a / k) * H, y + (long long)r * H, H, lane,
                                    tiles[warp]);
        }
        if (lane == 0) grad_weights[a] = d;
    }
}

#define DEFINE_GRAD_W(T, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(32 * GRAD_W_WARPS)                         \
        NAME(const T* __restrict__ grad_out, const T* __restrict__ y,                       \
             const int* __restrict__ row, float* __restrict__ grad_weights, int num_tokens,  \
             int k, int num_rows, long long hidden, int vec) {                              \
        WITH_VEC(grad_w_body, T, grad_out, y, row, grad_weights, num_tokens, k, num_rows, hidden); \
    }

DEFINE_PERMUTE_FWD(float, permute_fwd_f32)
DEFINE_PERMUTE_FWD(f16_t, permute_fwd_f16)
DEFINE_PERMUTE_FWD(bf16_t, permute_fwd_bf16)
DEFINE_GATHER_SUM(float, gather_sum_f32)
DEFINE_GATHER_SUM(f16_t, gather_sum_f16)
DEFINE_GATHER_SUM(bf16_t, gather_sum_bf16)
DEFINE_GRAD_Y(float, unpermute_bwd_grad_y_f32)
DEFINE_GRAD_Y(f16_t, unpermute_bwd_grad_y_f16)
DEFINE_GRAD_Y(bf16_t, unpermute_bwd_grad_y_bf16)
DEFINE_GRAD_W(float, unpermute_bwd_grad_w_f32)
DEFINE_GRAD_W(f16_t, unpermute_bwd_grad_w_f16)
DEFINE_GRAD_W(bf16_t, unpermute_bwd_grad_w_bf16)
