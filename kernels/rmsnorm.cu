// RMSNorm forward.
//
// Layout:  x   [rows, d]  row-major, element type T (f32 or bf16)
//          w   [d]        f32 (norm weights are kept in full precision)
//          out [rows, d]  T
// Math:    out[r, i] = x[r, i] * rsqrt(mean_i(x[r, i]^2) + eps) * w[i], statistics in f32.
// Launch:  grid = (rows), block = (256) — one block per row, any d (threads stride the row).
// Must match: backend::cpu::Cpu::rmsnorm (src/backend/cpu/mod.rs).
#include "common/recforge.cuh"

template <typename T>
__device__ void rmsnorm(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ out,
                        int d, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (size_t)blockIdx.x * d;
    T* yr = out + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = rf_to_float(xr[i]);
        ss += v * v;
    }
    ss = rf_block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = rf_from_float<T>(rf_to_float(xr[i]) * r * w[i]);
}

extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* out, int d, float eps) {
    rmsnorm<float>(x, w, out, d, eps);
}

extern "C" __global__ void rmsnorm_bf16(const __nv_bfloat16* x, const float* w, __nv_bfloat16* out, int d,
                                        float eps) {
    rmsnorm<__nv_bfloat16>(x, w, out, d, eps);
}
