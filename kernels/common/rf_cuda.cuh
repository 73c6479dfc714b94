// rf_cuda.cuh — the ONE primitives header every recforge kernel includes (via recforge.cuh).
//
// Three modes:
//   __CUDACC__ (nvcc): the real CUDA headers and instructions. Inline PTX is allowed only in
//                      kernels/common/ and only under __CUDA_ARCH__.
//   RF_SIM     (g++):  the SIMT simulator path. Kernels are compiled as plain host C++17; every
//                      CUDA thread runs as a fiber (kernels/sim/rf_sim.cpp). Every primitive
//                      below has the documented CUDA semantics (see kernels/sim/tests).
//   otherwise:         an error.
//
// Rules for kernel code so both paths work:
//   - dynamic shared memory only through RF_DYNAMIC_SMEM(type, name) (never `extern __shared__`);
//     pass it on as rf_smem_t<T> (checked in the simulator), re-type it with rf_ptr_cast<U>(p);
//   - static shared memory only through RF_SHARED(type, name) or RF_SHARED(type, name, [n]...),
//     one variable each (never bare `__shared__`; tests/kernels.rs checks): the simulator fills
//     it with 0xFF bytes when a block first reaches it, as it does dynamic shared memory, so a
//     read of a slot no thread of the block wrote gives NaN / -1, not the previous block's value;
//   - 16-byte vector accesses through rf_ld16 / rf_st16 (alignment checked in the simulator);
//   - helpers defined in headers must be inline or templates (__device__ __forceinline__).
#pragma once

#define RF_FULL_MASK 0xffffffffu

#if defined(__CUDACC__)
// ============================================================================ CUDA (nvcc)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define RF_DYNAMIC_SMEM(type, name)                                   \
    extern __shared__ __align__(16) unsigned char rf_smem_raw[];      \
    type* name = reinterpret_cast<type*>(rf_smem_raw)
// Static shared memory: RF_SHARED(float, scratch, [32]); RF_SHARED(int, flag);
#define RF_SHARED(type, name, ...) __shared__ type name __VA_ARGS__

// A (dynamic) shared-memory pointer: raw pointer on the GPU, checked pointer in the simulator.
template <class T> using rf_smem_t = T*;
template <class U, class T> __device__ __forceinline__ U* rf_ptr_cast(T* p) { return reinterpret_cast<U*>(p); }

// 16-byte vector load / store (ld/st.v4.u32); the address must be 16-byte aligned.
__device__ __forceinline__ uint4 rf_ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void rf_st16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// ---- Ampere async copy, ldmatrix, mma.sync (real instructions; simulator path below) ----------
// cp.async.cg.shared.global 16 bytes (PTX ISA 9.7.9.25.3.1 "cp.async"): dst in shared memory,
// src in global memory, both 16-byte aligned. Complete after rf_cp_async_wait<N>() (+ a barrier
// before other threads read the data).
__device__ __forceinline__ void rf_cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__)
    const unsigned d = (unsigned)__cvta_generic_to_shared(smem_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(gmem_src) : "memory");
#endif
}
__device__ __forceinline__ void rf_cp_async_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void rf_cp_async_wait() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void rf_cp_async_wait_all() {
#if defined(__CUDA_ARCH__)
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{.trans}.shared.b16 (PTX ISA 9.7.14.5.15 "ldmatrix"): lanes
// 8i..8i+7 give the addresses of the 8 rows (16 bytes each, 16-byte aligned) of matrix i; register
// ri of lane l receives row l/4, elements 2(l%4) and 2(l%4)+1 of matrix i (.trans: of its transpose).
__device__ __forceinline__ void rf_ldmatrix_x1(unsigned& r0, const void* row) {
#if defined(__CUDA_ARCH__)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"((unsigned)__cvta_generic_to_shared(row)));
#endif
}
__device__ __forceinline__ void rf_ldmatrix_x2(unsigned& r0, unsigned& r1, const void* row) {
#if defined(__CUDA_ARCH__)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"((unsigned)__cvta_generic_to_shared(row)));
#endif
}
__device__ __forceinline__ void rf_ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* row) {
#if defined(__CUDA_ARCH__)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"((unsigned)__cvta_generic_to_shared(row)));
#endif
}
__device__ __forceinline__ void rf_ldmatrix_x1_trans(unsigned& r0, const void* row) {
#if defined(__CUDA_ARCH__)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"((unsigned)__cvta_generic_to_shared(row)));
#endif
}
__device__ __forceinline__ void rf_ldmatrix_x2_trans(unsigned& r0, unsigned& r1, const void* row) {
#if defined(__CUDA_ARCH__)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"((unsigned)__cvta_generic_to_shared(row)));
#endif
}
__device__ __forceinline__ void rf_ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* row) {
#if defined(__CUDA_ARCH__)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"((unsigned)__cvta_generic_to_shared(row)));
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (PTX ISA 9.7.14.5.8) and
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 (PTX ISA 9.7.14.5.10): D = A*B + C, fragments
// as the "Matrix Fragments for mma.m16n8k16 / mma.m16n8k32" tables (see the simulator path).
__device__ __forceinline__ void rf_mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
__device__ __forceinline__ void rf_mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}
__device__ __forceinline__ void rf_mma_m16n8k32_s8(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const int (&c)[4]) {
#if defined(__CUDA_ARCH__)
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
#endif
}

#elif defined(RF_SIM)
// ============================================================================ simulator (g++)
#include "../sim/rf_sim_rt.h"

// Standard headers a kernel TU may use; included here, before build.rs's generated sim_<stem>.cpp
// wraps the kernel source in a namespace.
#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdint.h>
#include <type_traits>
#include <utility>

// ---- qualifiers ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// `__shared__` variables are per OS thread. A block runs start to end on one OS thread and
// blocks never interleave on an OS thread, so this is per-block storage. Bare `__shared__` is
// not re-initialized between blocks (a block sees the previous block's values, or zero);
// RF_SHARED is: the first thread of a block to reach the declaration fills the variable with
// 0xFF bytes (no thread can have written it before: each must pass the declaration first).
#define __shared__ static thread_local
#define RF_SHARED(type, name, ...)                 \
    static thread_local type name __VA_ARGS__;     \
    ::rf_sim::shared_poison_once(&name, sizeof(name))
// __restrict__ is native in g++.

// ---- built-in variables -------------------------------------------------------------------
#define threadIdx (static_cast<const ::uint3&>(::rf_sim::tls_fiber->tid))
#define blockIdx (static_cast<const ::uint3&>(::rf_sim::tls_block->bid))
#define blockDim (static_cast<const ::dim3&>(::rf_sim::tls_block->bdim))
#define gridDim (static_cast<const ::dim3&>(::rf_sim::tls_block->gdim))
static constexpr int warpSize = 32;

// ---- vector types -------------------------------------------------------------------------
#define RF_SIM_VEC2(T, N, A) struct __attribute__((aligned(A))) N { T x, y; };                  \
    static inline N make_##N(T x, T y) { return N{x, y}; }
#define RF_SIM_VEC4(T, N, A) struct __attribute__((aligned(A))) N { T x, y, z, w; };            \
    static inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }
RF_SIM_VEC2(int, int2, 8)
RF_SIM_VEC2(unsigned int, uint2, 8)
RF_SIM_VEC2(float, float2, 8)
RF_SIM_VEC2(short, short2, 4)
RF_SIM_VEC2(unsigned short, ushort2, 4)
RF_SIM_VEC4(int, int4, 16)
RF_SIM_VEC4(unsigned int, uint4, 16)
RF_SIM_VEC4(float, float4, 16)
RF_SIM_VEC4(signed char, char4, 4)
RF_SIM_VEC4(unsigned char, uchar4, 4)
#undef RF_SIM_VEC2
#undef RF_SIM_VEC4
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// ---- barriers, fences ---------------------------------------------------------------------
static inline void __syncthreads() { (void)::rf_sim::syncthreads_op(0, 0); }
static inline int __syncthreads_count(int p) { return ::rf_sim::syncthreads_op(1, p); }
static inline int __syncthreads_and(int p) { return ::rf_sim::syncthreads_op(2, p); }
static inline int __syncthreads_or(int p) { return ::rf_sim::syncthreads_op(3, p); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// ---- warp collectives ---------------------------------------------------------------------
namespace rf_sim {
template <class T> inline T shfl(int op, unsigned mask, T v, int b, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    u = warp_op(op, mask, u, b, width);
    T r;
    std::memcpy(&r, &u, sizeof(T));
    return r;
}
}  // namespace rf_sim
static inline void __syncwarp(unsigned mask = RF_FULL_MASK) { (void)::rf_sim::warp_op(::rf_sim::W_SYNC, mask, 0, 0, 32); }
template <class T> inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    return ::rf_sim::shfl(::rf_sim::W_SHFL_IDX, mask, var, srcLane, width);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::rf_sim::shfl(::rf_sim::W_SHFL_UP, mask, var, (int)delta, width);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::rf_sim::shfl(::rf_sim::W_SHFL_DOWN, mask, var, (int)delta, width);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    return ::rf_sim::shfl(::rf_sim::W_SHFL_XOR, mask, var, laneMask, width);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)::rf_sim::warp_op(::rf_sim::W_BALLOT, mask, pred != 0, 0, 32);
}
static inline int __any_sync(unsigned mask, int pred) { return (int)::rf_sim::warp_op(::rf_sim::W_ANY, mask, pred != 0, 0, 32); }
static inline int __all_sync(unsigned mask, int pred) { return (int)::rf_sim::warp_op(::rf_sim::W_ALL, mask, pred != 0, 0, 32); }

// ---- atomics (device-wide: blocks run on several OS threads) ------------------------------
#define RF_SIM_ATOMIC_INT(T)                                                                             \
    static inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }         \
    static inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }         \
    static inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }         \
    static inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }           \
    static inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }         \
    static inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }       \
    static inline T atomicCAS(T* a, T cmp, T v) {                                                        \
        __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);              \
        return cmp;                                                                                      \
    }                                                                                                    \
    static inline T atomicMax(T* a, T v) {                                                               \
        T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                    \
        while (old < v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
        return old;                                                                                      \
    }                                                                                                    \
    static inline T atomicMin(T* a, T v) {                                                               \
        T old = __atomic_load_n(a, __ATOMIC_RELAXED);                                                    \
        while (old > v && !__atomic_compare_exchange_n(a, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {} \
        return old;                                                                                      \
    }
RF_SIM_ATOMIC_INT(int)
RF_SIM_ATOMIC_INT(unsigned int)
RF_SIM_ATOMIC_INT(unsigned long long)
#undef RF_SIM_ATOMIC_INT
static inline float atomicAdd(float* a, float v) {
    unsigned* u = reinterpret_cast<unsigned*>(a);
    unsigned old = __atomic_load_n(u, __ATOMIC_RELAXED), nw;
    float f;
    do {
        std::memcpy(&f, &old, 4);
        f += v;
        std::memcpy(&nw, &f, 4);
    } while (!__atomic_compare_exchange_n(u, &old, nw, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    std::memcpy(&f, &old, 4);
    return f;
}
static inline float atomicExch(float* a, float v) {
    unsigned nv, old;
    std::memcpy(&nv, &v, 4);
    old = __atomic_exchange_n(reinterpret_cast<unsigned*>(a), nv, __ATOMIC_RELAXED);
    float r;
    std::memcpy(&r, &old, 4);
    return r;
}

// ---- integer / bit intrinsics -------------------------------------------------------------
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
static inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
static inline int __mul24(int a, int b) { return (int)((int64_t)((a << 8) >> 8) * ((b << 8) >> 8)); }
// dp4a: 4-way byte dot product with 32-bit accumulate (PTX dp4a.s32.s32 / .u32.u32).
static inline int __dp4a(int a, int b, int c) {
    int s = c;
    for (int i = 0; i < 4; i++) s += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return s;
}
static inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
    unsigned s = c;
    for (int i = 0; i < 4; i++) s += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
    return s;
}
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }  // as CUDA's mixed overloads
static inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
static inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
static inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

// ---- float intrinsics ---------------------------------------------------------------------
// The fast-math forms are computed at full precision (the GPU's are within a few ulp of them).
static inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
static inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned x; std::memcpy(&x, &f, 4); return x; }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
// glibc declares (but does not export) __expf, __logf, __sinf, ... as internal names, so these
// are macros rather than functions.
#define __expf(x) expf(x)
#define __exp10f(x) exp10f(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __log10f(x) log10f(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __sincosf(x, s, c) (*(s) = sinf(x), *(c) = cosf(x), (void)0)
#define __powf(x, y) powf(x, y)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
static inline float __int2float_rn(int x) { return (float)x; }
template <class T> static inline T __ldg(const T* p) { return *p; }

// ---- bf16 / fp16 --------------------------------------------------------------------------
namespace rf_sim {
// float -> bf16, round to nearest even; NaN -> canonical 0x7FFF (as cuda_bf16.hpp).
inline unsigned short f2bf(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float bf2f(unsigned short h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
// float -> IEEE binary16, round to nearest even (subnormals, overflow to inf); NaN -> 0x7FFF.
inline unsigned short f2h(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const unsigned short sign = (unsigned short)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return 0x7fff;
    if (x >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf
    if (x < 0x38800000u) {                        // below 2^-14: subnormal (or zero)
        float a;
        std::memcpy(&a, &x, 4);
        return sign | (unsigned short)nearbyintf(a * 16777216.0f);  // exact scale, RNE
    }
    return sign | (unsigned short)((x - (112u << 23) + 0xfffu + ((x >> 13) & 1u)) >> 13);
}
inline float h2f(unsigned short h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t u;
    if (e == 0) {
        float f = (float)m * (1.0f / 16777216.0f);
        return sign ? -f : f;
    } else if (e == 31) {
        u = sign | 0x7f800000u | (m << 13);
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
}  // namespace rf_sim

struct __nv_bfloat16_raw { unsigned short x; };
struct __half_raw { unsigned short x; };

#define RF_SIM_HALF_TYPE(T, RAW, TO, FROM)                                                        \
    struct __attribute__((aligned(2))) T {                                                        \
        unsigned short __x;                                                                       \
        T() = default;                                                                            \
        T(float f) : __x(::rf_sim::TO(f)) {}                                                      \
        T(double f) : __x(::rf_sim::TO((float)f)) {}                                              \
        T(int i) : __x(::rf_sim::TO((float)i)) {}                                                 \
        T(const RAW& r) : __x(r.x) {}                                                             \
        operator float() const { return ::rf_sim::FROM(__x); }                                    \
        operator RAW() const { return RAW{__x}; }                                                 \
        T& operator+=(T o) { return *this = T(float(*this) + float(o)); }                         \
        T& operator-=(T o) { return *this = T(float(*this) - float(o)); }                         \
        T& operator*=(T o) { return *this = T(float(*this) * float(o)); }                         \
        T& operator/=(T o) { return *this = T(float(*this) / float(o)); }                         \
    };                                                                                            \
    static inline T operator+(T a, T b) { return T(float(a) + float(b)); }                        \
    static inline T operator-(T a, T b) { return T(float(a) - float(b)); }                        \
    static inline T operator*(T a, T b) { return T(float(a) * float(b)); }                        \
    static inline T operator/(T a, T b) { return T(float(a) / float(b)); }                        \
    static inline T operator-(T a) { T r; r.__x = (unsigned short)(a.__x ^ 0x8000u); return r; }  \
    static inline bool operator==(T a, T b) { return float(a) == float(b); }                      \
    static inline bool operator!=(T a, T b) { return float(a) != float(b); }                      \
    static inline bool operator<(T a, T b) { return float(a) < float(b); }                        \
    static inline bool operator>(T a, T b) { return float(a) > float(b); }                        \
    static inline bool operator<=(T a, T b) { return float(a) <= float(b); }                      \
    static inline bool operator>=(T a, T b) { return float(a) >= float(b); }                      \
    static inline T __hadd(T a, T b) { return a + b; }                                            \
    static inline T __hsub(T a, T b) { return a - b; }                                            \
    static inline T __hmul(T a, T b) { return a * b; }                                            \
    static inline T __hdiv(T a, T b) { return a / b; }                                            \
    static inline T __hneg(T a) { return -a; }                                                    \
    static inline T __hfma(T a, T b, T c) { return T((float)((double)float(a) * float(b) + float(c))); } \
    static inline T __hmax(T a, T b) { return float(a) > float(b) ? a : b; }                      \
    static inline T __hmin(T a, T b) { return float(a) < float(b) ? a : b; }
RF_SIM_HALF_TYPE(__nv_bfloat16, __nv_bfloat16_raw, f2bf, bf2f)
RF_SIM_HALF_TYPE(__half, __half_raw, f2h, h2f)
#undef RF_SIM_HALF_TYPE

#define RF_SIM_HALF2_TYPE(T2, T)                                                                  \
    struct __attribute__((aligned(4))) T2 {                                                       \
        T x, y;                                                                                   \
        T2() = default;                                                                           \
        T2(T a, T b) : x(a), y(b) {}                                                              \
    };                                                                                            \
    static inline T2 operator+(T2 a, T2 b) { return T2(a.x + b.x, a.y + b.y); }                   \
    static inline T2 operator-(T2 a, T2 b) { return T2(a.x - b.x, a.y - b.y); }                   \
    static inline T2 operator*(T2 a, T2 b) { return T2(a.x * b.x, a.y * b.y); }                   \
    static inline T2 __hadd2(T2 a, T2 b) { return a + b; }                                        \
    static inline T2 __hsub2(T2 a, T2 b) { return a - b; }                                        \
    static inline T2 __hmul2(T2 a, T2 b) { return a * b; }                                        \
    static inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); } \
    static inline T2 __hneg2(T2 a) { return T2(-a.x, -a.y); }                                     \
    static inline float __low2float(T2 a) { return float(a.x); }                                  \
    static inline float __high2float(T2 a) { return float(a.y); }
RF_SIM_HALF2_TYPE(__nv_bfloat162, __nv_bfloat16)
RF_SIM_HALF2_TYPE(__half2, __half)
#undef RF_SIM_HALF2_TYPE
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;
typedef __half half;
typedef __half2 half2;

static inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
static inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) { return __nv_bfloat16(__nv_bfloat16_raw{x}); }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b)); }
static inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
static inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
static inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{float(v.x), float(v.y)}; }
static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
static inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
static inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }

static inline __half __float2half(float f) { return __half(f); }
static inline __half __float2half_rn(float f) { return __half(f); }
static inline float __half2float(__half h) { return float(h); }
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }
static inline __half __ushort_as_half(unsigned short x) { return __half(__half_raw{x}); }
static inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
static inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
static inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
static inline float2 __half22float2(__half2 v) { return float2{float(v.x), float(v.y)}; }
static inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
static inline __half __low2half(__half2 v) { return v.x; }
static inline __half __high2half(__half2 v) { return v.y; }

// ---- dynamic shared memory (checked pointer) ----------------------------------------------
namespace rf_sim {
[[noreturn]] inline void smem_oob(long long off, size_t bytes) {
    fail("dynamic shared memory access out of range: byte offset %lld (%zu bytes) but the launch has %zu bytes "
         "of dynamic shared memory",
         off, bytes, tls_block->smem_size);
}
// A pointer into the block's dynamic shared memory; every access through it is checked against
// the launch's dynamic smem size. Converts implicitly to T* (unchecked) so it can be passed to
// code taking a raw pointer; take rf_smem_t<T> to keep the checks.
template <class T> struct smem_ptr {
    uintptr_t p;  // address (kept as an integer: may legitimately point out of range)
    const unsigned char* base;
    size_t size;
    T* at(ptrdiff_t i, size_t bytes = sizeof(T)) const {
        const uintptr_t a = p + (uintptr_t)(i * (ptrdiff_t)sizeof(T));
        const long long off = (long long)(a - (uintptr_t)base);
        if (off < 0 || (size_t)off + bytes > size) smem_oob(off, bytes);
        return reinterpret_cast<T*>(a);
    }
    template <class I, class = std::enable_if_t<std::is_integral<I>::value>> T& operator[](I i) const { return *at((ptrdiff_t)i); }
    T& operator*() const { return *at(0); }
    T* operator->() const { return at(0); }
    operator T*() const { return reinterpret_cast<T*>(p); }
    template <class I, class = std::enable_if_t<std::is_integral<I>::value>> smem_ptr operator+(I i) const {
        return smem_ptr{p + (uintptr_t)((ptrdiff_t)i * (ptrdiff_t)sizeof(T)), base, size};
    }
    template <class I, class = std::enable_if_t<std::is_integral<I>::value>> smem_ptr operator-(I i) const {
        return *this + (-(ptrdiff_t)i);
    }
    ptrdiff_t operator-(const smem_ptr& o) const { return (ptrdiff_t)(p - o.p) / (ptrdiff_t)sizeof(T); }
    template <class I> smem_ptr& operator+=(I i) { return *this = *this + i; }
    template <class I> smem_ptr& operator-=(I i) { return *this = *this - i; }
    smem_ptr& operator++() { return *this = *this + 1; }
    smem_ptr& operator--() { return *this = *this - 1; }
    smem_ptr operator++(int) { smem_ptr r = *this; ++*this; return r; }
    smem_ptr operator--(int) { smem_ptr r = *this; --*this; return r; }
    bool operator==(const smem_ptr& o) const { return p == o.p; }
    bool operator!=(const smem_ptr& o) const { return p != o.p; }
    bool operator<(const smem_ptr& o) const { return p < o.p; }
    bool operator<=(const smem_ptr& o) const { return p <= o.p; }
    bool operator>(const smem_ptr& o) const { return p > o.p; }
    bool operator>=(const smem_ptr& o) const { return p >= o.p; }
    template <class U> smem_ptr<U> cast() const { return smem_ptr<U>{p, base, size}; }
    operator smem_ptr<const T>() const { return smem_ptr<const T>{p, base, size}; }
};
template <class T> inline smem_ptr<T> dyn_smem() {
    return smem_ptr<T>{(uintptr_t)tls_block->smem, tls_block->smem, tls_block->smem_size};
}
}  // namespace rf_sim

#define RF_DYNAMIC_SMEM(type, name) ::rf_sim::smem_ptr<type> name = ::rf_sim::dyn_smem<type>()
template <class T> using rf_smem_t = ::rf_sim::smem_ptr<T>;
template <class U, class T> inline U* rf_ptr_cast(T* p) { return reinterpret_cast<U*>(p); }
template <class U, class T> inline ::rf_sim::smem_ptr<U> rf_ptr_cast(::rf_sim::smem_ptr<T> p) { return p.template cast<U>(); }

// ---- 16-byte vector load / store ----------------------------------------------------------
static inline uint4 rf_ld16(const void* p) {
    if ((uintptr_t)p & 15) ::rf_sim::fail("misaligned 16-byte load from address %p", p);
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}
static inline void rf_st16(void* p, uint4 v) {
    if ((uintptr_t)p & 15) ::rf_sim::fail("misaligned 16-byte store to address %p", p);
    std::memcpy(p, &v, 16);
}
template <class T> inline uint4 rf_ld16(::rf_sim::smem_ptr<T> p) {
    if (p.p & 15) ::rf_sim::fail("misaligned 16-byte load from dynamic shared memory at byte offset %lld", (long long)(p.p - (uintptr_t)p.base));
    return rf_ld16(static_cast<const void*>(p.at(0, 16)));
}
template <class T> inline void rf_st16(::rf_sim::smem_ptr<T> p, uint4 v) {
    if (p.p & 15) ::rf_sim::fail("misaligned 16-byte store to dynamic shared memory at byte offset %lld", (long long)(p.p - (uintptr_t)p.base));
    rf_st16(static_cast<void*>(p.at(0, 16)), v);
}

// ---- Ampere async copy, ldmatrix, mma.sync: simulator path --------------------------------------
namespace rf_sim {
// The address of a 16-byte shared-memory row: aligned, and (through a checked pointer) in range.
inline const unsigned char* row16(const void* p, const char* what) {
    if ((uintptr_t)p & 15) fail("%s: address %p is not 16-byte aligned", what, p);
    return static_cast<const unsigned char*>(p);
}
template <class T> inline const unsigned char* row16(smem_ptr<T> p, const char* what) {
    if (p.p & 15) fail("%s: dynamic shared memory byte offset %lld is not 16-byte aligned", what, (long long)(p.p - (uintptr_t)p.base));
    return reinterpret_cast<const unsigned char*>(p.template cast<const unsigned char>().at(0, 16));
}
template <class T> inline unsigned char* row16w(smem_ptr<T> p, const char* what) { return const_cast<unsigned char*>(row16(p, what)); }
inline unsigned char* row16w(void* p, const char* what) { return const_cast<unsigned char*>(row16(p, what)); }

struct LdmIO {
    const unsigned char* row;  // this lane's row address (used for lanes < 8 * N)
    unsigned r[4];
};
// PTX ISA 9.7.14.5.15 (ldmatrix, "fragment layout"): lane l receives, for matrix i, row l/4 and
// the elements 2(l%4), 2(l%4)+1 (low half = lower column). With .trans, the matrix is transposed:
// element (l/4, 2(l%4)+k) of the result is element (2(l%4)+k, l/4) of the matrix in memory.
template <int N, bool TRANS> inline void ldmatrix_fn(void* const* io, unsigned) {
    for (int l = 0; l < 32; l++) {
        LdmIO* o = static_cast<LdmIO*>(io[l]);
        for (int i = 0; i < N; i++) {
            if (!TRANS) {
                const unsigned char* row = static_cast<LdmIO*>(io[8 * i + l / 4])->row;
                std::memcpy(&o->r[i], row + 4 * (l % 4), 4);
            } else {
                const unsigned char* r0 = static_cast<LdmIO*>(io[8 * i + 2 * (l % 4)])->row;
                const unsigned char* r1 = static_cast<LdmIO*>(io[8 * i + 2 * (l % 4) + 1])->row;
                unsigned short lo, hi;
                std::memcpy(&lo, r0 + 2 * (l / 4), 2);
                std::memcpy(&hi, r1 + 2 * (l / 4), 2);
                o->r[i] = (unsigned)lo | ((unsigned)hi << 16);
            }
        }
    }
}
template <int N, bool TRANS, class P> inline void ldmatrix(unsigned* r, P row) {
    static const char* const names[2][5] = {{"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
                                            {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
    LdmIO io;
    io.row = tls_fiber->lane < 8u * N ? row16(row, names[TRANS][N]) : nullptr;
    warp_call(0xffffffffu, &io, &ldmatrix_fn<N, TRANS>, names[TRANS][N]);
    for (int i = 0; i < N; i++) r[i] = io.r[i];
}

struct MmaIO {
    unsigned a[4], b[2], c[4], d[4];
};
inline float b16f(unsigned reg, int hi, bool bf) {
    const unsigned short h = (unsigned short)(hi ? reg >> 16 : reg & 0xffff);
    return bf ? bf2f(h) : h2f(h);
}
// PTX ISA 9.7.14.5.8, "Matrix Fragments for mma.m16n8k16 with floating point type"
// (groupID g = lane >> 2, threadID_in_group t = lane % 4):
//   A (16x16, .row): a_i, i = 0..7 (two per register, low half first):
//        row = g for i < 2 || 4 <= i < 6, g + 8 otherwise; col = 2t + (i & 1) (+ 8 for i >= 4)
//   B (16x8, .col): b_i, i = 0..3: row = 2t + (i & 1) (+ 8 for i >= 2); col = g
//   C, D (16x8, f32): c_i, i = 0..3: row = g (+ 8 for i >= 2); col = 2t + (i & 1)
// Products are exact in f32; the sum is accumulated in double and rounded to f32 once (the GPU's
// f32 accumulation order and rounding are unspecified: results may differ in the last bits).
template <bool BF> inline void mma_f16_fn(void* const* io, unsigned) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        const MmaIO* o = static_cast<const MmaIO*>(io[l]);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 8; i++) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8, col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = b16f(o->a[i / 2], i & 1, BF);
        }
        for (int i = 0; i < 4; i++) B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = b16f(o->b[i / 2], i & 1, BF);
        for (int i = 0; i < 4; i++) std::memcpy(&C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)], &o->c[i], 4);
    }
    for (int l = 0; l < 32; l++) {
        MmaIO* o = static_cast<MmaIO*>(io[l]);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; i++) {
            const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            double acc = C[row][col];
            for (int k = 0; k < 16; k++) acc += (double)A[row][k] * B[k][col];
            const float f = (float)acc;
            std::memcpy(&o->d[i], &f, 4);
        }
    }
}
// PTX ISA 9.7.14.5.10, "Matrix Fragments for mma.m16n8k32" (.s8):
//   A (16x32, .row): a_i, i = 0..15 (four per register, lowest byte first):
//        row = g for i < 4 || 8 <= i < 12, g + 8 otherwise; col = 4t + (i & 3) (+ 16 for i >= 8)
//   B (32x8, .col): b_i, i = 0..7: row = 4t + (i & 3) (+ 16 for i >= 4); col = g
//   C, D (16x8, s32): as for m16n8k16. Integer accumulation wraps modulo 2^32 (no .satfinite).
inline void mma_s8_fn(void* const* io, unsigned) {
    int A[16][32], B[32][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        const MmaIO* o = static_cast<const MmaIO*>(io[l]);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 16; i++) {
            const int row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8, col = 4 * t + (i & 3) + (i >= 8 ? 16 : 0);
            A[row][col] = (int8_t)(o->a[i / 4] >> (8 * (i & 3)));
        }
        for (int i = 0; i < 8; i++) B[4 * t + (i & 3) + (i >= 4 ? 16 : 0)][g] = (int8_t)(o->b[i / 4] >> (8 * (i & 3)));
        for (int i = 0; i < 4; i++) C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = (int)o->c[i];
    }
    for (int l = 0; l < 32; l++) {
        MmaIO* o = static_cast<MmaIO*>(io[l]);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; i++) {
            const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
            unsigned acc = (unsigned)C[row][col];
            for (int k = 0; k < 32; k++) acc += (unsigned)(A[row][k] * B[k][col]);
            o->d[i] = acc;
        }
    }
}
template <class DT, class CT> inline void mma(warp_fn fn, const char* name, DT (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const CT (&c)[4]) {
    MmaIO io;
    std::memcpy(io.a, a, 16);
    std::memcpy(io.b, b, 8);
    std::memcpy(io.c, c, 16);
    warp_call(0xffffffffu, &io, fn, name);
    std::memcpy(d, io.d, 16);
}
}  // namespace rf_sim

// cp.async: by default the destination reads 0xFF from issue until the issuing thread's wait
// covers the copy (RF_SIM_CP_ASYNC in rf_sim.cpp), so wait counts are checked. Alignment (both
// sides) and the smem range are checked at issue.
template <class P> inline void rf_cp_async16(P smem_dst, const void* gmem_src) {
    unsigned char* d = ::rf_sim::row16w(smem_dst, "cp.async (shared destination)");
    ::rf_sim::cp_async16(d, ::rf_sim::row16(gmem_src, "cp.async (global source)"));
}
static inline void rf_cp_async_commit() { ::rf_sim::cp_async_commit(); }
template <int N> inline void rf_cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    ::rf_sim::cp_async_wait(N);
}
static inline void rf_cp_async_wait_all() { ::rf_sim::cp_async_wait(-1); }

template <class P> inline void rf_ldmatrix_x1(unsigned& r0, P row) {
    unsigned r[1];
    ::rf_sim::ldmatrix<1, false>(r, row);
    r0 = r[0];
}
template <class P> inline void rf_ldmatrix_x2(unsigned& r0, unsigned& r1, P row) {
    unsigned r[2];
    ::rf_sim::ldmatrix<2, false>(r, row);
    r0 = r[0], r1 = r[1];
}
template <class P> inline void rf_ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, P row) {
    unsigned r[4];
    ::rf_sim::ldmatrix<4, false>(r, row);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
template <class P> inline void rf_ldmatrix_x1_trans(unsigned& r0, P row) {
    unsigned r[1];
    ::rf_sim::ldmatrix<1, true>(r, row);
    r0 = r[0];
}
template <class P> inline void rf_ldmatrix_x2_trans(unsigned& r0, unsigned& r1, P row) {
    unsigned r[2];
    ::rf_sim::ldmatrix<2, true>(r, row);
    r0 = r[0], r1 = r[1];
}
template <class P> inline void rf_ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, P row) {
    unsigned r[4];
    ::rf_sim::ldmatrix<4, true>(r, row);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
static inline void rf_mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    ::rf_sim::mma(&::rf_sim::mma_f16_fn<true>, "mma.m16n8k16.bf16", d, a, b, c);
}
static inline void rf_mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    ::rf_sim::mma(&::rf_sim::mma_f16_fn<false>, "mma.m16n8k16.f16", d, a, b, c);
}
static inline void rf_mma_m16n8k32_s8(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const int (&c)[4]) {
    ::rf_sim::mma(&::rf_sim::mma_s8_fn, "mma.m16n8k32.s8", d, a, b, c);
}

#else
#error "rf_cuda.cuh: compile kernels with nvcc, or with a host C++17 compiler and -DRF_SIM (the SIMT simulator)"
#endif
