// cuda_emu.h: what a .cu file of moe-router needs from CUDA, for g++ on a CPU.
//
// The kernels in cuda/*.cu are written for NVRTC with no CUDA header. Compiled as
// C++17 with this header included first (and MOE_ROUTER_EMU defined), they run on the
// CPU under emu/runtime.cpp: every CUDA thread of a block is a fiber, blocks run one
// after another, and a fiber runs until it reaches a barrier (__syncthreads) or a warp
// collective (__shfl*_sync, __ballot_sync, __match_any_sync, __syncwarp), where it
// waits until every thread that must take part has arrived. Nothing else is
// synchronised, so shared-memory races show up as wrong answers when the runtime
// switches the order in which it runs threads and blocks (it alternates between
// forward and reverse order on every launch).
//
// Semantics follow the CUDA C++ Programming Guide; where the guide leaves behaviour
// undefined (a warp collective whose mask names a lane that has exited or waits
// elsewhere, a barrier some threads of the block never reach), the runtime stops the
// launch with an error instead of guessing.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <type_traits>

#include "emu_api.h"

#ifndef MOE_ROUTER_EMU
#define MOE_ROUTER_EMU 1
#endif

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(8) float2 {
    float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }

namespace emu {

// The running thread's index, the block's index and the launch shape. Set by the
// runtime on every switch between fibers.
extern uint3* tid;
extern uint3 bid;
extern dim3 bdim;
extern dim3 gdim;

// Collective kinds.
enum Op : int {
    OP_SYNCWARP = 1,
    OP_SHFL = 2,
    OP_SHFL_UP = 3,
    OP_SHFL_DOWN = 4,
    OP_SHFL_XOR = 5,
    OP_BALLOT = 6,
    OP_MATCH_ANY = 7,
    OP_ANY = 8,
    OP_ALL = 9,
};

// Wait at the block barrier.
void syncthreads();
// A warp collective among the lanes of `mask` (which must include the caller): every
// lane in `mask` must reach a collective of the same kind with the same mask.
uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg, int width);
// The launch's dynamic shared memory (poisoned with 0xCD bytes at every block start).
void* dynamic_smem();

template <class T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "8-byte shuffles at most");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// Calls a kernel with its parameters unpacked from cuLaunchKernel's `void**`.
template <class... A, std::size_t... I>
inline void invoke_impl(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <class... A> inline void invoke(void (*f)(A...), void** p) {
    invoke_impl(f, p, std::index_sequence_for<A...>{});
}

// Registers an entry point at load time (one static object per kernel).
struct Registrar {
    Registrar(const char* name, void (*invoke)(void**));
};

}  // namespace emu

#define threadIdx (*::emu::tid)
#define blockIdx (::emu::bid)
#define blockDim (::emu::bdim)
#define gridDim (::emu::gdim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// Every barrier and collective is also a compiler memory barrier: shared memory is a
// function-local static here, and other fibers write it while this one waits.
#define MOE_EMU_COMPILER_FENCE() __asm__ __volatile__("" ::: "memory")
namespace emu {
inline uint64_t collective(int op, unsigned mask, uint64_t value, int arg, int width) {
    MOE_EMU_COMPILER_FENCE();
    const uint64_t r = warp_collective(op, mask, value, arg, width);
    MOE_EMU_COMPILER_FENCE();
    return r;
}
}  // namespace emu
inline void __syncthreads() {
    MOE_EMU_COMPILER_FENCE();
    ::emu::syncthreads();
    MOE_EMU_COMPILER_FENCE();
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::emu::collective(::emu::OP_SYNCWARP, mask, 0, 0, 32);
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return ::emu::from_bits<T>(::emu::collective(::emu::OP_SHFL, mask, ::emu::to_bits(v), src, width));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::emu::from_bits<T>(
        ::emu::collective(::emu::OP_SHFL_UP, mask, ::emu::to_bits(v), (int)delta, width));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return ::emu::from_bits<T>(
        ::emu::collective(::emu::OP_SHFL_DOWN, mask, ::emu::to_bits(v), (int)delta, width));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return ::emu::from_bits<T>(
        ::emu::collective(::emu::OP_SHFL_XOR, mask, ::emu::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)::emu::collective(::emu::OP_BALLOT, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) {
    return (int)::emu::collective(::emu::OP_ANY, mask, pred != 0, 0, 32);
}
inline int __all_sync(unsigned mask, int pred) {
    return (int)::emu::collective(::emu::OP_ALL, mask, pred != 0, 0, 32);
}
template <class T> inline unsigned __match_any_sync(unsigned mask, T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
    return (unsigned)::emu::collective(::emu::OP_MATCH_ANY, mask, ::emu::to_bits(v), 0, 32);
}

// Bit casts and integer intrinsics.
inline float __int_as_float(int x) { return ::emu::from_bits<float>((uint32_t)x); }
inline float __uint_as_float(unsigned x) { return ::emu::from_bits<float>(x); }
inline int __float_as_int(float x) { return (int)(uint32_t)::emu::to_bits(x); }
inline unsigned __float_as_uint(float x) { return (uint32_t)::emu::to_bits(x); }
inline long long __double_as_longlong(double x) { return (long long)::emu::to_bits(x); }
inline double __longlong_as_double(long long x) { return ::emu::from_bits<double>((uint64_t)x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}

// Atomics: fibers never run at the same time, so a plain read-modify-write is atomic.
template <class T, class U> inline T atomicAdd(T* p, U v) {
    T old = *p;
    *p = (T)(old + (T)v);
    return old;
}
template <class T, class U> inline T atomicSub(T* p, U v) {
    T old = *p;
    *p = (T)(old - (T)v);
    return old;
}
template <class T, class U> inline T atomicMin(T* p, U v) {
    T old = *p;
    if ((T)v < old) *p = (T)v;
    return old;
}
template <class T, class U> inline T atomicMax(T* p, U v) {
    T old = *p;
    if ((T)v > old) *p = (T)v;
    return old;
}
template <class T, class U> inline T atomicExch(T* p, U v) {
    T old = *p;
    *p = (T)v;
    return old;
}
template <class T, class U, class V> inline T atomicCAS(T* p, U cmp, V v) {
    T old = *p;
    if (old == (T)cmp) *p = (T)v;
    return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// CUDA's device min/max overloads.
template <class A, class B> inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B> inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)b : (C)a;
}
