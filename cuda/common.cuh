// common.cuh: helpers shared by every kernel of moe-router.
//
// Compiled by NVRTC with no include path: no CUDA header is included. f16 and bf16
// travel as raw 16-bit words (`u16`) and are converted here (f16 by the `cvt` PTX
// instruction, bf16 by bit operations that mirror the `half` crate's round to nearest
// even), so the kernels need nothing but the compiler itself.
//
// Numerics mirror the CPU reference (src/cpu, src/select.rs, src/philox.rs): all
// router math is f32, sums over a token's k selections run in the CPU's order, and
// the crate compiles with `--fmad=false` so that `a * b + c` rounds twice, as on the
// CPU. The build script inlines this file into every .cu file.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu
#define MOE_NAN __int_as_float(0x7fffffff)
#define MOE_NEG_INF __int_as_float(0xff800000)

// Dynamic shared memory: `extern __shared__ T name[]` on the GPU, the launch's buffer
// under the CPU emulator (emu/cuda_emu.h), which cannot declare it that way.
#ifdef MOE_ROUTER_EMU
#define MOE_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_smem())
#else
#define MOE_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// ---------------------------------------------------------------------------
// Element types. `Elem<T>` is the storage type, `load_f32` widens, `store_from_f32`
// rounds on the final store.
// ---------------------------------------------------------------------------
struct f16_t { u16 bits; };
struct bf16_t { u16 bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16_t x) {
#ifdef MOE_ROUTER_EMU
    // The CPU emulator (emu/): g++'s _Float16 converts exactly like `cvt`.
    _Float16 h;
    __builtin_memcpy(&h, &x.bits, 2);
    return (float)h;
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}
__device__ __forceinline__ float to_f32(bf16_t x) {
    return __uint_as_float(((u32)x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ f16_t from_f32<f16_t>(float v) {
    f16_t r;
#ifdef MOE_ROUTER_EMU
    const _Float16 h = (_Float16)v;  // round to nearest even, as cvt.rn
    __builtin_memcpy(&r.bits, &h, 2);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
#endif
    return r;
}
// bf16 round to nearest even, NaN kept quiet: the same bits as `half::bf16::from_f32`.
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
    u32 x = __float_as_uint(v);
    bf16_t r;
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((x >> 16) | 0x0040u);
        return r;
    }
    const u32 round_bit = 0x00008000u;
    if ((x & round_bit) != 0 && (x & (3u * round_bit - 1u)) != 0) {
        r.bits = (u16)((x >> 16) + 1u);
    } else {
        r.bits = (u16)(x >> 16);
    }
    return r;
}

// NaN-propagating max, the CPU's `softmax_row` fold: once a NaN is seen it stays.
__device__ __forceinline__ float nan_max(float a, float b) {
    if (a != a) return a;
    if (b != b) return b;
    return b > a ? b : a;
}

// Logistic sigmoid, the CPU's formula (stable for large |x|).
__device__ __forceinline__ float moe_sigmoid(float x) {
    if (x >= 0.0f) {
        return 1.0f / (1.0f + expf(-x));
    }
    float e = expf(x);
    return e / (1.0f + e);
}

// ---------------------------------------------------------------------------
// Ranking (src/select.rs): one u64 key, larger ranks first.
// key = (score_key(q) << 32) | (0xffffffff - index). NaN -> score key 0 (lowest),
// -0 == +0, lower index first among equal scores.
// ---------------------------------------------------------------------------
__device__ __forceinline__ u32 score_key(float q) {
    if (q != q) return 0u;
    u32 b = __float_as_uint(q);
    if (b == 0x80000000u) b = 0u;  // -0.0 ranks as +0.0
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Inverse of score_key: the score a key stands for (NaN for key 0).
__device__ __forceinline__ float key_score(u32 sk) {
    if (sk == 0u) return MOE_NAN;
    u32 b = (sk & 0x80000000u) ? (sk & 0x7fffffffu) : ~sk;
    return __uint_as_float(b);
}

__device__ __forceinline__ u64 rank_key(float q, u32 index) {
    return ((u64)score_key(q) << 32) | (u64)(0xffffffffu - index);
}
__device__ __forceinline__ u32 key_index(u64 key) { return 0xffffffffu - (u32)key; }
__device__ __forceinline__ float key_value(u64 key) { return key_score((u32)(key >> 32)); }

// ---------------------------------------------------------------------------
// Philox-4x32-10 (src/philox.rs), the same stream layout:
//   key     = [seed lo, seed hi]
//   counter = [index lo, (index hi & 0x00ffffff) | domain << 24, offset lo, offset hi]
// ---------------------------------------------------------------------------
enum Domain : u32 {
    DOMAIN_SELECTION_NOISE = 1,
    DOMAIN_RANDOM_DROP = 2,
    DOMAIN_EXPERT_MASKING = 3,
    DOMAIN_ASSIGNMENT_DROPOUT = 4,
};

struct u32x4 { u32 x, y, z, w; };

__device__ __forceinline__ u32x4 philox4x32_10(u32x4 c, u32 k0, u32 k1) {
    const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += W0;
            k1 += W1;
        }
        u32 hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        u32 hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        u32x4 n;
        n.x = hi1 ^ c.y ^ k0;
        n.y = lo1;
        n.z = hi0 ^ c.w ^ k1;
        n.w = lo0;
        c = n;
    }
    return c;
}

__device__ __forceinline__ u32x4 random_u32x4(u64 seed, u64 offset, u32 domain, u64 index) {
    u32x4 c;
    c.x = (u32)index;
    c.y = ((u32)(index >> 32) & 0x00ffffffu) | (domain << 24);
    c.z = (u32)offset;
    c.w = (u32)(offset >> 32);
    return philox4x32_10(c, (u32)seed, (u32)(seed >> 32));
}

// Uniform in [0, 1) from the top 24 bits (exact in f32).
__device__ __forceinline__ float uniform_f32(u32 x) {
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}

__device__ __noinline__ float philox_uniform(u64 seed, u64 offset, u32 domain, u64 index) {
    return uniform_f32(random_u32x4(seed, offset, domain, index).x);
}

// Standard normal by Box-Muller in double, rounded once to f32 (src/philox.rs::normal).
__device__ __noinline__ float philox_normal(u64 seed, u64 offset, u32 domain, u64 index) {
    u32x4 x = random_u32x4(seed, offset, domain, index);
    double u1 = ((double)(x.x >> 8) + 1.0) * (1.0 / 16777216.0);
    double u2 = (double)(x.y >> 8) * (1.0 / 16777216.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(2.0 * 3.141592653589793 * u2));
}

// ---------------------------------------------------------------------------
// Reductions over a group of NT threads: NT == 32 is one warp (shuffles only);
// NT > 32 is a whole block of NT threads, through `scratch` (NT / 32 u64 words of
// shared memory). The result is returned to every thread of the group. The
// combination order is fixed by the thread layout, so results are deterministic.
// ---------------------------------------------------------------------------
__device__ __forceinline__ u64 warp_max_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 other = __shfl_xor_sync(FULL_MASK, v, o);
        v = other > v ? other : v;
    }
    return v;
}
__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    // Butterfly: every lane ends with the same bits (each pairwise sum is commutative).
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Inclusive prefix sum of one int per lane over the whole warp (exact integers).
__device__ __forceinline__ int warp_incl_scan(int v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o) v += n;
    }
    return v;
}

template <int NT> struct GroupReduce {
    // scratch: at least NT / 32 u64 words of shared memory, used by NT > 32 only.
    __device__ static __forceinline__ u64 max_u64(u64 v, u64* scratch) {
        return across_warps(warp_max_u64(v), scratch,
                            [](u64 r, u64 w) { return w > r ? w : r; });
    }
    __device__ static __forceinline__ float nan_max_f(float v, u64* scratch) {
        return across_warps(warp_nan_max(v), scratch,
                            [](float r, float w) { return nan_max(r, w); });
    }
    __device__ static __forceinline__ float sum_f(float v, u64* scratch) {
        return across_warps(warp_sum(v), scratch, [](float r, float w) { return r + w; });
    }
    __device__ static __forceinline__ int sum_int(int v, u64* scratch) {
        return across_warps(warp_sum_int(v), scratch, [](int r, int w) { return r + w; });
    }

    // The warps' results `v` (the same in every lane of a warp) combined in warp
    // order, r = op(op(w0, w1), w2)...: one warp returns its own; NT > 32 goes
    // through `scratch` between two barriers (every thread of the block must call).
    template <typename V, typename Op>
    __device__ static __forceinline__ V across_warps(V v, u64* scratch, Op op) {
        if (NT == 32) return v;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        V* s = reinterpret_cast<V*>(scratch);
        __syncthreads();
        if (lane == 0) s[warp] = v;
        __syncthreads();
        V r = s[0];
#pragma unroll
        for (int w = 1; w < NT / 32; ++w) r = op(r, s[w]);
        return r;
    }
};

// ---------------------------------------------------------------------------
// Per-token expert slots (topk_gating, losses, dropout, router_stats): a group of NT
// threads handles one token; thread `tid` owns experts `e = i * NT + tid` for slot
// `i < SLOTS` (coalesced loads; the owner of expert e is thread e % NT). NT = 32 (one
// warp per token, WARP_GROUPS_PER_BLOCK tokens per block) serves up to
// WARP_MAX_EXPERTS experts; NT = 256 (one block per token, the "_large" entries)
// serves up to MAX_EXPERTS. The `@host` ones are Rust constants too (build.rs:
// kernels::abi::common): the launchers' block shapes and expert limits.
// ---------------------------------------------------------------------------
#define SLOTS 8
#define WARP_GROUPS_PER_BLOCK 4  // @host u32
#define WARP_MAX_EXPERTS 256     // @host usize
#define MAX_EXPERTS 2048         // @host usize
static_assert(SLOTS <= 32, "slot bit masks are u32");
static_assert(WARP_MAX_EXPERTS == 32 * SLOTS, "a warp's slots cover WARP_MAX_EXPERTS");
static_assert(MAX_EXPERTS == 256 * SLOTS, "a 256-thread block's slots cover MAX_EXPERTS");

// A token's logits widened to f32, -inf in the slots past E.
template <int NT, typename T>
__device__ __forceinline__ void load_row(const T* row, int E, int tid, float* z) {
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
        int e = i * NT + tid;
        z[i] = e < E ? to_f32(row[e]) : MOE_NEG_INF;
    }
}

// Softmax statistics of a token's row (the CPU's softmax_row): the max m (NaN wins)
// and s = Σ exp(z - m), both fixed trees over the group.
template <int NT>
__device__ __forceinline__ void softmax_stats(const float* z, int E, int tid, u64* scratch,
                                              float& m, float& s) {
    float lm = MOE_NEG_INF;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
        if (i * NT + tid < E) lm = nan_max(lm, z[i]);
    m = GroupReduce<NT>::nan_max_f(lm, scratch);
    float ls = 0.0f;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
        if (i * NT + tid < E) ls += expf(z[i] - m);
    s = GroupReduce<NT>::sum_f(ls, scratch);
}

// One round of "take the largest key among the candidates" (0 = no candidate):
// returns the winner to every thread of the group and marks it used (bit i of
// `used`: slot i) in its owner.
template <int NT>
__device__ __forceinline__ u64 take_max(const u64* cand, u32& used, int tid, u64* scratch) {
    u64 best = 0;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i)
        if (!((used >> i) & 1u) && cand[i] > best) best = cand[i];
    u64 win = GroupReduce<NT>::max_u64(best, scratch);
    u32 e = key_index(win);
    if (win != 0 && (int)(e % NT) == tid) used |= 1u << (e / NT);
    return win;
}

// Expert masking of token t, its draw (src/cpu/dropout.rs::expert_mask_row): expert
// e is masked when its uniform u (DOMAIN_EXPERT_MASKING, index t * E + e) is below
// `rate`. Returns the thread's masked slots as bits; ukey[i] = rank_key(u, e) of a
// masked slot (largest u first, lower index among equal u: the order in which masked
// experts are unmasked again), 0 otherwise; `unmasked` = the thread's in-range
// unmasked experts. The callers then unmask the top (topk - group's unmasked) keys:
// topk_gating one take_max per key (at most MAX_TOPK rounds), dropout's expert_mask
// by one threshold search (64 rounds, whatever the number, which can reach E there).
template <int NT>
__device__ __forceinline__ u32 expert_mask_draw(u64 seed, u64 offset, float rate, u64 t, int E,
                                                int tid, u64* ukey, int& unmasked) {
    const u64 base = t * (u64)E;
    u32 masked = 0;
    unmasked = 0;
#pragma unroll
    for (int i = 0; i < SLOTS; ++i) {
        int e = i * NT + tid;
        ukey[i] = 0;
        if (e < E) {
            float u = philox_uniform(seed, offset, DOMAIN_EXPERT_MASKING, base + (u64)e);
            if (u < rate) {
                masked |= 1u << i;
                ukey[i] = rank_key(u, (u32)e);
            } else {
                unmasked += 1;
            }
        }
    }
    return masked;
}

// ---------------------------------------------------------------------------
// Grid-stride loops over a flat range: `for (i = grid_start(); i < n; i += grid_stride())`.
// ---------------------------------------------------------------------------
__device__ __forceinline__ long long grid_start() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

// out[0..n) = value (the body of the modules' fill kernels).
__device__ __forceinline__ void grid_fill(int* __restrict__ out, long long n, int value) {
    for (long long i = grid_start(); i < n; i += grid_stride()) out[i] = value;
}

// ---------------------------------------------------------------------------
// Block-wide exclusive scan of one int per thread (NT threads, fixed tree: the
// result is exact integer arithmetic anyway). `sh` holds NT / 32 ints. Returns the
// exclusive prefix; `total` gets the block's sum. Contains __syncthreads.
// ---------------------------------------------------------------------------
template <int NT>
__device__ __forceinline__ int block_excl_scan(int v, int* sh, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int incl = warp_incl_scan(v);
    __syncthreads();
    if (lane == 31) sh[warp] = incl;
    __syncthreads();
    int before = 0, sum = 0;
#pragma unroll
    for (int w = 0; w < NT / 32; ++w) {
        int x = sh[w];
        if (w < warp) before += x;
        sum += x;
    }
    total = sum;
    return before + incl - v;
}

// ---------------------------------------------------------------------------
// Radix select over the high words of n keys (`key(i)` for i in [0, n)): the high
// word `thr` of the want-th largest full key (1 <= want < n, full key = (hi, ~i): among
// equal high words the lower index ranks first), and `want_eq`, how many keys with
// high word thr are among the want largest (the first want_eq of them in index
// order). 4 passes of 8 bits, shared-memory integer histograms (order-free atomics).
// NT threads; `hist` is 256 ints of shared memory, `bc` 2 ints. Used by dispatch
// (drop keys of an expert's segment, i = position in token order) and expert choice
// (score keys of an expert's column, i = token).
// ---------------------------------------------------------------------------
template <int NT, typename KeyFn>
__device__ __forceinline__ void radix_select_hi(KeyFn key, int n, int want, int* hist, int* bc,
                                                u32& thr, int& want_eq) {
    u32 prefix = 0u, mask = 0u;
    int rem = want;
#pragma unroll 1
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = threadIdx.x; d < 256; d += NT) hist[d] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += NT) {
            const u32 h = key(i);
            if ((h & mask) == prefix) atomicAdd(hist + ((h >> shift) & 255u), 1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int cum = 0, sel = 0;
            for (int d = 255; d >= 0; --d) {
                const int c = hist[d];
                if (cum + c >= rem) {
                    sel = d;
                    break;
                }
                cum += c;
            }
            bc[0] = sel;
            bc[1] = rem - cum;
        }
        __syncthreads();
        prefix |= (u32)bc[0] << shift;
        mask |= 255u << shift;
        rem = bc[1];
        __syncthreads();
    }
    thr = prefix;
    want_eq = rem;
}

// Number the kept keys in index order after `radix_select_hi`: kept =
// hi > thr, or hi == thr among the first want_eq such. `emit(i, slot)` is called for
// every i in [0, n) with the slot (or -1). `sh` holds NT / 32 ints.
template <int NT, typename KeyFn, typename EmitFn>
__device__ __forceinline__ void number_kept(KeyFn key, int n, u32 thr, int want_eq, int* sh,
                                            EmitFn emit) {
    int carry_eq = 0, carry_kept = 0;
#pragma unroll 1
    for (int base = 0; base < n; base += NT) {
        const int i = base + threadIdx.x;
        const u32 h = i < n ? key(i) : 0u;
        const int is_eq = (i < n && h == thr) ? 1 : 0;
        int tot_eq, tot_kept;
        const int eq_before = carry_eq + block_excl_scan<NT>(is_eq, sh, tot_eq);
        const int keep = (i < n && (h > thr || (is_eq && eq_before < want_eq))) ? 1 : 0;
        const int slot = carry_kept + block_excl_scan<NT>(keep, sh, tot_kept);
        if (i < n) emit(i, keep ? slot : -1);
        carry_eq += tot_eq;
        carry_kept += tot_kept;
    }
}
