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

__device__ __forceinline__ float rf_to_float(float x) { return x; }
__device__ __forceinline__ float rf_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T rf_from_float(float x);
template <> __device__ __forceinline__ float rf_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 rf_from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
