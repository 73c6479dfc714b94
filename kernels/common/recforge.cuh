// Shared helpers for recforge kernels. Kernels stay plain CUDA C++; anything that needs inline
// PTX goes in this folder (and gets a simulator path with the SIMT simulator).
#pragma once
#include "rf_cuda.cuh"  // the primitives: CUDA (nvcc) or the SIMT simulator (-DRF_SIM)

__device__ __forceinline__ float rf_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(RF_FULL_MASK, v, o);
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
// blockDim.x must be a multiple of 32 and at most 1024.
__device__ __forceinline__ float rf_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = rf_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = rf_warp_sum(v);
    __syncthreads();  // scratch may be reused right after
    return v;
}

// Online softmax: merge the (running max m, sum of exp(x − m)) pair (m2, s2) into (m, s).
// −inf maxima (nothing seen yet) merge without producing NaN.
__device__ __forceinline__ void rf_softmax_merge(float& m, float& s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) {
        m = m2;
        s = s2;
        return;
    }
    const float M = fmaxf(m, m2);
    s = s * expf(m - M) + s2 * expf(m2 - M);
    m = M;
}

__device__ __forceinline__ float rf_to_float(float x) { return x; }
__device__ __forceinline__ float rf_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T rf_from_float(float x);
template <> __device__ __forceinline__ float rf_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 rf_from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// 16 bytes of T as floats: N = 4 (f32) or 8 (bf16). bf16 → f32 is exact (a shift); f32 → bf16
// rounds to nearest even (__float2bfloat16), exactly as a scalar store does.
template <typename T> struct rf_vec16;
template <> struct rf_vec16<float> {
    static constexpr int N = 4;
    static __device__ __forceinline__ void load(const float* p, float (&v)[4]) {
        const uint4 u = rf_ld16(p);
        v[0] = __uint_as_float(u.x), v[1] = __uint_as_float(u.y), v[2] = __uint_as_float(u.z), v[3] = __uint_as_float(u.w);
    }
    static __device__ __forceinline__ void store(float* p, const float (&v)[4]) {
        rf_st16(p, make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3])));
    }
};
template <> struct rf_vec16<__nv_bfloat16> {
    static constexpr int N = 8;
    static __device__ __forceinline__ float lo(unsigned w) { return __uint_as_float(w << 16); }
    static __device__ __forceinline__ float hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
    static __device__ __forceinline__ unsigned pack(float a, float b) {
        return (unsigned)__bfloat16_as_ushort(__float2bfloat16(a)) | ((unsigned)__bfloat16_as_ushort(__float2bfloat16(b)) << 16);
    }
    static __device__ __forceinline__ void load(const __nv_bfloat16* p, float (&v)[8]) {
        const uint4 u = rf_ld16(p);
        v[0] = lo(u.x), v[1] = hi(u.x), v[2] = lo(u.y), v[3] = hi(u.y);
        v[4] = lo(u.z), v[5] = hi(u.z), v[6] = lo(u.w), v[7] = hi(u.w);
    }
    static __device__ __forceinline__ void store(__nv_bfloat16* p, const float (&v)[8]) {
        rf_st16(p, make_uint4(pack(v[0], v[1]), pack(v[2], v[3]), pack(v[4], v[5]), pack(v[6], v[7])));
    }
};
__device__ __forceinline__ bool rf_aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }
